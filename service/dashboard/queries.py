"""Read-only queries behind the dashboard's pages (an admin sees every tenant's rows)."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import (
    Dataset,
    Evaluation,
    Image,
    Job,
    JobMetric,
    Model,
    Worker,
    utcnow,
)
from service.jobs.status import JobStatus
from service.queueing import celery_client
from service.settings import QUEUES, Settings

log = logging.getLogger(__name__)

STATUSES: tuple[str, ...] = tuple(JobStatus)
KINDS = ("finetune", "pretrain", "evaluate")
ALIVE_BEATS = 3  # a worker missing this many reconcile beats is shown as gone


def aware(moment: dt.datetime | None) -> dt.datetime | None:
    """SQLite drops the zone of stored timestamps; every timestamp here is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=dt.UTC)


# --- overview --------------------------------------------------------------------------------


def job_counts(session: Session) -> dict[str, dict[str, int]]:
    """Jobs per kind and status, every status present (0 where none)."""
    counts = {kind: dict.fromkeys(STATUSES, 0) for kind in KINDS}
    rows = session.execute(
        select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
    )
    for kind, status, count in rows:
        counts.setdefault(kind, dict.fromkeys(STATUSES, 0))[status] = count
    return counts


def _depths(app: Celery) -> dict[str, int]:
    # Not passive: a virtual transport (Redis) knows a queue only once this channel has
    # declared it, and declaring one of our own queues again is harmless.
    depths = {}
    with app.connection_for_read() as connection:
        # Fail fast: a page must not hang for the broker's long default retry schedule.
        connection.ensure_connection(max_retries=1, interval_start=0, timeout=3)
        channel = connection.default_channel
        for queue in app.conf.task_queues:
            depths[queue.name] = queue(channel).queue_declare().message_count
    return depths


def queue_depths(settings: Settings) -> dict[str, int | None]:
    """Messages waiting in the finetune and pretrain queues; None where the broker is down."""
    try:
        depths = _depths(celery_client(settings))
    except Exception:  # kombu raises many kinds; the page shows "unreachable"
        log.warning("queue depths unavailable", exc_info=True)
        return dict.fromkeys(QUEUES)
    return {name: depths.get(name) for name in QUEUES}


@dataclass(frozen=True)
class WorkerRow:
    name: str
    host: str
    device: str
    queues: str
    current_job_id: int | None
    last_seen: dt.datetime
    seconds_ago: float
    alive: bool


def workers(session: Session, settings: Settings) -> list[WorkerRow]:
    """Workers by last heartbeat, newest first; alive if seen within 3 reconcile beats."""
    now = utcnow()
    window = ALIVE_BEATS * settings.reconcile_every_s
    rows = []
    for worker in session.scalars(select(Worker).order_by(Worker.last_seen.desc()).limit(100)):
        seen = aware(worker.last_seen) or now
        ago = max(0.0, (now - seen).total_seconds())
        rows.append(
            WorkerRow(
                worker.name,
                worker.host,
                worker.device,
                worker.queues,
                worker.current_job_id,
                seen,
                ago,
                ago <= window,
            )
        )
    return rows


def alive_workers(session: Session, settings: Settings) -> int:
    """How many workers heartbeat within the last `ALIVE_BEATS` reconcile beats."""
    since = utcnow() - dt.timedelta(seconds=ALIVE_BEATS * settings.reconcile_every_s)
    return session.scalar(select(func.count()).where(Worker.last_seen >= since)) or 0


def recent_failures(session: Session, limit: int = 10) -> list[Job]:
    return list(
        session.scalars(
            select(Job).where(Job.status == JobStatus.FAILED).order_by(Job.id.desc()).limit(limit)
        )
    )


# --- jobs ------------------------------------------------------------------------------------


def curve_points(
    session: Session, job_id: int, *, after_id: int = 0, limit: int = 5000
) -> list[dict[str, float | None]]:
    """Curve points recorded after point `after_id`, in the order they were written.

    The cursor is the row id, not the step: a resumed run writes its steps again from its
    checkpoint, and those points must reach the page too.
    """
    rows = session.execute(
        select(JobMetric.id, JobMetric.step, JobMetric.loss, JobMetric.lr, JobMetric.val_top1)
        .where(JobMetric.job_id == job_id, JobMetric.id > after_id)
        .order_by(JobMetric.id)
        .limit(limit)
    )
    return [
        {"id": id_, "step": step, "loss": loss, "lr": lr, "val_top1": val_top1}
        for id_, step, loss, lr, val_top1 in rows
    ]


def run_seconds(job: Job) -> float | None:
    """Wall time since the first start, up to the end (or now, while it runs)."""
    started = aware(job.started_at)
    if started is None:
        return None
    end = aware(job.finished_at) or utcnow()
    return max(0.0, (end - started).total_seconds())


def jobs_of_dataset(session: Session, dataset_id: int, limit: int = 50) -> list[Job]:
    return list(
        session.scalars(
            select(Job).where(Job.dataset_id == dataset_id).order_by(Job.id.desc()).limit(limit)
        )
    )


def model_of_job(session: Session, job: Job) -> Model | None:
    return session.get(Model, job.model_id) if job.model_id is not None else None


# --- models and datasets ---------------------------------------------------------------------


def models_page(session: Session, *, limit: int, offset: int) -> tuple[list[Model], int]:
    total = session.scalar(select(func.count(Model.id))) or 0
    rows = session.scalars(select(Model).order_by(Model.id.desc()).limit(limit).offset(offset))
    return list(rows), total


def datasets_page(
    session: Session, *, limit: int, offset: int
) -> tuple[list[tuple[Dataset, int, int]], int]:
    """(dataset, classes, images) rows, newest first, and the total."""
    total = session.scalar(select(func.count(Dataset.id))) or 0
    datasets = list(
        session.scalars(select(Dataset).order_by(Dataset.id.desc()).limit(limit).offset(offset))
    )
    stats: dict[int, tuple[int, int]] = {
        dataset_id: (classes, images)
        for dataset_id, classes, images in session.execute(
            select(Image.dataset_id, func.count(func.distinct(Image.label)), func.count())
            .where(Image.dataset_id.in_([d.id for d in datasets]), Image.deleted_at.is_(None))
            .group_by(Image.dataset_id)
        )
    }
    return [(d, *stats.get(d.id, (0, 0))) for d in datasets], total


def sample_images(session: Session, dataset_id: int, per_class: int) -> dict[str, list[Image]]:
    """The first `per_class` images of each class (by id), classes sorted by name."""
    ranked = (
        select(
            Image.id,
            func.row_number().over(partition_by=Image.label, order_by=Image.id).label("rank"),
        )
        .where(Image.dataset_id == dataset_id, Image.deleted_at.is_(None))
        .subquery()
    )
    rows = session.scalars(
        select(Image)
        .join(ranked, ranked.c.id == Image.id)
        .where(ranked.c.rank <= per_class)
        .order_by(Image.label, Image.id)
    )
    samples: dict[str, list[Image]] = {}
    for image in rows:
        samples.setdefault(image.label, []).append(image)
    return samples


@dataclass(frozen=True)
class EvaluationRow:
    evaluation: Evaluation
    status: str | None  # its job's; None once the job row is gone
    error: str | None  # its job's, when it failed
    dataset_name: str | None


def evaluations_of_model(session: Session, model_id: int, limit: int = 50) -> list[EvaluationRow]:
    """A model's stored evaluations, newest first, with their job's status and dataset."""
    rows = session.execute(
        select(Evaluation, Job.status, Job.error, Dataset.name)
        .outerjoin(Job, Job.id == Evaluation.job_id)
        .outerjoin(Dataset, Dataset.id == Evaluation.dataset_id)
        .where(Evaluation.model_id == model_id)
        .order_by(Evaluation.id.desc())
        .limit(limit)
    )
    return [EvaluationRow(*row) for row in rows]


def split_counts(session: Session, dataset_id: int) -> dict[str, dict[str, int]]:
    """Images per class and split: {label: {"train": n, "val": m, "test": k}}."""
    counts: dict[str, dict[str, int]] = {}
    for label, split, count in session.execute(
        select(Image.label, Image.split, func.count())
        .where(Image.dataset_id == dataset_id, Image.deleted_at.is_(None))
        .group_by(Image.label, Image.split)
        .order_by(Image.label)
    ):
        counts.setdefault(label, {})[split] = count
    return counts


def plan_rows(plan: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """A plan as (name, value) rows; nested dicts (a pretrain job's plan, the overrides)
    become dotted names, long class lists are cut short, held-out image ids are counted."""
    rows = []
    for name, value in plan.items():
        if isinstance(value, dict):
            rows += plan_rows(value, f"{prefix}{name}.") if value else [(prefix + name, "—")]
            continue
        if name == "val_image_ids" and isinstance(value, list):
            shown = f"{len(value)} images"
        elif name == "classes" and isinstance(value, list) and len(value) > 12:
            shown = ", ".join(map(str, value[:12])) + f" … ({len(value)} classes)"
        elif isinstance(value, list | tuple):
            shown = ", ".join(map(str, value))
        elif isinstance(value, float):
            shown = f"{value:.6g}"
        else:
            shown = str(value)
        rows.append((prefix + name, shown))
    return rows


def holdout_of(params: dict[str, Any]) -> dict[str, Any] | None:
    """A job's hold-out as the page states it: source, held-out count, fraction, seed."""
    holdout = params.get("holdout")
    if not isinstance(holdout, dict):
        return None  # jobs created before hold-outs were recorded
    return {
        "source": holdout.get("source") or "none",
        "count": len(holdout.get("val_image_ids") or []),
        "fraction": holdout.get("fraction"),
        "seed": holdout.get("seed"),
    }


def scalar_rows(values: dict[str, Any]) -> list[tuple[str, str]]:
    """The scalar entries of a metrics dict as rows (nested reports are shown apart)."""
    return plan_rows({k: v for k, v in values.items() if not isinstance(v, dict | list)})
