"""A linear job from pre-trained weights stores its head and shares the base: the worker
publishes the base once, the API serves each model as its own, export stays whole."""

from __future__ import annotations

from pathlib import Path

import torch
from fastapi.testclient import TestClient

from bit_core import weights
from bit_core.checkpoint import HEAD_FILE, WEIGHTS_FILE
from bit_core.export import read_bundle
from bit_core.predict import Predictor
from service.app import create_app
from service.db.artifacts import MANIFEST, LocalArtifactStore
from service.db.models import Model
from service.db.session import session_scope
from service.models.bases import ArtifactBaseStore, base_key
from service.settings import Settings
from tests.factories import CLASSES, class_png, make_bit_npz
from tests.service.conftest import new_key
from tests.worker.conftest import TINY_PLAN, job_row, queue_finetune, styled_items
from worker.runner import run_finetune_job


def linear_job(settings: Settings, seeds: range, name: str) -> Model:
    job_id = queue_finetune(
        settings,
        styled_items(seeds),
        overrides=TINY_PLAN,
        name=name,
        mode="linear",
        base_model="house-base",
    )
    assert run_finetune_job(settings, job_id, "w1") == "succeeded"
    with session_scope(settings.database_url) as session:
        model = session.get(Model, job_row(settings, job_id).model_id)
        assert model is not None
        session.expunge(model)
        return model


def test_linear_models_share_the_stored_base(sqlite_settings: Settings, tmp_path: Path):
    settings = sqlite_settings
    npz = make_bit_npz(tmp_path / "house.npz", "R14x0.5", 5)
    weights.import_file(npz, settings.weights_dir, name="house-base")
    first = linear_job(settings, range(3), "one")
    second = linear_job(settings, range(3, 6), "two")
    store = LocalArtifactStore(settings.artifacts_url)

    # Each model is its head (KB) and a reference to one stored base.
    assert first.shared_base_sha256 and first.shared_base_sha256 == second.shared_base_sha256
    for model in (first, second):
        assert model.size_bytes < 16 * 1024
        assert (store.path(model.uri) / HEAD_FILE).is_file()
        assert not (store.path(model.uri) / WEIGHTS_FILE).exists()
    assert store.exists(f"{base_key(first.shared_base_sha256)}/{MANIFEST}")
    assert [p.name for p in store.path("bases").iterdir()] == [first.shared_base_sha256]

    image = class_png(CLASSES[0], seed=99)
    bases = ArtifactBaseStore(store)
    headers = {"Authorization": f"Bearer {new_key(settings, 'user', 'acme')}"}
    with TestClient(create_app(settings)) as client:
        for model in (first, second):
            shown = client.get(f"/v1/models/{model.id}", headers=headers).json()
            assert shown["shared_base_sha256"] == model.shared_base_sha256
            answer = client.post(
                "/v1/predict",
                files=[("files", ("x.png", image, "image/png"))],
                data={"model_id": str(model.id), "top_k": "99"},
                headers=headers,
            )
            assert answer.status_code == 200, answer.text
            served = {
                r["label"]: r["probability"] for r in answer.json()["predictions"][0]["top_k"]
            }
            alone = Predictor.load(store.path(model.uri), device="cpu", bases=bases)
            expected = alone.probabilities(alone.preprocess([image]))[0]
            for label, probability in zip(alone.classes, expected.tolist(), strict=True):
                assert abs(served[label] - probability) <= 1e-5
        # The export is the whole model: it loads with no base anywhere.
        bundle = client.get(f"/v1/models/{first.id}/export?format=bundle", headers=headers)
        assert bundle.status_code == 200, bundle.text
    (tmp_path / "bundle.zip").write_bytes(bundle.content)
    info = read_bundle(tmp_path / "bundle.zip", tmp_path / "unpacked")
    assert info.shared_base is None
    whole = Predictor.load(tmp_path / "unpacked", device="cpu", backend="torch")
    shared = Predictor.load(store.path(first.uri), device="cpu", backend="torch", bases=bases)
    batch = whole.preprocess([image])
    assert torch.allclose(whole.probabilities(batch), shared.probabilities(batch), atol=1e-6)
