"""Webhook service functions for the API and the dashboard: check a callback URL when a
job is created, show a job's deliveries, re-send one."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.audit import record
from service.auth import Principal, require_visible
from service.db.models import Job, WebhookAttempt, WebhookDelivery, utcnow
from service.errors import ApiError, not_found
from service.settings import Settings
from service.webhooks.config import allow_list, webhooks_enabled
from service.webhooks.destination import DestinationRefused, check_destination
from service.webhooks.outbox import PENDING, enqueue
from service.webhooks.schemas import WebhookAttemptRead, WebhookDeliveryRead

DISABLED_MESSAGE = (
    "webhooks are turned off on this server; leave callback_url out, or ask the operator to "
    "set BIT_WEBHOOK_SECRET"
)


def check_callback_url(settings: Settings, url: str | None) -> str | None:
    """The callback URL of a new job, checked now (it is checked again before each attempt):
    422 `webhooks_disabled` when webhooks are off, 422 `callback_url_refused` when it is not
    http(s) or does not resolve only to public addresses (nor allowed ones)."""
    if url is None:
        return None
    if not webhooks_enabled(settings):
        raise ApiError(422, "webhooks_disabled", DISABLED_MESSAGE, field="callback_url")
    try:
        check_destination(url, allow_list(settings))
    except DestinationRefused as exc:
        raise ApiError(
            422, "callback_url_refused", f"callback_url refused: {exc}", field="callback_url"
        ) from exc
    return url


def resend(
    session: Session, settings: Settings, *, principal: Principal, job_id: int, delivery_id: int
) -> WebhookDelivery:
    """An admin's re-send: the delivery is pending again with the same event id and a fresh
    retry window, audited in the same transaction, then enqueued."""
    job = require_visible(principal, session.get(Job, job_id), "job", job_id)
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.job_id != job.id:
        raise not_found("webhook_delivery", delivery_id)
    if not webhooks_enabled(settings):
        raise ApiError(
            409,
            "webhooks_disabled",
            "webhooks are turned off on this server, so nothing can be re-sent; set "
            "BIT_WEBHOOK_SECRET to turn them on",
        )
    now = utcnow()
    delivery.state, delivery.next_attempt_at, delivery.delivered_at = PENDING, now, None
    delivery.give_up_at = now + dt.timedelta(seconds=settings.webhook_retry_for_s)
    delivery.last_result = "re-send requested"
    job.callback_status = PENDING
    record(
        session,
        principal,
        "webhook.resend",
        tenant=job.tenant,
        target=f"job {job.id}",
        detail={"delivery_id": delivery.id, "event_id": delivery.event_id},
    )
    session.commit()
    enqueue(settings, delivery.id)
    return delivery


def deliveries_of(
    session: Session, job_id: int
) -> list[tuple[WebhookDelivery, list[WebhookAttempt]]]:
    """A job's deliveries, oldest first, each with its attempts in order."""
    deliveries = list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .order_by(WebhookDelivery.occurrence)
        )
    )
    attempts: dict[int, list[WebhookAttempt]] = {d.id: [] for d in deliveries}
    if deliveries:
        for attempt in session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_(list(attempts)))
            .order_by(WebhookAttempt.id)
        ):
            attempts[attempt.delivery_id].append(attempt)
    return [(d, attempts[d.id]) for d in deliveries]


def delivery_reads(session: Session, job_id: int) -> list[WebhookDeliveryRead]:
    """A job's deliveries with their attempts, as the API and the dashboard show them."""
    return [
        WebhookDeliveryRead.model_validate(delivery).model_copy(
            update={"attempt_log": [WebhookAttemptRead.model_validate(a) for a in attempts]}
        )
        for delivery, attempts in deliveries_of(session, job_id)
    ]
