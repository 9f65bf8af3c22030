"""Runs one evaluation job by id: the model's probabilities (its temperature applied) on
the images the evaluation pinned, then the classification report, stored on the
evaluation. The claim, heartbeat and failure handling around it are worker.job_run's.

An evaluation is one pass without a checkpoint: a redelivered one starts over. It runs in
slices, so a cancel or a lost lease stops it within a slice, and the job shows progress.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from bit_core.checkpoint import load_model
from bit_core.data import LabeledImages
from bit_core.device import resolve_device
from bit_core.evaluate import predict_logits
from bit_core.quality import classification_report, scaled_probabilities
from service.datasets.service import labeled_images
from service.db.artifacts import ArtifactStore
from service.db.models import Evaluation, Job, Model
from service.jobs.lifecycle import record_progress
from service.models.bases import ArtifactBaseStore
from service.settings import Settings
from worker.job_run import RunState, end_stopped_run, finish_succeeded, run_job
from worker.shutdown import shutdown_requested

# Images per slice: between two slices the run looks for a cancel and records progress.
SLICE = 256
# The summary copied onto the job's metrics (the full report lives on the evaluation).
SUMMARY = ("count", "top1", "top5", "map", "macro_f1")


def no_checkpoint(store: ArtifactStore, job: Job) -> Path:
    """A path that never exists: an evaluation keeps no checkpoint, so every run starts."""
    return store.local_dir(f"jobs/{job.id}") / "no-checkpoint"


def run_evaluation_job(settings: Settings, job_id: int, owner: str) -> str:
    """Run evaluation job `job_id` if it can be claimed."""
    return run_job(settings, job_id, owner, checkpoint_for=no_checkpoint, execute=_evaluate)


def _slice(images: LabeledImages, start: int, stop: int) -> LabeledImages:
    return replace(
        images,
        sources=images.sources[start:stop],
        labels=images.labels[start:stop],
        names=images.names[start:stop],
    )


def _evaluate(
    session: Session,
    settings: Settings,
    store: ArtifactStore,
    job: Job,
    owner: str,
    state: RunState,
    checkpoint: Path,
) -> str:
    evaluation = session.scalar(select(Evaluation).where(Evaluation.job_id == job.id))
    model_row = session.get(Model, evaluation.model_id) if evaluation is not None else None
    if evaluation is None or model_row is None:
        raise ValueError(f"job {job.id}: its evaluation or model was deleted; nothing to evaluate")
    assert evaluation.dataset_id is not None, "a dataset in use by an active job is kept"
    images = labeled_images(
        session,
        store,
        evaluation.dataset_id,
        split=evaluation.split,
        up_to_id=job.params.get("up_to_image_id"),
        classes=model_row.classes,
    )
    model, info = load_model(store.fetch_dir(model_row.uri), bases=ArtifactBaseStore(store))
    if info.sha256 != model_row.sha256:
        raise ValueError(
            f"the stored files of model {model_row.id} are not the ones it was registered "
            "with; an operator must restore them"
        )
    device = resolve_device(settings.device)
    model.to(device).eval()
    logits: list[torch.Tensor] = []
    began, stopped = time.monotonic(), False
    for start in range(0, len(images), SLICE):
        if state.should_stop():
            stopped = True
            break
        part = _slice(images, start, start + SLICE)
        logits.append(
            predict_logits(model, part, info.crop, device=device, precision=settings.precision)
        )
        done = start + len(part)
        rate = done / max(time.monotonic() - began, 1e-9)
        record_progress(
            session,
            job,
            owner,
            step=done,
            total_steps=len(images),
            progress=done / len(images),
            images_per_s=rate,
            eta_s=(len(images) - done) / rate,
        )
        session.commit()
    if state.lease_lost:
        return "lease_lost"  # another run owns the job now
    if stopped:
        return end_stopped_run(
            session,
            settings,
            job,
            owner,
            shutting_down=not state.cancelled and shutdown_requested(),
        )
    probabilities = scaled_probabilities(torch.cat(logits).cpu(), model_row.temperature)
    report: dict[str, Any] = classification_report(
        probabilities, list(images.labels), list(images.classes)
    )
    evaluation.results = {**report, "temperature": model_row.temperature}
    job.metrics = {name: report[name] for name in SUMMARY} | {"evaluation_id": evaluation.id}
    job.progress = 1.0
    return finish_succeeded(session, job, owner)
