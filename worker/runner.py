"""Runs one fine-tuning job by id: train (resuming from its checkpoint), register the
model. The claim, heartbeat and failure handling around it are worker.job_run's.

The images come from the job's params, not from the dataset's state now: the dataset
version pinned at creation (`dataset_version_id`: its images, labels and splits), its
`train` split less the held-out ids the job recorded, validated on those ids, so a resumed
run sees the same images even if the dataset changed, and a held-out image never trains.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from bit_core.checkpoint import sha256_file, weights_file_of
from bit_core.data import LabeledImages
from bit_core.hyperrule import Plan
from bit_core.recipe import QualityOptions, resolve_base, run_finetune
from bit_core.train import RunConfig
from service.datasets.service import labeled_images
from service.db.artifacts import ArtifactStore
from service.db.models import Job
from service.models.bases import ArtifactBaseStore
from service.models.service import add_model, model_row
from service.settings import Settings
from worker.job_run import (
    ProgressWriter,
    RunState,
    end_stopped_run,
    finish_succeeded,
    run_job,
)
from worker.metrics import StepTimer
from worker.shutdown import shutdown_requested

CHECKPOINT_FILE = "state.safetensors"


def checkpoint_key(job: Job) -> str:
    return f"jobs/{job.id}/{CHECKPOINT_FILE}"


def finetune_checkpoint(store: ArtifactStore, job: Job) -> Path:
    """The job's checkpoint in this host's work folder, fetched from the store: the store's
    copy is the truth (the last run may have been on another host)."""
    path = store.local_dir(f"jobs/{job.id}") / CHECKPOINT_FILE
    if not store.fetch_file(checkpoint_key(job), path):
        path.unlink(missing_ok=True)  # a local leftover the store never got: start afresh
    return path


def run_finetune_job(settings: Settings, job_id: int, owner: str) -> str:
    """Run fine-tuning job `job_id` if it can be claimed (resuming from its checkpoint)."""
    return run_job(
        settings,
        job_id,
        owner,
        checkpoint_for=finetune_checkpoint,
        execute=_train_and_register,
    )


def job_images(
    session: Session, store: ArtifactStore, job: Job
) -> tuple[LabeledImages, LabeledImages | None]:
    """(train, held-out) images of a fine-tuning job, as its params fixed them at creation."""
    assert job.dataset_id is not None, "fine-tuning jobs always have a dataset"
    held_out = job.params.get("holdout", {}).get("val_image_ids", [])
    # Jobs created before dataset versions existed have none: the dataset as it is.
    version = job.params.get("dataset_version_id")
    train = labeled_images(
        session,
        store,
        job.dataset_id,
        split="train",
        exclude_ids=held_out,
        version_id=version,
    )
    if not held_out:
        return train, None
    val = labeled_images(
        session,
        store,
        job.dataset_id,
        image_ids=held_out,
        classes=train.classes,
        version_id=version,
    )
    return train, val


def job_seed(job: Job) -> int:
    """The seed of every random draw of the job's run: its `seed` override, else its id
    (jobs created before the override existed have no `seed` in their params)."""
    return int(job.params.get("seed", job.id))


def dataset_version_of(job: Job) -> dict[str, object] | None:
    """The dataset version the job pinned, for its model's provenance."""
    if "dataset_version_id" not in job.params:
        return None
    return {
        "dataset_id": job.dataset_id,
        "dataset_version_id": job.params["dataset_version_id"],
        "dataset_version": job.params.get("dataset_version"),
    }


def _train_and_register(
    session: Session,
    settings: Settings,
    store: ArtifactStore,
    job: Job,
    owner: str,
    state: RunState,
    checkpoint: Path,
) -> str:
    plan = Plan.from_dict(job.params)
    train, val = job_images(session, store, job)
    if list(train.classes) != job.params.get("classes", list(train.classes)):
        raise ValueError(
            f"the dataset's classes changed since job {job.id} was created; create a new job"
        )
    progress = ProgressWriter(session, settings, job, owner, state)
    base = resolve_base(job.base_model, settings.weights_dir)
    model_key = f"jobs/{job.id}/model"
    model_dir = store.local_dir(model_key)
    result, info = run_finetune(
        train,
        base,
        plan,
        model_dir,
        config=RunConfig(
            seed=job_seed(job),
            deterministic=settings.deterministic,
            device=settings.device,
            precision=settings.precision,
            checkpoint_every=settings.checkpoint_every,
        ),
        val=val,
        quality=QualityOptions(
            eval_every=int(job.params.get("eval_every", 0)),
            calibrate=bool(job.params.get("calibrate", False)),
            seed=job_seed(job),
        ),
        checkpoint_path=checkpoint,
        on_progress=StepTimer(job.kind).wrap(progress),
        should_stop=state.should_stop,
        on_checkpoint=lambda path: store.put_file(checkpoint_key(job), path),
        on_validation=progress.validation,
        dataset_version=dataset_version_of(job),
        bases=ArtifactBaseStore(store),
    )
    if state.lease_lost:
        return "lease_lost"  # another run owns the job now; leave everything to it
    # Validations written as they happened are skipped; any missed (the database was
    # unreachable) or run before a crash (the checkpoint keeps them) are written now.
    progress.validations(result.evaluations)
    if info is None:
        return end_stopped_run(
            session,
            settings,
            job,
            owner,
            shutting_down=not state.cancelled and shutdown_requested(),
        )
    weights = model_dir / weights_file_of(info)  # a shared linear model: its head alone
    if sha256_file(weights) != info.sha256:
        raise OSError(f"model file of job {job.id} is corrupt after writing; retry the job")
    # Files first, manifest last: no host loads the model before all of it is stored.
    store.publish_dir(model_key, model_dir)
    model = model_row(info, job=job, uri=model_key, size_bytes=weights.stat().st_size)
    if "dataset_version_id" in job.params:  # the model records the data it learned from
        model.plan = {
            **model.plan,
            "dataset_id": job.dataset_id,
            "dataset_version_id": job.params["dataset_version_id"],
            "dataset_version": job.params.get("dataset_version"),
        }
    add_model(session, model)  # the next version of its name
    job.model_id = model.id
    job.metrics = info.metrics
    job.step = result.steps_done
    job.progress = 1.0
    return finish_succeeded(session, job, owner)
