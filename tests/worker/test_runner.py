"""The job runner in-process (no broker): success, cancel between steps, failures, webhook,
and a duplicate delivery while a live run holds the lease."""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select

import worker.runner
from service.db.models import Image, Job, JobMetric, Model, utcnow
from service.db.session import session_scope
from service.settings import Settings
from service.webhooks import verify
from tests.factories import CLASS_STYLES
from tests.polling import wait_for
from tests.worker.conftest import (
    WEBHOOKS,
    delivery_ids,
    job_row,
    queue_finetune,
    styled_items,
)
from tests.worker.webhook_receiver import webhook_receiver
from worker.runner import run_finetune_job
from worker.webhook import deliver

PLAN = {"batch_size": 8, "total_steps": 8, "base_lr": 0.01, "precrop": 40, "crop": 32}


def make_job(settings: Settings, *, callback_url: str | None = None, steps: int = 8) -> int:
    return queue_finetune(
        settings,
        styled_items(range(3)),
        overrides={**PLAN, "total_steps": steps},
        callback_url=callback_url,
    )


def test_a_job_runs_and_registers_its_model(sqlite_settings: Settings):
    job_id = make_job(sqlite_settings)
    assert run_finetune_job(sqlite_settings, job_id, "w1") == "succeeded"
    job = job_row(sqlite_settings, job_id)
    assert job.status == "succeeded" and job.step == 8 and job.progress == 1.0
    assert job.lease_owner is None and job.attempts == 1
    with session_scope(sqlite_settings.database_url) as session:
        model = session.get(Model, job.model_id)
        assert model is not None and model.classes == sorted(CLASS_STYLES)
        weights = Path(sqlite_settings.artifacts_url) / model.uri / "weights.safetensors"
        assert hashlib.sha256(weights.read_bytes()).hexdigest() == model.sha256
        steps = session.scalars(select(JobMetric.step).where(JobMetric.job_id == job_id)).all()
        assert steps and steps[-1] == 8
    assert run_finetune_job(sqlite_settings, job_id, "w2") == "skipped"  # a late duplicate


def test_cancel_stops_a_running_job_between_steps(sqlite_settings: Settings):
    settings = sqlite_settings.model_copy(update={"progress_every_s": 0.0})
    job_id = make_job(settings, steps=400)
    outcome: list[str] = []
    runner = threading.Thread(
        target=lambda: outcome.append(run_finetune_job(settings, job_id, "w1"))
    )
    runner.start()
    wait_for(lambda: job_row(settings, job_id).step >= 2, 120, "two steps")
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.cancel_requested, job.status = True, "cancelling"
    runner.join(timeout=120)
    assert outcome == ["cancelled"]
    job = job_row(settings, job_id)
    assert job.status == "cancelled" and 2 <= job.step < 400 and job.model_id is None


def test_a_corrupt_stored_image_fails_the_job_with_a_code(sqlite_settings: Settings):
    job_id = make_job(sqlite_settings)
    with session_scope(sqlite_settings.database_url) as session:
        uri = session.scalars(select(Image.uri)).first()
    (Path(sqlite_settings.artifacts_url) / str(uri)).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert run_finetune_job(sqlite_settings, job_id, "w1") == "failed"
    job = job_row(sqlite_settings, job_id)
    assert job.status == "failed" and job.error_code == "invalid_image"
    assert job.traceback is None and "send a JPEG, PNG" in (job.error or "")
    assert (job.error or "").startswith(f"{next(iter(CLASS_STYLES))}-0.png")  # as uploaded


def test_a_live_lease_makes_a_duplicate_delivery_skip(sqlite_settings: Settings):
    job_id = make_job(sqlite_settings)
    with session_scope(sqlite_settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.lease_owner, job.lease_expires_at = "other", utcnow() + dt.timedelta(seconds=60)
    assert run_finetune_job(sqlite_settings, job_id, "w1") == "skipped"
    assert job_row(sqlite_settings, job_id).status == "queued"


def test_the_result_is_posted_signed(sqlite_settings: Settings):
    settings = sqlite_settings.model_copy(update=WEBHOOKS)
    with webhook_receiver() as receiver:
        job_id = make_job(settings, callback_url=receiver.url)
        assert run_finetune_job(settings, job_id, "w1") == "succeeded"
        (delivery_id,) = delivery_ids(settings, job_id)
        assert deliver(settings, delivery_id, "w1") == "delivered"
    (received,) = receiver.received
    assert verify([WEBHOOKS["webhook_secret"]], received.signature, received.body)
    payload = received.payload
    assert payload["job_id"] == job_id and payload["status"] == "succeeded" and payload["model_id"]
    assert payload["type"] == "job.succeeded" and payload["id"] == received.event_id
    assert job_row(settings, job_id).callback_status == "delivered"


def test_the_precision_setting_reaches_the_training_run(
    sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
):
    seen: list[str] = []
    train = worker.runner.run_finetune

    def recording(*args: Any, **kwargs: Any) -> Any:  # a spy: the real run goes on
        seen.append(kwargs["config"].precision)
        return train(*args, **kwargs)

    monkeypatch.setattr(worker.runner, "run_finetune", recording)
    settings = sqlite_settings.model_copy(update={"precision": "bf16"})
    job_id = make_job(settings, steps=5)
    assert run_finetune_job(settings, job_id, "w1") == "succeeded"
    assert seen == ["bf16"]


def test_an_unknown_precision_is_refused_at_startup(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BIT_PRECISION", "fp16")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert "precision" in str(refused.value) and "bf16" in str(refused.value)


def test_jobs_of_one_model_name_register_versions_1_and_2(sqlite_settings: Settings):
    job_ids = [make_job(sqlite_settings, steps=5) for _ in range(2)]
    with session_scope(sqlite_settings.database_url) as session:
        for job_id in job_ids:  # what POST /v1/finetune stores for `model_name`
            job = session.get(Job, job_id)
            assert job is not None
            job.params = {**job.params, "model_name": "parts"}
    for job_id in job_ids:
        assert run_finetune_job(sqlite_settings, job_id, "w1") == "succeeded"
    with session_scope(sqlite_settings.database_url) as session:
        models = [session.get(Model, job_row(sqlite_settings, j).model_id) for j in job_ids]
        assert [(m.name, m.version) for m in models if m is not None] == [
            ("parts", 1),
            ("parts", 2),
        ]
