"""Finds jobs whose message was lost or whose run died, and sends them again.

- `running`/`cancelling` with an expired lease: the run died (kill -9, node lost); it is
  re-sent and resumes from its checkpoint. A dead `cancelling` job just becomes cancelled.
- `queued` for longer than the grace period while the broker queue holds fewer messages
  than there are such jobs: messages were lost (broker restarted without persistence).
- A job whose runs died `max_attempts` times fails instead (whatever kills it, e.g. running
  out of memory, would only kill it again).
- A webhook delivery due for longer than the grace period that no live worker holds: its
  message was lost, or its worker died mid-POST; it is re-sent (service.webhooks.outbox).
Re-sending is always safe: the DB lease drops duplicates. The reconciler also sweeps the
artifact store of files that killed processes left behind (service.db.orphans).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from datetime import timedelta

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.artifacts import store_for
from service.db.models import Job, Worker, utcnow
from service.db.orphans import sweep_orphans
from service.db.session import session_factory
from service.jobs.lifecycle import JobStatus, add_event, finish, reclaim_dead_run, requeue
from service.jobs.service import send
from service.queueing import celery_client
from service.settings import JOB_QUEUES, QUEUE_FOR_KIND, WEBHOOK_QUEUE, Settings
from service.webhooks.outbox import due_deliveries, enqueue, send_pending

log = logging.getLogger(__name__)


def queue_depths(app: Celery) -> dict[str, int]:
    """Messages waiting in each of the app's queues.

    The declare is not passive: a virtual transport (Redis) knows a queue only once this
    channel has declared it, and declaring one of our own queues again is harmless.
    """
    depths = {}
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        for queue in app.conf.task_queues:
            depths[queue.name] = queue(channel).queue_declare().message_count
    return depths


def ended(session: Session, settings: Settings, job: Job) -> None:
    """Commit a job this pass ended; its webhook is sent as if its run had ended it."""
    session.commit()
    send_pending(session, settings, job.id)


def reconcile(session: Session, settings: Settings) -> list[int]:
    """One pass; returns the ids of the jobs re-sent."""
    now = utcnow()
    resent: list[int] = []
    stale = now - timedelta(seconds=settings.queued_grace_s)
    waiting = session.scalars(
        select(Job).where(
            Job.status == JobStatus.QUEUED, Job.lease_owner.is_(None), Job.enqueued_at < stale
        )
    ).all()
    # Measured before this pass sends anything, so its own messages are not counted.
    depths = queue_depths(celery_client(settings)) if waiting else {}
    dead = session.scalars(
        select(Job).where(
            Job.status.in_((JobStatus.RUNNING, JobStatus.CANCELLING)), Job.lease_expires_at < now
        )
    ).all()
    for job in dead:
        if not reclaim_dead_run(session, job):  # only one reconciler acts on a given dead run
            continue
        if job.status == JobStatus.CANCELLING:
            finish(
                session, job, JobStatus.CANCELLED, owner=None, detail="run died while cancelling"
            )
            ended(session, settings, job)
            continue
        if job.attempts >= settings.max_attempts:
            finish(
                session,
                job,
                JobStatus.FAILED,
                owner=None,
                error_code="too_many_attempts",
                error=(
                    f"the job's run died {job.attempts} times (last at step {job.step}), so it "
                    "is not re-sent again; look in the worker logs for what killed it (e.g. out "
                    f"of memory), then retry it (POST /v1/jobs/{job.id}/retry)"
                ),
            )
            ended(session, settings, job)
            continue
        if not requeue(session, job, owner=None, detail="heartbeat stale: the run died"):
            session.commit()
            continue
        session.commit()
        send(session, settings, job)
        resent.append(job.id)

    for queue in JOB_QUEUES:  # one queue may carry several kinds (evaluations: finetune)
        jobs = [job for job in waiting if QUEUE_FOR_KIND.get(job.kind) == queue]
        if jobs and depths.get(queue, 0) < len(jobs):
            for job in jobs:
                add_event(session, job, "resent", detail="message missing from the broker")
                send(session, settings, job)
                resent.append(job.id)
    return resent


def reconcile_webhooks(session: Session, settings: Settings) -> list[int]:
    """Re-send the webhook deliveries due for longer than the grace period that no live
    worker holds (a lost message; a worker killed mid-POST, whose lease ran out); not while
    the webhooks queue already holds a message for each. Returns the ids re-sent."""
    due = due_deliveries(session, settings.queued_grace_s)
    session.rollback()  # end the read's transaction
    if not due or queue_depths(celery_client(settings)).get(WEBHOOK_QUEUE, 0) >= len(due):
        return []
    return [delivery_id for delivery_id in due if enqueue(settings, delivery_id)]


class Reconciler(threading.Thread):
    """Runs `reconcile` every `reconcile_every_s` and records this worker's heartbeat."""

    def __init__(self, settings: Settings, worker_name: str, queues: str, device: str) -> None:
        super().__init__(name="reconciler", daemon=True)
        self.settings, self.worker_name, self.queues, self.device = (
            settings,
            worker_name,
            queues,
            device,
        )
        self.stopped = threading.Event()
        self.current_job_id: int | None = None
        self.swept_at = 0.0  # monotonic time of the last orphan sweep

    def beat(self, session: Session) -> None:
        row = session.get(Worker, self.worker_name) or Worker(name=self.worker_name)
        row.host, row.device, row.queues = socket.gethostname(), self.device, self.queues
        row.current_job_id, row.last_seen = self.current_job_id, utcnow()
        session.merge(row)
        session.commit()

    def run(self) -> None:
        make_session = session_factory(self.settings.database_url)
        while not self.stopped.is_set():
            try:
                with make_session() as session:
                    self.beat(session)
                    resent = reconcile(session, self.settings)
                    webhooks = reconcile_webhooks(session, self.settings)
                    if time.monotonic() - self.swept_at >= self.settings.orphan_sweep_every_s:
                        self.swept_at = time.monotonic()
                        sweep_orphans(
                            session, store_for(self.settings), grace_s=self.settings.orphan_grace_s
                        )
                if resent:
                    log.info("reconciler re-sent jobs %s", resent)
                if webhooks:
                    log.info("reconciler re-sent webhook deliveries %s", webhooks)
            except Exception:  # database or broker down: try again next round
                log.warning("reconcile pass failed", exc_info=True)
            self.stopped.wait(self.settings.reconcile_every_s)
