"""Hold-out through the real worker code path (a tiny model, in-process): the held-out
images never train, the plan records them, a full job's validation curve fills, a resumed
run sees the same split, and a dataset too small to hold out gets a cross-validated
estimate."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

import worker.runner
from bit_core.data import LabeledImages
from service.app import create_app
from service.db.models import Image, JobEvent, JobMetric
from service.db.session import session_scope
from service.settings import Settings
from tests.factories import CLASSES
from tests.service.conftest import new_key
from tests.worker.conftest import Spy, job_row, queue_class_images
from worker.runner import run_finetune_job

pytestmark = pytest.mark.slow


def image_sha(settings: Settings, ids: list[int]) -> set[str]:
    with session_scope(settings.database_url) as session:
        return set(session.scalars(select(Image.sha256).where(Image.id.in_(ids))))


def shas(images: LabeledImages) -> set[str]:
    """The stored images' sha256 (a local store's files are named by it)."""
    return {Path(str(source)).name for source in images.sources}


def test_the_hold_out_never_trains_and_the_curve_fills(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    job_id = queue_class_images(sqlite_settings, per_class=8, total_steps=6, eval_every=2)
    holdout = job_row(sqlite_settings, job_id).params["holdout"]
    assert holdout["source"] == "auto" and holdout["seed"] == job_id
    assert holdout["fraction"] == 0.2 and len(holdout["val_image_ids"]) == 2 * len(CLASSES)

    assert run_finetune_job(sqlite_settings, job_id, "w1") == "succeeded"
    (call,) = spy.calls
    held = image_sha(sqlite_settings, holdout["val_image_ids"])
    assert len(call["train"]) == 6 * len(CLASSES) and not shas(call["train"]) & held
    assert spy.iterated and all(not shas(data) & held for data in spy.iterated)
    assert shas(call["val"]) == held and call["val"].classes == call["train"].classes
    assert call["quality"].eval_every == 2 and call["quality"].seed == job_id

    job = job_row(sqlite_settings, job_id)
    assert job.params["num_examples"] == 6 * len(CLASSES)  # the schedule's own count
    with session_scope(sqlite_settings.database_url) as session:
        curve = session.execute(
            select(JobMetric.id, JobMetric.step, JobMetric.val_top1)
            .where(JobMetric.job_id == job_id, JobMetric.val_top1.is_not(None))
            .order_by(JobMetric.step)
        ).all()
        last_step = session.scalar(
            select(JobMetric.id)
            .where(JobMetric.job_id == job_id, JobMetric.loss.is_not(None))
            .order_by(JobMetric.id.desc())
            .limit(1)
        )
    assert [step for _, step, _ in curve] == [2, 4, 6]
    assert all(0.0 <= top1 <= 1.0 for _, _, top1 in curve)
    assert last_step is not None and curve[0].id < last_step  # written as the run went on

    with TestClient(create_app(sqlite_settings)) as client:
        headers = {"Authorization": f"Bearer {new_key(sqlite_settings)}"}
        model = client.get(f"/v1/models/{job.model_id}", headers=headers).json()
        shown = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert model["quality"]["kind"] == "holdout" and model["quality"]["count"] == 6
    assert "report" not in model["quality"] and "held-out" in model["quality"]["label"]
    assert shown["plan"]["holdout"] == holdout
    assert [p["val_top1"] for p in shown["curves"] if p["val_top1"] is not None]


def test_a_resumed_run_sees_the_same_split(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    spy.stop_first_after = 3
    job_id = queue_class_images(sqlite_settings, per_class=8, total_steps=6, eval_every=2)
    # The first run stops as for a worker shutdown: checkpointed and requeued.
    monkeypatch.setattr(worker.runner, "shutdown_requested", lambda: len(spy.calls) == 1)
    assert run_finetune_job(sqlite_settings, job_id, "w1") == "requeued"
    assert run_finetune_job(sqlite_settings, job_id, "w2") == "succeeded"

    first, second = spy.calls
    assert first["train"] == second["train"] and first["val"] == second["val"]
    held = image_sha(
        sqlite_settings, job_row(sqlite_settings, job_id).params["holdout"]["val_image_ids"]
    )
    assert not shas(second["train"]) & held
    with session_scope(sqlite_settings.database_url) as session:
        kinds = session.scalars(
            select(JobEvent.kind).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        ).all()
        steps = session.scalars(
            select(JobMetric.step).where(
                JobMetric.job_id == job_id, JobMetric.val_top1.is_not(None)
            )
        ).all()
    assert "resumed" in kinds
    assert sorted(steps) == [2, 4, 6]  # validated before and after the stop, once each


def test_val_images_are_the_hold_out_and_test_images_never_train(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    job_id = queue_class_images(
        sqlite_settings, per_class=5, splits={3: "val", 4: "test"}, mode="linear"
    )
    holdout = job_row(sqlite_settings, job_id).params["holdout"]
    assert holdout["source"] == "split" and len(holdout["val_image_ids"]) == len(CLASSES)
    assert run_finetune_job(sqlite_settings, job_id, "w1") == "succeeded"
    (call,) = spy.calls
    with session_scope(sqlite_settings.database_url) as session:
        by_split = {
            split: set(session.scalars(select(Image.sha256).where(Image.split == split)))
            for split in ("train", "val", "test")
        }
    assert shas(call["train"]) == by_split["train"]
    assert shas(call["val"]) == by_split["val"]
    assert not by_split["test"] & (shas(call["train"]) | shas(call["val"]))
    metrics = job_row(sqlite_settings, job_id).metrics
    assert metrics["quality"]["kind"] == "holdout" and metrics["quality"]["count"] == len(CLASSES)


def test_too_few_images_give_a_cross_validated_estimate(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(monkeypatch)
    job_id = queue_class_images(sqlite_settings, per_class=4, mode="linear")
    job = job_row(sqlite_settings, job_id)
    assert job.params["holdout"]["source"] == "none" and job.params["eval_every"] == 0
    assert run_finetune_job(sqlite_settings, job_id, "w1") == "succeeded"
    (call,) = spy.calls
    assert call["val"] is None and len(call["train"]) == 4 * len(CLASSES)
    with TestClient(create_app(sqlite_settings)) as client:
        headers = {"Authorization": f"Bearer {new_key(sqlite_settings)}"}
        model_id = job_row(sqlite_settings, job_id).model_id
        quality = client.get(f"/v1/models/{model_id}", headers=headers).json()["quality"]
    assert quality["kind"] == "cross_validated" and "estimate" in quality["label"]
    assert "top1_std" in quality and quality["count"] == 4 * len(CLASSES)
