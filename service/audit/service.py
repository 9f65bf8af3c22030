"""Appending to the audit log, always in the caller's transaction.

`record` only adds the row: it is written when the caller commits the change it describes,
and a request that fails (rolls back) leaves no row. Rows never hold a secret: a key is
named by its prefix, and `detail` is for ids, names and counts only.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from service.auth import Principal
from service.db.models import AuditEvent

# Every action the log records, with what it means.
ACTIONS: dict[str, str] = {
    "key.create": "an API key was created",
    "key.revoke": "an API key was revoked",
    "dataset.delete": "a dataset and its images were deleted",
    "image.delete": "an image was deleted from a dataset",
    "model.archive": "a model was archived",
    "model.delete": "a model was deleted",
    "job.cancel": "a job was cancelled (or its cancel requested)",
    "job.retry": "a failed or cancelled job was queued again",
    "alias.move": "a model alias was set, moved or removed",
    "admin.login": "an admin signed in to the dashboard",
    "quota.set": "a tenant's quotas were changed",
    "webhook.resend": "an admin re-sent a job's webhook",
}


def record(
    session: Session,
    actor: Principal | None,
    action: str,
    *,
    tenant: str,
    target: str = "",
    detail: dict[str, Any] | None = None,
    address: str | None = None,
) -> AuditEvent:
    """Add an audit row for `action` on `tenant`'s `target`, done by `actor` (None: the CLI
    on the server). The caller commits it together with the change."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action '{action}'; known: {sorted(ACTIONS)}")
    event = AuditEvent(
        action=action,
        tenant=tenant,
        actor_tenant=actor.tenant if actor else None,
        actor_key_prefix=actor.prefix if actor else None,
        address=address if address is not None else (actor.address if actor else None),
        target=target,
        detail=detail or {},
    )
    session.add(event)
    return event
