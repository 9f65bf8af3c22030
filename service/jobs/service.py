"""Job service functions: create (commit, then enqueue), read, cancel, retry.

A fine-tuning job fixes at creation which images measure it: the dataset's `val` images,
or else a stratified, seeded share of its `train` images when every class has enough
(bit_core.holdout). Their ids are in the job's params, so every run of the job (a resume
too) trains on the same images, and the held-out ones never train. `test` images never
train and never validate: they are for evaluations.
"""

from __future__ import annotations

import statistics
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bit_core.holdout import DEFAULT_HOLDOUT_FRACTION, holdout_split
from bit_core.hyperrule import OVERRIDABLE, hyperrule
from bit_core.recipe import BaseModelNotInstalled, resolve_base
from service.audit import record
from service.auth import Principal, require_visible
from service.datasets.service import current_version
from service.db.models import (
    Dataset,
    DatasetVersionImage,
    Image,
    Job,
    JobEvent,
    JobMetric,
    utcnow,
)
from service.errors import ApiError
from service.jobs import lifecycle
from service.jobs.lifecycle import add_event
from service.jobs.status import RETRYABLE, TERMINAL, JobStatus
from service.queueing import enqueue_job
from service.quotas import check_new_job
from service.settings import Settings
from service.webhooks.outbox import send_pending
from service.webhooks.service import check_callback_url


def resolve_base_model(settings: Settings, name: str) -> tuple[str, str]:
    """(base name, architecture), or a 422 that says how to install a missing base."""
    try:
        base = resolve_base(name, settings.weights_dir)
    except BaseModelNotInstalled as exc:
        raise ApiError(422, "base_model_not_installed", str(exc)) from exc
    except ValueError as exc:
        raise ApiError(422, "unknown_base_model", str(exc)) from exc
    return base.name, base.arch


def _visible_dataset(session: Session, principal: Principal, dataset_id: int) -> Dataset:
    return require_visible(principal, session.get(Dataset, dataset_id), "dataset", dataset_id)


def _members(dataset_id: int, version_id: int | None) -> tuple[Any, Any, Any, Any]:
    """(image id, label, split columns, where clause) of a dataset version's images, or of
    the dataset's rows as they are when `version_id` is None."""
    if version_id is None:
        return Image.id, Image.label, Image.split, Image.dataset_id == dataset_id
    member = DatasetVersionImage
    return member.image_id, member.label, member.split, member.version_id == version_id


# Overrides of how a job measures its model, not of the HyperRule plan.
QUALITY_OVERRIDES = ("holdout_fraction", "eval_every", "calibrate")
# Overrides of how a job draws its random numbers.
SEED_OVERRIDE = "seed"


def resolve_plan(
    session: Session,
    settings: Settings,
    *,
    dataset_id: int,
    arch: str,
    mode: str,
    overrides: dict[str, Any],
    held_out: int = 0,
    version_id: int | None = None,
) -> dict[str, Any]:
    """The HyperRule plan for a dataset's `train` images (less `held_out` of them: the
    schedule follows the images that really train), with the caller's overrides recorded.
    With `version_id`, the images of that version of the dataset."""
    image_id, label_col, split_col, where = _members(dataset_id, version_id)
    counts: dict[str, int] = dict(
        session.execute(
            select(label_col, func.count()).where(where, split_col == "train").group_by(label_col)
        ).all()
    )
    small = {label: n for label, n in counts.items() if n < settings.min_images_per_class}
    if len(counts) < 2 or small:
        raise ApiError(
            422,
            "too_few_images",
            f"fine-tuning needs at least 2 classes with {settings.min_images_per_class}+ images "
            f"each; this dataset has {counts or 'no images'}; add images to "
            f"{sorted(small) or 'more classes'}",
        )
    sizes_query = select(Image.height, Image.width).where(Image.dataset_id == dataset_id)
    if version_id is not None:
        sizes_query = sizes_query.where(Image.id == image_id, where)
    sizes = session.execute(sizes_query.limit(1000)).all()
    typical = (
        int(statistics.median(h for h, _ in sizes)),
        int(statistics.median(w for _, w in sizes)),
    )
    accepted = [name for name in OVERRIDABLE if name != "mode"]
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ApiError(
            422,
            "invalid_overrides",
            f"unknown override(s) {unknown}; accepted: {', '.join(accepted)}",
        )
    try:
        plan = hyperrule(
            sum(counts.values()) - held_out, typical, arch=arch, mode=mode, **overrides
        )
    except (TypeError, ValueError) as exc:
        raise ApiError(422, "invalid_overrides", f"invalid plan override: {exc}") from exc
    data = plan.to_dict()
    data["classes"] = sorted(counts)
    return data


def choose_holdout(
    session: Session,
    *,
    dataset_id: int,
    classes: list[str],
    fraction: float,
    seed: int,
    version_id: int | None = None,
) -> dict[str, Any]:
    """The images that measure a job and never train it.

    The dataset's `val` images (of the job's classes) if it has any (source "split");
    else a stratified, seeded `fraction` of its `train` images when every class has
    enough of them (source "auto"); else none (source "none": the model then gets a
    cross-validated estimate instead). With `version_id`, from that version's images.
    """
    image_id, label_col, split_col, where = _members(dataset_id, version_id)
    rows = session.execute(
        select(image_id, label_col, split_col)
        .where(where, split_col.in_(("train", "val")))
        .order_by(image_id)
    ).all()
    known = set(classes)
    val = [image_id for image_id, label, split in rows if split == "val" and label in known]
    train = [(image_id, label) for image_id, label, split in rows if split == "train"]
    if val:
        share = round(len(val) / (len(val) + len(train)), 4)
        return {"source": "split", "fraction": share, "seed": seed, "val_image_ids": val}
    index = {name: i for i, name in enumerate(classes)}
    chosen = holdout_split([index[label] for _, label in train], fraction=fraction, seed=seed)
    if chosen is None:
        return {"source": "none", "fraction": fraction, "seed": seed, "val_image_ids": []}
    held = sorted(train[i][0] for i in chosen[1])
    return {"source": "auto", "fraction": fraction, "seed": seed, "val_image_ids": held}


def default_eval_every(mode: str, total_steps: int, has_val: bool) -> int:
    """Steps between validations: about ten per full run (none without held-out images,
    and none in linear mode, which is measured once, at the end)."""
    if mode != "full" or not has_val:
        return 0
    return max(10, total_steps // 10)


def create_finetune_job(
    session: Session,
    settings: Settings,
    *,
    principal: Principal,
    dataset_id: int,
    base_model: str | None,
    mode: str,
    overrides: dict[str, Any],
    callback_url: str | None,
    model_name: str | None = None,
) -> Job:
    """Validate, resolve the plan, commit the job row, then enqueue it (in that order)."""
    callback_url = check_callback_url(settings, callback_url)
    dataset = _visible_dataset(session, principal, dataset_id)
    base_name, arch = resolve_base_model(settings, base_model or settings.default_base_model)
    quality = {key: overrides[key] for key in QUALITY_OVERRIDES if key in overrides}
    seed_override = overrides.get(SEED_OVERRIDE)
    overrides = {
        key: value
        for key, value in overrides.items()
        if key not in QUALITY_OVERRIDES and key != SEED_OVERRIDE
    }
    # The job pins the dataset as it is now: later changes make new versions it never sees.
    version = current_version(session, dataset.id)
    plan = resolve_plan(
        session,
        settings,
        dataset_id=dataset.id,
        arch=arch,
        mode=mode,
        overrides=overrides,
        version_id=version.id,
    )
    check_new_job(session, settings, tenant=dataset.tenant, kind="finetune")
    job = Job(
        tenant=dataset.tenant,
        kind="finetune",
        status=JobStatus.QUEUED,
        dataset_id=dataset.id,
        base_model=base_name,
        mode=mode,
        params=plan,
        total_steps=plan["total_steps"] if mode == "full" else 0,
        callback_url=callback_url,
        enqueued_at=utcnow(),
    )
    session.add(job)
    session.flush()  # the id is the job's default seed: of its hold-out, as of its run
    seed = job.id if seed_override is None else int(seed_override)
    fraction = quality.get("holdout_fraction")
    holdout = choose_holdout(
        session,
        dataset_id=dataset.id,
        classes=plan["classes"],
        fraction=DEFAULT_HOLDOUT_FRACTION if fraction is None else float(fraction),
        seed=seed,
        version_id=version.id,
    )
    if holdout["source"] == "auto":
        plan = resolve_plan(
            session,
            settings,
            dataset_id=dataset.id,
            arch=arch,
            mode=mode,
            overrides=overrides,
            held_out=len(holdout["val_image_ids"]),
            version_id=version.id,
        )
    total_steps = plan["total_steps"] if mode == "full" else 0
    eval_every = quality.get("eval_every")
    if eval_every is None:
        eval_every = default_eval_every(mode, total_steps, bool(holdout["val_image_ids"]))
    job.params = {
        **plan,
        "seed": seed,
        "holdout": holdout,
        "dataset_version_id": version.id,
        "dataset_version": version.number,
        "eval_every": int(eval_every),
        "calibrate": bool(quality.get("calibrate", False)),
        **({"model_name": model_name} if model_name else {}),
    }
    job.total_steps = total_steps
    add_event(session, job, "created")
    session.commit()  # the row exists before any worker can see the message
    send(session, settings, job)
    return job


def send(session: Session, settings: Settings, job: Job) -> None:
    """Enqueue 'run job N'. A broker outage is not fatal: the reconciler re-sends."""
    try:
        enqueue_job(settings, job.id, job.kind)
    except Exception as exc:  # kombu raises many kinds; the job stays queued either way
        add_event(session, job, "enqueue_failed", detail=f"{type(exc).__name__}: {exc}")
    else:
        job.enqueued_at = utcnow()
    session.commit()


def get_job(session: Session, *, principal: Principal, job_id: int) -> Job:
    return require_visible(principal, session.get(Job, job_id), "job", job_id)


def list_jobs(
    session: Session,
    *,
    principal: Principal,
    status: str | None,
    kind: str | None,
    limit: int,
    offset: int,
) -> tuple[list[Job], int]:
    query = select(Job)
    if not principal.is_admin:
        query = query.where(Job.tenant == principal.tenant)
    if status:
        query = query.where(Job.status == status)
    if kind:
        query = query.where(Job.kind == kind)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Job.id.desc()).limit(limit).offset(offset)).all()
    return list(rows), total


def cancel_job(session: Session, settings: Settings, *, principal: Principal, job_id: int) -> Job:
    """Queued jobs stop at once (their webhook is sent); running ones are asked to stop
    between steps."""
    job = get_job(session, principal=principal, job_id=job_id)
    if job.status in TERMINAL:
        raise ApiError(409, "job_finished", f"job {job.id} already ended ({job.status})")
    was = job.status
    job.cancel_requested = True
    # Unleased and queued: no run will see the flag, so the job ends now. Leased but still
    # queued: the run that claimed it finds the flag and cancels it.
    if not lifecycle.cancel_queued(session, job):
        lifecycle.request_cancel(session, job)
    record(
        session,
        principal,
        "job.cancel",
        tenant=job.tenant,
        target=f"job {job.id}",
        detail={"from": was, "to": job.status},
    )
    session.commit()
    send_pending(session, settings, job.id)  # a job cancelled while queued calls back now
    return job


def retry_job(session: Session, settings: Settings, *, principal: Principal, job_id: int) -> Job:
    """Re-run a failed or cancelled job; it resumes from its last checkpoint if any."""
    job = get_job(session, principal=principal, job_id=job_id)
    was = job.status
    if job.status in RETRYABLE:  # queued again, it counts as a new job would
        check_new_job(session, settings, tenant=job.tenant, kind=job.kind)
    if job.status not in RETRYABLE or not lifecycle.retry(session, job):
        raise ApiError(
            409,
            "job_not_retryable",
            f"job {job.id} is {job.status}; only failed or cancelled jobs can be retried",
        )
    record(
        session,
        principal,
        "job.retry",
        tenant=job.tenant,
        target=f"job {job.id}",
        detail={"from": was},
    )
    session.commit()
    send(session, settings, job)
    return job


def job_curves(session: Session, job_id: int, *, limit: int = 2000) -> list[JobMetric]:
    return list(
        session.scalars(
            select(JobMetric)
            .where(JobMetric.job_id == job_id)
            .order_by(JobMetric.step)
            .limit(limit)
        )
    )


def job_events(session: Session, job_id: int) -> list[JobEvent]:
    return list(
        session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
    )
