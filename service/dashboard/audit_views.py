"""The dashboard's audit-log page: who did what, filtered by tenant, action, key and time."""

from __future__ import annotations

import datetime as dt
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.audit import ACTIONS, AuditFilter, AuditSlice, list_events
from service.dashboard.auth import AdminPage
from service.dashboard.rendering import (
    PAGE_SIZE,
    PageNumber,
    page_context,
    page_offset,
    pager,
    render,
)
from service.deps import SessionDep, SettingsDep
from service.errors import ApiError

router = APIRouter(include_in_schema=False)


def _audit_filter(values: dict[str, str]) -> AuditFilter:
    """The form's filters as an AuditFilter; ApiError (shown on the page) for a bad one."""
    for name in ("tenant", "actor"):
        if not values[name].isprintable():
            raise ApiError(422, "invalid_filter", f"{name} must be printable text")

    def moment(name: str) -> dt.datetime | None:
        text = values[name]
        if not text:
            return None
        try:
            parsed = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ApiError(
                422,
                "invalid_time",
                f"{name} '{text}' is not a time; write e.g. 2025-01-31 12:00 (UTC) or an "
                "RFC 3339 time such as 2025-01-31T12:00:00+01:00",
            ) from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)  # the form says UTC

    return AuditFilter(
        tenant=values["tenant"] or None,
        action=values["action"] or None,
        actor=values["actor"] or None,
        since=moment("since"),
        until=moment("until"),
    )


@router.get("/audit")
def audit_log(
    request: Request,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
    tenant: str = "",
    action: str = "",
    actor: str = "",
    since: str = "",
    until: str = "",
    page_number: PageNumber = 1,
) -> Response:
    """Who did what, newest first, filtered by tenant, action, acting key and time."""
    values = {
        "tenant": tenant.strip()[:64],
        "action": action if action in ACTIONS else "",
        "actor": actor.strip()[:16],
        "since": since.strip()[:64],
        "until": until.strip()[:64],
    }
    error = None
    try:
        found = list_events(
            session,
            where=_audit_filter(values),
            limit=PAGE_SIZE,
            offset=page_offset(page_number),
        )
    except ApiError as exc:  # a filter the form cannot use: say so, show nothing
        error, found = exc.message, AuditSlice([], 0, False)
    return render(
        request,
        settings,
        "audit.html",
        page_context(
            admin,
            "audit",
            events=found.rows,
            actions=ACTIONS,
            filters=values,
            filtered=any(values.values()),
            query=urlencode({name: value for name, value in values.items() if value}),
            error=error,
            pager=pager(found.total, page_number),
        ),
        status_code=422 if error else 200,
    )
