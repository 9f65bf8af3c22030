"""The audit log: appending to it, always in the caller's transaction, and reading it.

`record` only adds the row: it is written when the caller commits the change it describes,
and a request that fails (rolls back) leaves no row. Rows never hold a secret: a key is
named by its prefix, and `detail` is for ids, names and counts only.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from service.auth import Principal
from service.db.models import AuditEvent
from service.errors import ApiError

# Every action the log records, with what it means.
ACTIONS: dict[str, str] = {
    "key.create": "an API key was created",
    "key.revoke": "an API key was revoked",
    "dataset.delete": "a dataset and its images were deleted",
    "image.delete": "an image was deleted from a dataset",
    "model.archive": "a model was archived",
    "model.delete": "a model was deleted",
    "model.unarchive": "an archived model was made ready again",
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


@dataclass(frozen=True)
class AuditFilter:
    """What to read from the log: every field left None matches anything."""

    tenant: str | None = None
    action: str | None = None
    actor: str | None = None  # an actor key prefix
    since: dt.datetime | None = None  # inclusive
    until: dt.datetime | None = None  # exclusive


def check_filter(where: AuditFilter) -> AuditFilter:
    """422 for an unknown action or an empty time window; times made UTC (as stored)."""
    if where.action is not None and where.action not in ACTIONS:
        raise ApiError(
            422,
            "unknown_audit_action",
            f"unknown audit action '{where.action}'; use one of {', '.join(ACTIONS)}",
        )
    try:
        since = where.since.astimezone(dt.UTC) if where.since else None
        until = where.until.astimezone(dt.UTC) if where.until else None
    except OverflowError:  # e.g. 0001-01-01T00:00+05:00: before year 1 once in UTC
        raise ApiError(
            422, "invalid_time_range", "since and until must be between the years 1 and 9999"
        ) from None
    if since is not None and until is not None and since >= until:
        raise ApiError(
            422,
            "invalid_time_range",
            f"since ({since.isoformat()}) must be before until ({until.isoformat()})",
        )
    return replace(where, since=since, until=until)


def _matching(where: AuditFilter) -> Select[AuditEvent]:
    query = select(AuditEvent)
    if where.tenant is not None:
        query = query.where(AuditEvent.tenant == where.tenant)
    if where.action is not None:
        query = query.where(AuditEvent.action == where.action)
    if where.actor is not None:
        query = query.where(AuditEvent.actor_key_prefix == where.actor)
    if where.since is not None:
        query = query.where(AuditEvent.at >= where.since)
    if where.until is not None:
        query = query.where(AuditEvent.at < where.until)
    return query


class AuditSlice(NamedTuple):
    """A page of events, how many match in all, and whether older ones follow the page."""

    rows: list[AuditEvent]
    total: int
    more: bool


def list_events(
    session: Session,
    *,
    where: AuditFilter,
    limit: int,
    offset: int = 0,
    before: int | None = None,
) -> AuditSlice:
    """A page of the events matching `where`, newest first, and how many match in all.

    `before` (an event id) is a cursor: the page starts at the next older event, so paging
    stays steady while new events are appended. `offset` counts from there."""
    where = check_filter(where)
    query = _matching(where)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    if before is not None:
        query = query.where(AuditEvent.id < before)
    # By id, not time: ids are unique and given in the order rows are written; times may tie.
    # One row past the page tells whether another page follows.
    rows = list(
        session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit + 1).offset(offset))
    )
    return AuditSlice(rows[:limit], total, len(rows) > limit)
