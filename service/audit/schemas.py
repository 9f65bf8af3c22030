"""Audit log schemas: what `GET /v1/audit` answers."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict


class AuditEventRead(BaseModel):
    """One recorded action: who (key prefix, tenant, address) did what to whose data, when."""

    model_config = ConfigDict(from_attributes=True)
    id: int
    at: dt.datetime
    action: str
    tenant: str  # the tenant whose data was acted on
    actor_tenant: str | None  # None: done on the server (the CLI)
    actor_key_prefix: str | None
    address: str | None
    target: str
    detail: dict[str, Any]


class AuditPage(BaseModel):
    """A page of events, newest first; `next_before` is the cursor for the next (older) page,
    None on the last one."""

    items: list[AuditEventRead]
    total: int
    limit: int
    offset: int
    next_before: int | None = None
