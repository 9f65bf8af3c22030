"""Leases, terminal transitions and the reconciler, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from service.db.models import Job, JobEvent, utcnow
from service.db.session import session_scope
from service.jobs.lifecycle import finish, renew_lease, take_lease
from service.queueing import celery_client
from service.settings import Settings
from tests.worker.conftest import WEBHOOKS, delivery_ids
from tests.worker.webhook_receiver import webhook_receiver
from worker.reconciler import queue_depths, reconcile
from worker.webhook import deliver


def new_job(settings: Settings, kind: str = "finetune", **values: object) -> int:
    with session_scope(settings.database_url) as session:
        job = Job(tenant="acme", kind=kind, base_model="R14x0.5", params={}, **values)
        session.add(job)
        session.flush()
        return job.id


def test_only_one_owner_holds_the_lease(settings: Settings):
    job_id = new_job(settings)
    with session_scope(settings.database_url) as session:
        assert take_lease(session, job_id, "worker-a", 60) is not None
        assert take_lease(session, job_id, "worker-b", 60) is None  # a live run holds it
        assert take_lease(session, job_id, "worker-a", 60) is not None  # the owner may renew
        assert renew_lease(session, job_id, "worker-b", 60) == (False, False)
        assert renew_lease(session, job_id, "worker-a", 60) == (True, False)


def test_an_expired_lease_can_be_taken_over(settings: Settings):
    expired = utcnow() - dt.timedelta(seconds=1)
    job_id = new_job(settings, status="running", lease_owner="dead", lease_expires_at=expired)
    with session_scope(settings.database_url) as session:
        job = take_lease(session, job_id, "worker-b", 60)
        assert job is not None and job.lease_owner == "worker-b"


def test_finish_happens_once_and_only_for_the_owner(settings: Settings):
    job_id = new_job(settings)
    with session_scope(settings.database_url) as session:
        job = take_lease(session, job_id, "worker-a", 60)
        assert job is not None
        assert not finish(session, job, "succeeded", owner="worker-b")
        assert finish(session, job, "succeeded", owner="worker-a")
        session.commit()
        assert not finish(session, job, "failed", owner="worker-a")  # already terminal
        assert take_lease(session, job_id, "worker-c", 60) is None  # finished jobs never rerun
        kinds = session.scalars(select(JobEvent.kind).where(JobEvent.job_id == job_id)).all()
        assert kinds == ["succeeded"]


def test_reconciler_requeues_dead_runs_and_resends_lost_messages(settings: Settings):
    past = utcnow() - dt.timedelta(seconds=5)
    long_ago = utcnow() - dt.timedelta(seconds=settings.queued_grace_s + 5)
    dead = new_job(
        settings, status="running", lease_owner="dead", lease_expires_at=past, attempts=1
    )
    dying_cancel = new_job(settings, status="cancelling", lease_owner="dead", lease_expires_at=past)
    lost = new_job(settings, status="queued", enqueued_at=long_ago)
    fresh = new_job(settings, status="queued", enqueued_at=utcnow())
    alive = new_job(
        settings,
        status="running",
        lease_owner="alive",
        lease_expires_at=utcnow() + dt.timedelta(seconds=60),
    )
    with session_scope(settings.database_url) as session:
        resent = reconcile(session, settings)
    assert sorted(resent) == sorted([dead, lost])
    with session_scope(settings.database_url) as session:
        status = dict(session.execute(select(Job.id, Job.status)).all())
    assert status[dead] == "queued" and status[dying_cancel] == "cancelled"
    assert status[fresh] == "queued" and status[alive] == "running"
    # The messages are really on the broker now: one per re-sent job.
    assert queue_depths(celery_client(settings))["finetune"] == 2
    with session_scope(settings.database_url) as session:
        # A second pass finds nothing new: the re-sent messages are waiting in the queue.
        assert reconcile(session, settings) == []


def test_lost_evaluation_jobs_are_resent_on_the_finetune_queue(settings: Settings):
    long_ago = utcnow() - dt.timedelta(seconds=settings.queued_grace_s + 5)
    lost = [
        new_job(settings, kind=kind, status="queued", enqueued_at=long_ago)
        for kind in ("evaluate", "finetune")
    ]
    with session_scope(settings.database_url) as session:
        assert sorted(reconcile(session, settings)) == sorted(lost)
    # Both kinds share the queue: one message each, and a second pass sees them there.
    assert queue_depths(celery_client(settings))["finetune"] == 2
    with session_scope(settings.database_url) as session:
        assert reconcile(session, settings) == []


def test_jobs_the_reconciler_ends_post_their_webhook(settings: Settings):
    settings = settings.model_copy(update=WEBHOOKS)
    past = utcnow() - dt.timedelta(seconds=5)
    with webhook_receiver() as receiver:
        worn_out = new_job(
            settings,
            status="running",
            lease_owner="dead",
            lease_expires_at=past,
            attempts=settings.max_attempts,
            callback_url=receiver.url,
        )
        dead_cancel = new_job(
            settings,
            status="cancelling",
            lease_owner="dead",
            lease_expires_at=past,
            callback_url=receiver.url,
        )
        with session_scope(settings.database_url) as session:
            assert reconcile(session, settings) == []
        # Each ended job has one pending delivery, and its message is on the broker.
        pending = delivery_ids(settings, worn_out) + delivery_ids(settings, dead_cancel)
        assert len(pending) == 2
        assert queue_depths(celery_client(settings))["webhooks"] == 2
        for delivery_id in pending:
            assert deliver(settings, delivery_id, "w1") == "delivered"
    outcomes = {d.payload["job_id"]: d.payload for d in receiver.received}
    assert outcomes[worn_out]["status"] == "failed"
    assert outcomes[worn_out]["error_code"] == "too_many_attempts"
    assert outcomes[dead_cancel]["status"] == "cancelled"
    with session_scope(settings.database_url) as session:
        assert session.get(Job, worn_out).callback_status == "delivered"  # type: ignore[union-attr]
