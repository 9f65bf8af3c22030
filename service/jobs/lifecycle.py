"""Job state transitions that must be atomic: take/renew/release the lease, finish.

`queued -> running -> succeeded | failed | cancelled` (+ `cancelling`). A worker runs a job
only while it holds the lease (a conditional UPDATE on the row), so a redelivered message
never starts a second concurrent run; the heartbeat renews the lease, and a lease that runs
out marks the run as dead for the reconciler.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from sqlalchemy import CursorResult, Update, or_, select, update
from sqlalchemy.orm import Session

from service.db.models import Job, JobEvent, utcnow

ACTIVE = ("queued", "running", "cancelling")
TERMINAL = ("succeeded", "failed", "cancelled")


def rows_changed(session: Session, statement: Update) -> int:
    """Execute an UPDATE and return how many rows it changed (the test of a conditional one)."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def add_event(
    session: Session, job: Job, kind: str, *, worker: str | None = None, detail: str | None = None
) -> None:
    session.add(
        JobEvent(
            job_id=job.id,
            kind=kind,
            attempt=job.attempts,
            step=job.step,
            worker=worker,
            detail=detail,
        )
    )


def take_lease(session: Session, job_id: int, owner: str, lease_s: float) -> Job | None:
    """Atomically claim a job for `owner`; None if it is finished or leased by a live run."""
    now = utcnow()
    claimed = rows_changed(
        session,
        update(Job)
        .where(
            Job.id == job_id,
            Job.status.in_(("queued", "running", "cancelling")),
            or_(Job.lease_owner.is_(None), Job.lease_expires_at < now, Job.lease_owner == owner),
        )
        .values(
            lease_owner=owner,
            lease_expires_at=now + dt.timedelta(seconds=lease_s),
            heartbeat_at=now,
        ),
    )
    session.commit()
    if claimed != 1:
        return None
    return session.get(Job, job_id, populate_existing=True)


def renew_lease(session: Session, job_id: int, owner: str, lease_s: float) -> tuple[bool, bool]:
    """Heartbeat: extend the lease. Returns (still ours, cancel requested)."""
    now = utcnow()
    renewed = rows_changed(
        session,
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner)
        .values(heartbeat_at=now, lease_expires_at=now + dt.timedelta(seconds=lease_s)),
    )
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    session.commit()
    return renewed == 1, bool(cancel)


def finish(
    session: Session,
    job: Job,
    status: str,
    *,
    owner: str,
    error: str | None = None,
    error_code: str | None = None,
    traceback: str | None = None,
) -> bool:
    """Move a leased job to a terminal status once, releasing the lease; False if not ours."""
    if status not in TERMINAL:
        raise ValueError(f"not a terminal status: {status}")
    done = rows_changed(
        session,
        update(Job)
        .where(Job.id == job.id, Job.lease_owner == owner, Job.status.in_(ACTIVE))
        .values(
            status=status,
            finished_at=utcnow(),
            lease_owner=None,
            lease_expires_at=None,
            error=error,
            error_code=error_code,
            traceback=traceback,
            eta_s=0.0 if status == "succeeded" else None,
        ),
    )
    if done == 1:
        session.refresh(job)
        add_event(session, job, status, worker=owner, detail=error)
    return done == 1


def requeue(session: Session, job: Job, *, owner: str, detail: str) -> bool:
    """running -> queued for a run that stopped itself at a checkpoint (its worker is
    shutting down): the lease is released so the next delivery resumes at once, without
    waiting for the lease to run out. False if the run no longer owns the job."""
    done = rows_changed(
        session,
        update(Job)
        .where(Job.id == job.id, Job.lease_owner == owner, Job.status == "running")
        .values(status="queued", lease_owner=None, lease_expires_at=None, enqueued_at=utcnow()),
    )
    if done == 1:
        session.refresh(job)
        add_event(session, job, "requeued", worker=owner, detail=detail)
    return done == 1


def expire_leases_of(session: Session, owner: str) -> list[int]:
    """Mark the leases of a worker known to be dead (its supervisor saw it exit) as run
    out, so the reconciler re-sends its jobs on its next pass instead of a lease later.
    Returns the ids of those jobs; the caller commits."""
    ids = list(
        session.scalars(select(Job.id).where(Job.lease_owner == owner, Job.status.in_(ACTIVE)))
    )
    if ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.lease_owner == owner)
            .values(lease_expires_at=utcnow() - dt.timedelta(seconds=1))
        )
    return ids
