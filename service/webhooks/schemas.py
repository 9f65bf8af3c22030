"""Webhook schemas: a job's deliveries and their attempts, as the API shows them."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field


class WebhookAttemptRead(BaseModel):
    """One POST: when, what came back (a status code or an error), how long it took."""

    model_config = ConfigDict(from_attributes=True)
    at: dt.datetime
    status_code: int | None
    error: str | None
    duration_ms: float
    worker: str | None


class WebhookDeliveryRead(BaseModel):
    """One callback of a final status: its event id (the receiver's idempotency key), its
    state (pending, delivered, failed) and its attempts."""

    model_config = ConfigDict(from_attributes=True)
    id: int
    event_id: str
    occurrence: int
    job_status: str
    state: str
    attempts: int = Field(description="attempts started (one killed mid-POST included)")
    next_attempt_at: dt.datetime | None
    give_up_at: dt.datetime
    delivered_at: dt.datetime | None
    last_result: str | None
    created_at: dt.datetime
    attempt_log: list[WebhookAttemptRead] = []
