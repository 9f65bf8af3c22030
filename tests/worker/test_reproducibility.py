"""Same seed, same model through the service: two jobs with one `seed` override on one
dataset train the same weights (from scratch, on a CPU); the default seed, the job's id,
gives another. The model's provenance shows in GET /v1/models/{id}.

`pytest -s` prints the sha256 values compared."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.datasets.service import create_dataset
from service.datasets.uploads import UploadItem
from service.db.artifacts import LocalArtifactStore
from service.db.models import Model
from service.db.session import session_scope
from service.settings import Settings
from tests.factories import CLASSES, class_png
from tests.service.conftest import new_key
from tests.worker.conftest import TINY_PLAN, job_row
from worker.runner import run_finetune_job

PER_CLASS = 8  # enough for the automatic hold-out, which the seed draws too


@pytest.fixture
def client(sqlite_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(sqlite_settings)) as test_client:
        yield test_client


def one_dataset(settings: Settings) -> int:
    items = [
        UploadItem(filename=f"{label}-{i}.png", label=label, content=class_png(label, seed=i))
        for label in CLASSES
        for i in range(PER_CLASS)
    ]
    store = LocalArtifactStore(settings.artifacts_url)
    with session_scope(settings.database_url) as session:
        return create_dataset(session, store, settings, tenant="acme", name="d", items=items).id


def trained_model(
    client: TestClient, settings: Settings, headers: dict[str, str], dataset_id: int, **seed: int
) -> dict[str, Any]:
    """Create a from-scratch job through the API, run it in-process, answer its model."""
    body = {
        "dataset_id": dataset_id,
        "base_model": "R14x0.5",
        "overrides": {**TINY_PLAN, "total_steps": 8, **seed},
    }
    created = client.post("/v1/finetune", json=body, headers=headers)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert run_finetune_job(settings, job_id, "w1") == "succeeded"
    job = job_row(settings, job_id)
    answer = client.get(f"/v1/models/{job.model_id}", headers=headers)
    assert answer.status_code == 200, answer.text
    return {"job": job, "model": answer.json()}


def test_two_jobs_of_one_seed_train_the_same_model_and_the_default_seed_another(
    client: TestClient, sqlite_settings: Settings
):
    headers = {"Authorization": f"Bearer {new_key(sqlite_settings)}"}
    dataset_id = one_dataset(sqlite_settings)
    first = trained_model(client, sqlite_settings, headers, dataset_id, seed=7)
    second = trained_model(client, sqlite_settings, headers, dataset_id, seed=7)
    default = trained_model(client, sqlite_settings, headers, dataset_id)
    shas = [run["model"]["sha256"] for run in (first, second, default)]
    print(f"\nservice, seed 7 twice: {shas[0]} {shas[1]}; job id as seed: {shas[2]}")
    assert shas[0] == shas[1]
    assert shas[2] != shas[0]

    # The seed drew the automatic hold-out too: the same images measure both models.
    holdouts = [run["job"].params["holdout"] for run in (first, second, default)]
    assert holdouts[0]["source"] == "auto" and holdouts[0]["seed"] == 7
    assert holdouts[0]["val_image_ids"] == holdouts[1]["val_image_ids"]
    assert holdouts[2]["seed"] == default["job"].id == default["job"].params["seed"]

    provenance = first["model"]["provenance"]
    assert provenance["seed"] == 7 and provenance["plan"]["total_steps"] == 8
    assert provenance["base_model"] == "R14x0.5" and provenance["base_sha256"] is None
    assert provenance["dataset_version"]["dataset_id"] == dataset_id
    assert provenance["dataset_version"]["dataset_version"] == 1
    assert provenance["device"].startswith("cpu") and provenance["deterministic"] is False
    assert "provenance" not in first["model"]["metrics"]  # its own field, not a metric
    assert default["model"]["provenance"]["seed"] == default["job"].id


def test_a_seed_override_must_be_a_non_negative_integer(
    client: TestClient, sqlite_settings: Settings
):
    headers = {"Authorization": f"Bearer {new_key(sqlite_settings)}"}
    body = {"dataset_id": 1, "base_model": "R14x0.5", "overrides": {"seed": -1}}
    refused = client.post("/v1/finetune", json=body, headers=headers)
    assert refused.status_code == 422 and "seed" in refused.text


def test_the_deterministic_setting_reaches_the_run(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("BIT_DETERMINISTIC", "true")
    assert Settings().deterministic
    settings = sqlite_settings.model_copy(update={"deterministic": True})
    dataset_id = one_dataset(settings)
    headers = {"Authorization": f"Bearer {new_key(settings)}"}
    with TestClient(create_app(settings)) as deterministic_client:
        run = trained_model(deterministic_client, settings, headers, dataset_id, seed=3)
    assert run["model"]["provenance"]["deterministic"] is True
    with session_scope(settings.database_url) as session:
        model = session.get(Model, run["job"].model_id)
        assert model is not None and model.metrics["provenance"]["seed"] == 3
