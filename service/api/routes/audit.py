"""The audit log, for admins: who did what to which tenant's data, when and from where."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.audit import AuditFilter, list_events
from service.audit.schemas import AuditEventRead, AuditPage
from service.db.models import MAX_ID
from service.deps import ADMIN_ERRORS, AUTH_RESPONSES, CurrentAdmin, OffsetQuery, SessionDep
from service.errors import error_responses
from service.rfc3339 import Rfc3339

router = APIRouter(prefix="/v1/audit", tags=["audit"], responses=AUTH_RESPONSES)

MAX_PAGE = 200
# A tenant name or a key prefix: printable, as long as the columns that hold them.
TENANT = r"^[^\x00-\x1f\x7f]{1,64}$"
PREFIX = r"^[^\x00-\x1f\x7f]{1,16}$"


@router.get(
    "",
    response_model=AuditPage,
    summary="Read the audit log",
    responses=error_responses(
        *ADMIN_ERRORS,
        (422, "unknown_audit_action", "unknown audit action 'x'; use one of key.create, ..."),
        (422, "invalid_time_range", "since (...) must be before until (...)"),
    ),
)
def read_audit(
    session: SessionDep,
    principal: CurrentAdmin,
    tenant: Annotated[
        str | None, Query(description="the tenant whose data was acted on", pattern=TENANT)
    ] = None,
    action: Annotated[str | None, Query(description="e.g. model.delete", max_length=64)] = None,
    actor: Annotated[
        str | None, Query(description="the acting key's prefix (12 characters)", pattern=PREFIX)
    ] = None,
    since: Annotated[Rfc3339 | None, Query(description="RFC 3339; events at or after")] = None,
    until: Annotated[Rfc3339 | None, Query(description="RFC 3339; events before")] = None,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="cursor: events older than this id")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: OffsetQuery = 0,
) -> AuditPage:
    """Audit events, newest first, filtered; `total` counts every match (cursor aside)."""
    found = list_events(
        session,
        where=AuditFilter(tenant=tenant, action=action, actor=actor, since=since, until=until),
        limit=limit,
        offset=offset,
        before=before,
    )
    return AuditPage(
        items=[AuditEventRead.model_validate(row) for row in found.rows],
        total=found.total,
        limit=limit,
        offset=offset,
        next_before=found.rows[-1].id if found.more else None,
    )
