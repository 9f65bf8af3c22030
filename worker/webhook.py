"""One attempt of a webhook delivery: claim it, check its destination again, POST it signed
and pinned to the checked address, record what happened, and schedule the next attempt.

The delivery's row (service.webhooks.outbox) is the state; the Celery message only says
"try delivery N now". A lost message or a worker killed mid-POST is made good by the
reconciler, which re-sends every due delivery that no live worker holds.
"""

from __future__ import annotations

import logging
import secrets
import time

import httpx

from service.db.models import WebhookDelivery
from service.db.session import session_factory
from service.settings import Settings
from service.webhooks import outbox
from service.webhooks.config import allow_list, signing_secrets, webhooks_enabled
from service.webhooks.destination import DestinationRefused, check_destination
from service.webhooks.outbox import AttemptResult
from service.webhooks.signature import (
    EVENT_ID_HEADER,
    EVENT_TYPE_HEADER,
    SIGNATURE_HEADER,
    sign,
)
from service.webhooks.transport import post
from worker.metrics import WEBHOOK_ATTEMPTS, WEBHOOK_SECONDS

log = logging.getLogger(__name__)
USER_AGENT = "BiT-Webhooks/1"


def headers_for(settings: Settings, delivery: WebhookDelivery, body: bytes) -> dict[str, str]:
    """The request's headers, signed now (each attempt carries a fresh timestamp)."""
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_ID_HEADER: delivery.event_id,
        EVENT_TYPE_HEADER: str(delivery.payload.get("type", "")),
        SIGNATURE_HEADER: sign(signing_secrets(settings), body),
    }


def describe_error(exc: Exception, url: str) -> str:
    """An attempt's error for the record: its kind and message, never the URL (its query
    or user part may hold the receiver's token)."""
    text = f"{type(exc).__name__}: {exc}".replace(url, "<callback_url>")
    return text[:256]


def attempt(settings: Settings, delivery: WebhookDelivery) -> tuple[AttemptResult, str]:
    """POST the delivery once; (what came back, the metrics' result label)."""
    began = time.monotonic()

    def took() -> float:
        return (time.monotonic() - began) * 1000

    if not webhooks_enabled(settings):
        error = "webhooks are turned off on this worker (BIT_WEBHOOK_SECRET is not set)"
        return AttemptResult(None, error, 0.0), "refused"
    body = outbox.body_of(delivery)
    try:
        destination = check_destination(delivery.url, allow_list(settings))
    except DestinationRefused as exc:
        return AttemptResult(None, f"refused: {exc}"[:256], took()), "refused"
    try:
        code = post(
            destination, body, headers_for(settings, delivery, body), settings.webhook_timeout_s
        )
    except httpx.HTTPError as exc:
        return AttemptResult(None, describe_error(exc, delivery.url), took()), "network_error"
    result = AttemptResult(code, None if 200 <= code < 300 else _http_error(code), took())
    return result, "delivered" if result.delivered else "http_error"


def _http_error(code: int) -> str:
    if 300 <= code < 400:
        return f"HTTP {code}: redirects are not followed; give the final URL as callback_url"
    return f"HTTP {code}"


def deliver(settings: Settings, delivery_id: int, worker: str) -> str:
    """Make one attempt of delivery `delivery_id` if it is due and nobody else holds it;
    returns its state afterwards, or "skipped"."""
    owner = f"{worker}/{secrets.token_hex(4)}"  # one claim: threads of a worker differ
    make_session = session_factory(settings.database_url)
    with make_session() as session:
        delivery = outbox.claim(session, delivery_id, owner, outbox.lease_s(settings))
        if delivery is None:
            return "skipped"  # delivered, failed, not due yet, or in another worker's hands
        result, label = attempt(settings, delivery)
        WEBHOOK_ATTEMPTS.labels(label).inc()
        WEBHOOK_SECONDS.observe(result.duration_ms / 1000)
        countdown = outbox.record_attempt(
            session, settings, delivery, owner=owner, worker=worker, result=result
        )
        state = session.get(WebhookDelivery, delivery_id, populate_existing=True)
        outcome = state.state if state is not None else "gone"
    log.info(
        "webhook delivery %s (event %s), attempt %d: %s -> %s",
        delivery_id,
        delivery.event_id,
        delivery.attempts,
        result.describe(),
        outcome,
    )
    if countdown is not None:
        outbox.enqueue(settings, delivery_id, countdown)
    return outcome
