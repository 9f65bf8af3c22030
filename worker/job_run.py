"""The run of one job, whatever its kind: claim the lease, heartbeat, execute, record the
outcome. Fine-tuning (worker.runner) and pre-training (worker.pretrain) plug their work in
as `execute`.

The task is redelivered if the process dies; the lease makes the redelivery wait until the
dead run's lease expires (no two runs at once), and the checkpoint makes it resume.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from bit_core.images import ImageDecodeError
from bit_core.npz import CheckpointError
from bit_core.train import Progress
from service.db.artifacts import ArtifactStore, store_for
from service.db.models import Job, JobMetric
from service.db.session import session_factory
from service.errors import database_unavailable, storage_error
from service.jobs.lifecycle import (
    TERMINAL,
    JobStatus,
    add_event,
    finish,
    record_progress,
    renew_lease,
    requeue,
    take_lease,
)
from service.jobs.service import send
from service.settings import Settings
from service.webhooks.outbox import send_pending
from worker.metrics import count_run
from worker.shutdown import shutdown_requested

log = logging.getLogger(__name__)

# Errors of the input, not of the machine: reported with a code, not a traceback.
USER_ERRORS: dict[type[BaseException], str] = {
    ImageDecodeError: "invalid_image",
    CheckpointError: "invalid_base_weights",
    FloatingPointError: "training_diverged",
}


@dataclass
class RunState:
    """Shared between the training thread and the heartbeat thread."""

    stop: threading.Event = field(default_factory=threading.Event)
    lease_lost: bool = False
    cancelled: bool = False

    def should_stop(self) -> bool:
        """Polled between steps: a cancel, a lost lease, or the worker shutting down."""
        return self.stop.is_set() or shutdown_requested()


def stopped_for_shutdown(session: Session, settings: Settings, job: Job, owner: str) -> str:
    """Put a run that stopped because its worker is shutting down back in the queue (its
    checkpoint is saved), so the next worker resumes it without waiting for the lease."""
    if not requeue(session, job, owner=owner, detail="the worker shut down; resumes next"):
        session.rollback()
        return "lease_lost"
    session.commit()
    send(session, settings, job)
    return "requeued"


def cancel_run(session: Session, job: Job, owner: str) -> str:
    """Record a run that stopped on a cancel as cancelled."""
    finish(session, job, JobStatus.CANCELLED, owner=owner)
    session.commit()
    return JobStatus.CANCELLED


def end_stopped_run(
    session: Session, settings: Settings, job: Job, owner: str, *, shutting_down: bool
) -> str:
    """End a run that stopped before its work was done: back in the queue if its worker is
    shutting down (`stopped_for_shutdown`), cancelled otherwise."""
    if shutting_down:
        return stopped_for_shutdown(session, settings, job, owner)
    return cancel_run(session, job, owner)


def finish_succeeded(session: Session, job: Job, owner: str) -> str:
    """Mark the job succeeded and commit it with what the session holds (its model, its
    results) in one transaction, so they exist exactly when the job says succeeded."""
    if not finish(session, job, JobStatus.SUCCEEDED, owner=owner):
        session.rollback()
        return "lease_lost"
    session.commit()
    return JobStatus.SUCCEEDED


class Heartbeat(threading.Thread):
    """Renews the lease every `heartbeat_s`; flags cancel requests and a lost lease.

    A run that cannot renew its lease (the database is unreachable) stops itself once half
    the lease has passed since the last renewal: by the time the lease runs out and the
    reconciler hands the job to another worker, this run is no longer training.
    """

    def __init__(self, settings: Settings, job_id: int, owner: str, state: RunState) -> None:
        super().__init__(name=f"heartbeat-{job_id}", daemon=True)
        self.settings, self.job_id, self.owner, self.state = settings, job_id, owner, state
        self.done = threading.Event()

    def run(self) -> None:
        make_session = session_factory(self.settings.database_url)
        renewed_at = time.monotonic()  # the lease was just taken
        while not self.done.wait(self.settings.heartbeat_s):
            attempt_at = time.monotonic()  # the new expiry counts from before the UPDATE
            try:
                with make_session() as session:
                    ours, cancel = renew_lease(
                        session, self.job_id, self.owner, self.settings.lease_s
                    )
            except Exception:  # a DB blip: try again next beat; the lease has slack
                log.warning("heartbeat of job %s failed", self.job_id, exc_info=True)
                if time.monotonic() - renewed_at > self.settings.lease_s / 2:
                    log.error("job %s: lease not renewed for half of it; stopping", self.job_id)
                    self.state.lease_lost = True
                    self.state.stop.set()
                continue
            renewed_at = attempt_at
            if not ours:
                self.state.lease_lost = True
            if cancel:
                self.state.cancelled = True
            if not ours or cancel:
                self.state.stop.set()


class ProgressWriter:
    """Throttled progress: at most one DB write per `progress_every_s` (and the last step)."""

    def __init__(self, session: Session, settings: Settings, job: Job, owner: str, state: RunState):
        self.session, self.settings, self.job, self.owner, self.state = (
            session,
            settings,
            job,
            owner,
            state,
        )
        self.last = 0.0

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if (
            now - self.last < self.settings.progress_every_s
            and progress.step < progress.total_steps
        ):
            return
        self.last = now
        values = {
            "step": progress.step,
            "total_steps": progress.total_steps,
            "progress": progress.step / max(1, progress.total_steps),
            "images_per_s": progress.images_per_s,
            "eta_s": progress.eta_s,
        }
        loss = progress.loss if progress.loss == progress.loss else None  # NaN -> NULL
        try:
            record_progress(self.session, self.job, self.owner, **values)
            self.session.add(
                JobMetric(
                    job_id=self.job.id,
                    step=progress.step,
                    loss=loss,
                    lr=progress.lr,
                    images_per_s=progress.images_per_s,
                )
            )
            cancel = self.session.scalar(select(Job.cancel_requested).where(Job.id == self.job.id))
            self.session.commit()
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            # Progress is best effort: training goes on, the heartbeat guards the lease.
            self.session.rollback()
            log.warning("progress of job %s not recorded: database unreachable", self.job.id)
            return
        if cancel:  # react within a step or two, not a heartbeat later
            self.state.cancelled = True
            self.state.stop.set()

    def validation(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One validation, as it happens: a point of the validation curve."""
        self.validations([{**metrics, "step": step}])

    def validations(self, evaluations: Sequence[Mapping[str, Any]]) -> None:
        """Each validation's top-1 as a point of the job's validation curve (`val_top1`),
        once per step: a resumed run reports the validations before its crash again."""
        written = set(
            self.session.scalars(
                select(JobMetric.step).where(
                    JobMetric.job_id == self.job.id, JobMetric.val_top1.is_not(None)
                )
            )
        )
        points = [
            JobMetric(job_id=self.job.id, step=int(e["step"]), val_top1=float(e["top1"]))
            for e in evaluations
            if e.get("top1") is not None and int(e["step"]) not in written
        ]
        if not points:
            return
        try:
            self.session.add_all(points)
            self.session.commit()
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            self.session.rollback()  # best effort, as progress is
            log.warning("validation of job %s not recorded: database unreachable", self.job.id)


Execute = Callable[[Session, Settings, ArtifactStore, Job, str, RunState, Path], str]


def run_job(
    settings: Settings,
    job_id: int,
    owner: str,
    *,
    checkpoint_for: Callable[[ArtifactStore, Job], Path],
    execute: Execute,
) -> str:
    """Claim job `job_id`, run `execute` under a heartbeat, record failures; returns what
    happened: succeeded, failed, cancelled, skipped (not ours to run), lease_lost,
    requeued (the worker is shutting down) or interrupted (the database went away; the job
    resumes once it is back)."""
    make_session = session_factory(settings.database_url)
    with make_session() as session:
        job = take_lease(session, job_id, owner, settings.lease_s)
        if job is None:
            return "skipped"  # finished, or a live run holds it: drop this delivery
        job_kind = job.kind  # read now: once the database is lost, the row cannot be refreshed
        if job.cancel_requested:
            finish(session, job, JobStatus.CANCELLED, owner=owner)
            session.commit()
            count_run(job_kind, JobStatus.CANCELLED, None)
            send_pending(session, settings, job_id)
            return JobStatus.CANCELLED
        # take_lease started the run (running, one more attempt); its event waits for the
        # checkpoint, which tells "started" from "resumed".

        state = RunState()
        heartbeat = Heartbeat(settings, job.id, owner, state)
        heartbeat.start()
        try:
            # Inside the try: a full or read-only store fails the job here, with its code.
            store = store_for(settings)
            checkpoint = checkpoint_for(store, job)
            kind = "resumed" if checkpoint.exists() else "started"
            add_event(session, job, kind, worker=owner)
            session.commit()
            outcome = execute(session, settings, store, job, owner, state, checkpoint)
        except Exception as exc:
            outcome = record_failure(session, job, owner, exc)
        finally:
            heartbeat.done.set()
            heartbeat.join()
        count_run(job_kind, outcome, job.error_code if outcome == JobStatus.FAILED else None)
        if outcome in TERMINAL:  # its webhook delivery was written with the final status
            send_pending(session, settings, job_id)
        return outcome


def describe_failure(job: Job, exc: Exception) -> tuple[str, str, str | None]:
    """(error code, message, traceback or None) for a run that raised `exc`."""
    code = next((c for t, c in USER_ERRORS.items() if isinstance(exc, t)), None)
    if code is not None:
        return code, str(exc), None
    known = storage_error(exc) if isinstance(exc, OSError) else None
    if known is not None:
        _, code, what = known
        return (
            code,
            f"{what} ({exc}); job {job.id} stopped at step {job.step}: free space or make the "
            f"store writable, then retry it (POST /v1/jobs/{job.id}/retry)",
            None,
        )
    return "internal_error", f"{type(exc).__name__}: {exc}", traceback.format_exc()


def record_failure(session: Session, job: Job, owner: str, exc: Exception) -> str:
    """Mark the job failed for `exc`; but a lost database is not the job's fault: then the
    lease is left to run out and the reconciler re-sends the job, which resumes."""
    session.rollback()
    if not database_unavailable(exc):
        code, message, trace = describe_failure(job, exc)
        try:
            finish(
                session,
                job,
                JobStatus.FAILED,
                owner=owner,
                error=message,
                error_code=code,
                traceback=trace,
            )
            session.commit()
            return JobStatus.FAILED
        except Exception as db_exc:
            if not database_unavailable(db_exc):
                raise
            session.rollback()
    log.warning("job %s interrupted: the database is unreachable; it will resume", job.id)
    return "interrupted"
