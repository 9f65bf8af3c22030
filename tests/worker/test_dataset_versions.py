"""Dataset versions through the real worker code path (a tiny model, in-process): a job
trains on the version it pinned at creation, whatever the dataset became meanwhile, and
a resumed run sees the same images, labels and splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

import worker.runner
from bit_core.data import LabeledImages
from service.app import create_app
from service.auth import Principal
from service.datasets.service import append_images, delete_image, update_image
from service.datasets.uploads import UploadItem
from service.db.artifacts import LocalArtifactStore
from service.db.models import Dataset, Image
from service.db.session import session_scope
from service.settings import Settings
from tests.factories import CLASSES, class_png
from tests.service.conftest import new_key
from tests.worker.conftest import Spy, job_row, queue_class_images
from worker.runner import run_finetune_job

pytestmark = pytest.mark.slow


def labels_by_sha(images: LabeledImages) -> dict[str, str]:
    """{sha256: class name} of what a run got (a local store's files are named by sha256)."""
    return {
        Path(str(source)).name: images.classes[label]
        for source, label in zip(images.sources, images.labels, strict=True)
    }


def change_dataset(settings: Settings, job_id: int) -> dict[str, Any]:
    """Change the job's dataset every way there is: a new class and more images of the old
    ones, a train image relabelled, another deleted. Returns what changed."""
    job = job_row(settings, job_id)
    held = set(job.params["holdout"]["val_image_ids"])
    principal = Principal(1, "acme", "user")
    store = LocalArtifactStore(settings.artifacts_url)
    items = [
        UploadItem(
            filename=f"new-{label}-{i}.png",
            label=label,
            content=class_png(CLASSES[i % len(CLASSES)], seed=500 + 10 * n + i),
        )
        for n, label in enumerate(("zebra", CLASSES[0]))
        for i in range(6)
    ]
    with session_scope(settings.database_url) as session:
        dataset = session.get_one(Dataset, job.dataset_id)
        assert append_images(session, store, settings, dataset=dataset, items=items) == 12
        train = [
            image
            for image in session.scalars(
                select(Image).where(Image.dataset_id == dataset.id).order_by(Image.id)
            )
            if image.id not in held and image.label != "zebra"
        ]
        relabelled, deleted = train[0], train[1]
        relabelled_sha, old_label = relabelled.sha256, relabelled.label
        update_image(
            session,
            settings,
            dataset_id=dataset.id,
            image_id=relabelled.id,
            split=None,
            label="zebra",
            principal=principal,
        )
        deleted_sha = deleted.sha256
        delete_image(session, dataset_id=dataset.id, image_id=deleted.id, principal=principal)
    return {"relabelled": (relabelled_sha, old_label), "deleted": deleted_sha}


def test_a_job_trains_on_the_version_it_pinned(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    job_id = queue_class_images(sqlite_settings, per_class=8, total_steps=6, eval_every=2)
    before = job_row(sqlite_settings, job_id).params
    assert before["dataset_version"] == 1 and before["dataset_version_id"]
    changed = change_dataset(sqlite_settings, job_id)  # while the job is queued

    assert run_finetune_job(sqlite_settings, job_id, "w1") == "succeeded"
    (call,) = spy.calls
    train = labels_by_sha(call["train"])
    assert list(call["train"].classes) == sorted(CLASSES)  # no "zebra"
    assert len(train) == 6 * len(CLASSES)  # none of the 12 added
    sha, label = changed["relabelled"]
    assert train[sha] == label  # the label it had when the job was created
    assert changed["deleted"] in train  # deleted later: still in the pinned version
    assert len(call["val"]) == 2 * len(CLASSES)

    job = job_row(sqlite_settings, job_id)
    with TestClient(create_app(sqlite_settings)) as client:
        headers = {"Authorization": f"Bearer {new_key(sqlite_settings)}"}
        model = client.get(f"/v1/models/{job.model_id}", headers=headers).json()
        listed = client.get(f"/v1/datasets/{job.dataset_id}/versions", headers=headers).json()
    assert model["plan"]["dataset_version"] == 1
    assert model["plan"]["dataset_version_id"] == before["dataset_version_id"]
    assert model["plan"]["dataset_id"] == job.dataset_id
    assert [v["number"] for v in listed["items"]] == [4, 3, 2, 1]  # append, relabel, delete


def test_a_resumed_run_sees_the_same_images(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    spy.stop_first_after = 3
    job_id = queue_class_images(sqlite_settings, per_class=8, total_steps=6, eval_every=2)
    # The first run stops as for a worker shutdown: checkpointed and requeued.
    monkeypatch.setattr(worker.runner, "shutdown_requested", lambda: len(spy.calls) == 1)
    assert run_finetune_job(sqlite_settings, job_id, "w1") == "requeued"
    change_dataset(sqlite_settings, job_id)  # between the crash and the resume
    assert run_finetune_job(sqlite_settings, job_id, "w2") == "succeeded"

    first, second = spy.calls
    assert first["train"] == second["train"] and first["val"] == second["val"]
    assert labels_by_sha(first["train"]) == labels_by_sha(second["train"])
