"""Jinja2 environment of the dashboard: templates, filters, static URLs, page responses."""

from __future__ import annotations

import datetime as dt
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.templating import Jinja2Templates
from starlette.responses import Response

from service.dashboard.queries import aware
from service.db.models import utcnow
from service.jobs.status import ACTIVE, RETRYABLE, TERMINAL, JobStatus
from service.models.status import ModelStatus

HERE = Path(__file__).parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"
STATIC_PREFIX = "/admin/static"

# Pages show operational state: never let a shared cache or the back button serve it stale.
NO_STORE = {"Cache-Control": "no-store"}


@lru_cache(maxsize=64)
def static_url(name: str) -> str:
    """A static file's URL with a content hash, so a new release is never served stale."""
    digest = hashlib.sha256((STATIC_DIR / name).read_bytes()).hexdigest()[:12]
    return f"{STATIC_PREFIX}/{name}?v={digest}"


def duration(seconds: float | None) -> str:
    """12 s, 4 min 05 s, 2 h 10 min."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "—"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def ago(moment: dt.datetime | None) -> str:
    moment = aware(moment)
    if moment is None:
        return "never"
    return f"{duration((utcnow() - moment).total_seconds())} ago"


def when(moment: dt.datetime | None) -> str:
    moment = aware(moment)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "—"


def number(value: Any, digits: int = 4) -> str:
    """Floats to `digits` significant digits; anything else as text; None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def percent(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.1f} %"


templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
templates.env.filters.update(duration=duration, ago=ago, when=when, number=number, percent=percent)
# Templates compare statuses with these, never with string literals of their own.
templates.env.globals.update(
    static=static_url,
    JobStatus=JobStatus,
    ModelStatus=ModelStatus,
    ACTIVE_JOB=ACTIVE,
    RETRYABLE_JOB=RETRYABLE,
    TERMINAL_JOB=TERMINAL,
)


def page(
    request: Request, template: str, context: dict[str, Any], *, status_code: int = 200
) -> Response:
    """Render a page; `context` carries `admin` (None on the login page) and `nav`."""
    return templates.TemplateResponse(
        request, template, context, status_code=status_code, headers=NO_STORE
    )
