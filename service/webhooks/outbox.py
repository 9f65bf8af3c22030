"""The webhook outbox: one delivery row per final status of a job, added in the same
transaction as that status (`add_delivery`, called by service.jobs.lifecycle), and every
later change of the row: claim, attempt, retry, give-up, admin re-send.

    state      to          when
    ---------  ----------  -------------------------------------------------------------
    pending    pending     an attempt failed; the next one is due after a backoff
    pending    delivered   an attempt got a 2xx
    pending    failed      an attempt failed at or past `give_up_at`
    delivered  pending     an admin re-sent it (same event id, a fresh `give_up_at`)
    failed     pending     an admin re-sent it

Whoever sends a pending row first claims it: one conditional UPDATE takes its lease (the row
is pending, due, and nobody holds a live lease), so a duplicate message, a re-send by the
reconciler and a second worker all find nothing to do. A worker killed mid-POST leaves its
lease to run out; the reconciler then re-sends the row. The receiver may still see one
event twice (the kill came after its 2xx): it dedupes by the event id.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, Update, func, or_, select, update
from sqlalchemy.orm import Session

from service.db.models import Job, WebhookAttempt, WebhookDelivery, utcnow
from service.queueing import enqueue_webhook
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
# Job.callback_status, a one-word summary of the job's latest delivery: pending (not tried
# yet), retrying, delivered or failed.
RETRYING = "retrying"
# A lease covers the POST's connect, write and read, each bounded by webhook_timeout_s,
# plus the database writes around it.
LEASE_PHASES, LEASE_SLACK_S = 3, 5.0
# A retry's message may run on a host whose clock is a little behind the one that set
# `next_attempt_at`: it is still due this much early.
CLOCK_SLACK_S = 1.0


def _changed(session: Session, statement: Update) -> int:
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def lease_s(settings: Settings) -> float:
    """How long a claimed delivery stays leased to its worker."""
    return LEASE_PHASES * settings.webhook_timeout_s + LEASE_SLACK_S


def backoff_s(
    attempt: int, base_s: float, cap_s: float, rng: Callable[[], float] = random.random
) -> float:
    """Full jitter: uniform over [0, min(cap, base * 2^(attempt-1))). Receivers that were
    down together are not hit again together."""
    doublings = min(max(0, attempt - 1), 32)  # past the cap long before; no float overflow
    return rng() * min(cap_s, base_s * 2**doublings)


def event_payload(job: Job, event_id: str, occurrence: int) -> dict[str, Any]:
    """What the receiver gets: the event's id (its idempotency key), type and time, and the
    job's outcome as it was when it ended. Frozen in the delivery row."""
    return {
        "id": event_id,
        "type": f"job.{job.status}",
        "created": int(utcnow().timestamp()),
        "occurrence": occurrence,
        "job_id": job.id,
        "kind": job.kind,
        "status": job.status,
        "model_id": job.model_id,
        "metrics": job.metrics or {},
        "error": job.error,
        "error_code": job.error_code,
    }


def body_of(delivery: WebhookDelivery) -> bytes:
    """The POST body: the frozen payload, serialised the same way on every attempt."""
    return json.dumps(delivery.payload, sort_keys=True, separators=(",", ":")).encode()


def add_delivery(session: Session, job: Job) -> WebhookDelivery:
    """A pending delivery of `job`'s final status (just set); the caller commits, then sends
    it (`send_pending`). The retry window is the process's setting (a transition has no
    settings of its own); a re-send starts a fresh one."""
    occurrence = 1 + (
        session.scalar(
            select(func.count())
            .select_from(WebhookDelivery)
            .where(WebhookDelivery.job_id == job.id)
        )
        or 0
    )
    event_id = f"evt_{secrets.token_hex(12)}"
    now = utcnow()
    delivery = WebhookDelivery(
        job_id=job.id,
        tenant=job.tenant,
        occurrence=occurrence,
        event_id=event_id,
        job_status=job.status,
        url=job.callback_url,
        payload=event_payload(job, event_id, occurrence),
        state=PENDING,
        attempts=0,
        next_attempt_at=now,
        give_up_at=now + dt.timedelta(seconds=get_settings().webhook_retry_for_s),
    )
    session.add(delivery)
    job.callback_status = PENDING
    return delivery


def enqueue(settings: Settings, delivery_id: int, countdown: float = 0.0) -> bool:
    """Send the delivery's task; a broker outage is logged, the reconciler re-sends it."""
    try:
        enqueue_webhook(settings, delivery_id, countdown=countdown)
    except Exception:  # kombu raises many kinds; the row stays pending either way
        log.warning("webhook delivery %s not enqueued; the reconciler re-sends it", delivery_id)
        return False
    return True


def send_pending(session: Session, settings: Settings, job_id: int) -> list[int]:
    """After the commit of a job's final status: enqueue its new deliveries. Best effort:
    what fails here (the database or the broker went away) the reconciler re-sends."""
    try:
        ids = list(
            session.scalars(
                select(WebhookDelivery.id).where(
                    WebhookDelivery.job_id == job_id,
                    WebhookDelivery.state == PENDING,
                    WebhookDelivery.attempts == 0,
                    WebhookDelivery.lease_owner.is_(None),
                )
            )
        )
        session.rollback()  # end the read's transaction; nothing was written
    except Exception:
        session.rollback()
        log.warning("webhooks of job %s not enqueued; the reconciler re-sends them", job_id)
        return []
    return [delivery_id for delivery_id in ids if enqueue(settings, delivery_id)]


def due_deliveries(session: Session, grace_s: float) -> list[int]:
    """Pending deliveries due for at least `grace_s` that no live worker holds: their
    message was lost, or their worker died mid-POST (its lease ran out)."""
    now = utcnow()
    return list(
        session.scalars(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.state == PENDING,
                WebhookDelivery.next_attempt_at <= now - dt.timedelta(seconds=grace_s),
                or_(WebhookDelivery.lease_owner.is_(None), WebhookDelivery.lease_expires_at < now),
            )
            .order_by(WebhookDelivery.next_attempt_at)
        )
    )


def claim(session: Session, delivery_id: int, owner: str, lease: float) -> WebhookDelivery | None:
    """Take the lease of a pending, due, unleased delivery (one more attempt); None if it
    is not to be sent now (delivered, failed, not due, or in another worker's hands)."""
    now = utcnow()
    claimed = _changed(
        session,
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.state == PENDING,
            or_(WebhookDelivery.lease_owner.is_(None), WebhookDelivery.lease_expires_at < now),
            or_(
                WebhookDelivery.next_attempt_at.is_(None),
                WebhookDelivery.next_attempt_at <= now + dt.timedelta(seconds=CLOCK_SLACK_S),
            ),
        )
        .values(
            lease_owner=owner,
            lease_expires_at=now + dt.timedelta(seconds=lease),
            attempts=WebhookDelivery.attempts + 1,
        ),
    )
    session.commit()
    if claimed != 1:
        return None
    return session.get(WebhookDelivery, delivery_id, populate_existing=True)


@dataclass(frozen=True)
class AttemptResult:
    """What one POST got: a status code, or an error (refused, timeout, ...; no secrets)."""

    status_code: int | None
    error: str | None
    duration_ms: float

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def describe(self) -> str:
        if self.delivered:
            return f"HTTP {self.status_code}"
        return self.error or f"HTTP {self.status_code}"


def record_attempt(
    session: Session,
    settings: Settings,
    delivery: WebhookDelivery,
    *,
    owner: str,
    worker: str,
    result: AttemptResult,
    rng: Callable[[], float] = random.random,
) -> float | None:
    """Record an attempt and move the delivery on: delivered, failed (its time is up), or
    pending again after a backoff. Returns the seconds until the next attempt (None: no
    next one, or the lease was lost and its new holder decides). Commits."""
    session.add(
        WebhookAttempt(
            delivery_id=delivery.id,
            status_code=result.status_code,
            error=(result.error or "")[:256] or None,
            duration_ms=result.duration_ms,
            worker=worker[:128],
        )
    )
    now = utcnow()
    delay: float | None = None
    if result.delivered:
        values: dict[str, Any] = {"state": DELIVERED, "delivered_at": now, "next_attempt_at": None}
        summary = DELIVERED
    elif now >= delivery.give_up_at:
        values, summary = {"state": FAILED, "next_attempt_at": None}, FAILED
    else:
        wait = backoff_s(
            delivery.attempts, settings.webhook_backoff_s, settings.webhook_backoff_max_s, rng
        )
        # The last attempt is made at the deadline itself, not skipped for being past it.
        next_at = min(now + dt.timedelta(seconds=wait), delivery.give_up_at)
        delay = max(0.0, (next_at - now).total_seconds())
        values, summary = {"state": PENDING, "next_attempt_at": next_at}, RETRYING
    values.update(lease_owner=None, lease_expires_at=None, last_result=result.describe()[:256])
    mine = _changed(
        session,
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id, WebhookDelivery.lease_owner == owner)
        .values(**values),
    )
    if mine:
        session.execute(
            update(Job).where(Job.id == delivery.job_id).values(callback_status=summary)
        )
    session.commit()
    return delay if mine else None


def expire_delivery_leases_of(session: Session, worker: str) -> int:
    """Mark the leases of a worker known to be dead as run out, so the reconciler re-sends
    its deliveries on its next pass. Returns how many; the caller commits."""
    return _changed(
        session,
        update(WebhookDelivery)
        .where(
            WebhookDelivery.state == PENDING,
            WebhookDelivery.lease_owner.startswith(f"{worker}/", autoescape=True),
        )
        .values(lease_expires_at=utcnow() - dt.timedelta(seconds=1)),
    )
