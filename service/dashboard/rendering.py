"""What every dashboard page module shares: the template context, rendering with the
one-time notice, paging, and the not-found the pages raise."""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import Query, Request
from starlette.responses import Response

from service.dashboard.auth import FLASH_COOKIE, AdminSession, clear_flash, read_flash
from service.dashboard.templating import page
from service.settings import Settings

PAGE_SIZE = 25
# A list page's `?page=` (1-based), as every list page takes it.
PageNumber = Annotated[int, Query(alias="page", ge=1, le=100_000)]


class PageNotFound(Exception):
    """A dashboard URL naming a row that does not exist (answered as an HTML 404)."""


def page_context(admin: AdminSession | None, nav: str, **values: Any) -> dict[str, Any]:
    """A template's context: the signed-in admin, their CSRF token, the nav entry lit."""
    return {"admin": admin, "csrf": admin.csrf if admin else "", "nav": nav, **values}


def render(
    request: Request,
    settings: Settings,
    template: str,
    context: dict[str, Any],
    *,
    status_code: int = 200,
) -> Response:
    """A page, with the one-time notice left by the previous action (if any)."""
    context["flash"] = read_flash(request, settings)
    response = page(request, template, context, status_code=status_code)
    if FLASH_COOKIE in request.cookies:
        clear_flash(response)
    return response


def pager(total: int, page_number: int) -> dict[str, int]:
    """Where a list of `total` rows, PAGE_SIZE a page, stands at page `page_number`."""
    last = max(1, math.ceil(total / PAGE_SIZE))
    return {"page": min(page_number, last), "last": last, "total": total}


def page_offset(page_number: int) -> int:
    """The first row of page `page_number`."""
    return (page_number - 1) * PAGE_SIZE
