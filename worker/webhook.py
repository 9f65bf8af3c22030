"""Signed completion callbacks: POST the job's result, HMAC-SHA256 over the raw body."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

import httpx
from sqlalchemy.orm import Session

from service.db.models import Job
from service.settings import Settings

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-BiT-Signature"
ATTEMPTS = 3


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def result_payload(job: Job) -> dict[str, object]:
    return {
        "job_id": job.id,
        "status": job.status,
        "model_id": job.model_id,
        "metrics": job.metrics,
        "error": job.error,
        "error_code": job.error_code,
    }


def deliver_result(settings: Settings, session: Session, job: Job) -> None:
    """POST the result to the job's callback_url (a few attempts); record the outcome."""
    assert job.callback_url
    body = json.dumps(result_payload(job), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(settings.webhook_secret, body),
    }
    status = "failed"
    for _ in range(ATTEMPTS):
        try:
            response = httpx.post(
                job.callback_url, content=body, headers=headers, timeout=settings.webhook_timeout_s
            )
        except httpx.HTTPError as exc:
            status = f"error: {type(exc).__name__}"
            continue
        status = str(response.status_code)
        if response.is_success:
            break
    job.callback_status = status
    session.commit()
    log.info("callback of job %s: %s", job.id, status)
