"""Every change of a job's status happens here: the edge check, the lease fence, the
timestamps and the event row. Nothing else writes `Job.status`.

A worker runs a job only while it holds the lease (a conditional UPDATE on the row), so a
redelivered message never starts a second concurrent run; the heartbeat renews the lease,
and a lease that runs out marks the run as dead for the reconciler.

Allowed edges (`EDGES`; `transition` refuses any other with `InvalidTransition`):

    from        to          made by                                   function
    ----------  ----------  ----------------------------------------  -----------------
    queued      running     a worker claims the job (takes the lease)  take_lease
    running     running     a redelivered run re-takes the job of a    take_lease
                            dead run (lease ran out) or its own
    queued      cancelled   API cancel of an unleased job; or a run    cancel_queued,
                            that claims a job whose cancel was asked   finish
    running     cancelling  API cancel of a running job               request_cancel
    running     succeeded   the run registered its result             finish
    running     failed      the run raised; or the reconciler gives   finish
                            up on a run that died max_attempts times
    running     cancelled   the run saw a cancel flagged while the    finish
                            job was queued and already leased
    running     queued      the run stopped for a worker shutdown,    requeue
                            or the reconciler found it dead
    cancelling  cancelled   the run stopped; or it died (reconciler)  finish
    cancelling  succeeded   the run finished its last step before it  finish
                            saw the cancel
    cancelling  failed      the run raised before it saw the cancel   finish
    failed      queued      API retry                                 retry
    cancelled   queued      API retry                                 retry

Claiming is not an ordinary edge: `take_lease` is the one conditional UPDATE that takes
the lease and starts the run (queued|running -> running, one more attempt). A job whose
cancel was requested keeps its status (queued or cancelling) and is claimed only to be
finished as cancelled. A finished job is not claimable: a redelivered message for it is
dropped (None), which is normal, not an error. The start's event ("started"/"resumed")
is written by the run once it knows whether a checkpoint exists (worker.job_run.run_job).

A move to a final status of a job with a `callback_url` also adds its webhook delivery
(service.webhooks.outbox), in the same transaction; the caller enqueues it after the commit
(`send_pending`), and the reconciler does if that message is lost.

`transition` reads the row's status afresh. A fenced call (`owner`) whose lease is gone,
or a call limited to some sources (`only_from`) that finds the job elsewhere, changes
nothing and returns False: another actor moved the job first (a race, not a bug). An edge
outside the table raises `InvalidTransition`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from typing import Any, cast

from sqlalchemy import CursorResult, Update, case, func, or_, select, update
from sqlalchemy.orm import Session

from service.db.models import Job, JobEvent, utcnow
from service.jobs.status import ACTIVE, RETRYABLE, TERMINAL, JobStatus
from service.webhooks.outbox import add_delivery

__all__ = [
    "ACTIVE",
    "EDGES",
    "RETRYABLE",
    "TERMINAL",
    "InvalidTransition",
    "JobStatus",
    "add_event",
    "cancel_queued",
    "expire_leases_of",
    "finish",
    "reclaim_dead_run",
    "record_progress",
    "renew_lease",
    "request_cancel",
    "requeue",
    "retry",
    "rows_changed",
    "take_lease",
    "transition",
]

S = JobStatus
EDGES: dict[JobStatus, frozenset[JobStatus]] = {
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED}),
    S.RUNNING: frozenset({S.CANCELLING, S.SUCCEEDED, S.FAILED, S.CANCELLED, S.QUEUED}),
    S.CANCELLING: frozenset({S.CANCELLED, S.SUCCEEDED, S.FAILED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset({S.QUEUED}),
    S.CANCELLED: frozenset({S.QUEUED}),
}


class InvalidTransition(Exception):
    """A move the table of edges does not allow: a bug in the caller, not a race."""

    def __init__(self, job_id: int, source: str, target: str) -> None:
        super().__init__(f"job {job_id}: {source} -> {target} is not an allowed transition")
        self.job_id, self.source, self.target = job_id, source, target


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


def transition(
    session: Session,
    job: Job,
    to: JobStatus,
    *,
    owner: str | None = None,
    unleased: bool = False,
    only_from: Collection[JobStatus] | None = None,
    event: str | None = None,
    detail: str | None = None,
    **values: Any,
) -> bool:
    """Move `job` to `to` (with `values`) and record event `event` (default: the status).

    `owner`: only while that run holds the lease. `unleased`: only while nobody holds it.
    `only_from`: only from these statuses. Any of those not met: False, nothing changes.
    An edge outside `EDGES` raises InvalidTransition. The caller commits."""
    row = session.execute(select(Job.status, Job.lease_owner).where(Job.id == job.id)).one_or_none()
    if row is None:
        return False
    source, lease_owner = JobStatus(row.status), row.lease_owner
    if owner is not None and lease_owner != owner:
        return False  # the lease is gone: another run (or nobody) owns the job now
    if unleased and lease_owner is not None:
        return False
    if only_from is not None and source not in only_from:
        return False
    if to not in EDGES[source]:
        raise InvalidTransition(job.id, source, to)
    fence = [Job.id == job.id, Job.status == source]
    if owner is not None:
        fence.append(Job.lease_owner == owner)
    if unleased:
        fence.append(Job.lease_owner.is_(None))
    changed = rows_changed(session, update(Job).where(*fence).values(status=to, **values))
    if changed == 1:
        session.refresh(job)
        add_event(session, job, event or to, worker=owner, detail=detail)
        if to in TERMINAL and job.callback_url:
            # The outbox row commits with the status: each final status is called back
            # exactly once, whichever path ended the job (service.webhooks.outbox).
            add_delivery(session, job)
    return changed == 1


# --- the run's lease ---------------------------------------------------------------------------


def take_lease(session: Session, job_id: int, owner: str, lease_s: float) -> Job | None:
    """Atomically claim a job for `owner` and start its run (queued|running -> running, one
    more attempt); a job whose cancel was requested is claimed as it is, to be cancelled.
    None if it is finished or leased by a live run. Commits."""
    now = utcnow()
    starts = ~Job.cancel_requested & Job.status.in_((S.QUEUED, S.RUNNING))
    claimed = rows_changed(
        session,
        update(Job)
        .where(
            Job.id == job_id,
            Job.status.in_(ACTIVE),
            or_(Job.lease_owner.is_(None), Job.lease_expires_at < now, Job.lease_owner == owner),
        )
        .values(
            status=case((starts, S.RUNNING.value), else_=Job.status),
            attempts=case((starts, Job.attempts + 1), else_=Job.attempts),
            started_at=case((starts, func.coalesce(Job.started_at, now)), else_=Job.started_at),
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


def record_progress(session: Session, job: Job, owner: str, **values: Any) -> bool:
    """Progress of a run (step, total_steps, progress, images_per_s, eta_s), written only
    while `owner` holds the lease; the status does not change. The caller commits."""
    return (
        rows_changed(
            session,
            update(Job).where(Job.id == job.id, Job.lease_owner == owner).values(**values),
        )
        == 1
    )


def finish(
    session: Session,
    job: Job,
    status: JobStatus | str,
    *,
    owner: str | None,
    error: str | None = None,
    error_code: str | None = None,
    traceback: str | None = None,
    detail: str | None = None,
) -> bool:
    """Move an active job to a terminal status once, releasing the lease.

    `owner`: the run that holds the lease; False if it is not ours (or already finished).
    None: the reconciler, for a dead run whose lease it has reclaimed (`reclaim_dead_run`).
    """
    target = JobStatus(status)
    if target not in TERMINAL:
        raise ValueError(f"not a terminal status: {status}")
    return transition(
        session,
        job,
        target,
        owner=owner,
        unleased=owner is None,
        only_from=ACTIVE,
        detail=detail or error,
        finished_at=utcnow(),
        lease_owner=None,
        lease_expires_at=None,
        error=error,
        error_code=error_code,
        traceback=traceback,
        eta_s=0.0 if target == S.SUCCEEDED else None,
    )


def requeue(session: Session, job: Job, *, owner: str | None, detail: str) -> bool:
    """running -> queued. `owner`: a run that stopped itself at a checkpoint (its worker is
    shutting down): the lease is released so the next delivery resumes at once, without
    waiting for the lease to run out. None: the reconciler, for a dead run whose lease it
    reclaimed. False if the job is no longer that run's (or no longer running)."""
    return transition(
        session,
        job,
        S.QUEUED,
        owner=owner,
        unleased=owner is None,
        only_from=(S.RUNNING,),
        event="requeued",
        detail=detail,
        lease_owner=None,
        lease_expires_at=None,
        enqueued_at=utcnow(),
    )


def reclaim_dead_run(session: Session, job: Job) -> bool:
    """Release the expired lease of a dead run, so that this caller alone (one reconciler)
    decides what becomes of the job; False if another got there first or the run renewed
    it. The status does not change here: `finish` or `requeue` follows."""
    claimed = rows_changed(
        session,
        update(Job)
        .where(Job.id == job.id, Job.lease_expires_at == job.lease_expires_at)
        .values(lease_owner=None, lease_expires_at=None),
    )
    if claimed == 1:
        session.refresh(job)
    return claimed == 1


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


# --- the API's transitions ---------------------------------------------------------------------


def cancel_queued(session: Session, job: Job) -> bool:
    """queued -> cancelled for a job no run has claimed; False once one has."""
    return transition(
        session,
        job,
        S.CANCELLED,
        unleased=True,
        only_from=(S.QUEUED,),
        detail="cancelled while queued",
        finished_at=utcnow(),
    )


def request_cancel(session: Session, job: Job) -> bool:
    """running -> cancelling: the run stops at its next step (it sees `cancel_requested`)."""
    return transition(session, job, S.CANCELLING, only_from=(S.RUNNING,), event="cancel_requested")


def retry(session: Session, job: Job) -> bool:
    """failed|cancelled -> queued, its error cleared; the run resumes from its checkpoint."""
    return transition(
        session,
        job,
        S.QUEUED,
        only_from=RETRYABLE,
        event="retried",
        cancel_requested=False,
        error=None,
        error_code=None,
        traceback=None,
        finished_at=None,
    )
