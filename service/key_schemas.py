"""Request and response shapes of the API-key endpoints (`/v1/keys`)."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.auth import MAX_LIFETIME, ScopeName
from service.db.models import ApiKey
from service.rfc3339 import Rfc3339

TENANT = r"^[^\x00-\x1f\x7f]{1,64}$"  # a tenant name: 1-64 printable characters


class KeyCreate(BaseModel):
    """A new key: whose, with which role and scopes, named how, expiring when."""

    model_config = ConfigDict(
        extra="forbid",  # a misspelt `expires_in_s` must not make a key that never expires
        json_schema_extra={
            "examples": [{"tenant": "acme", "scopes": ["predict"], "name": "mobile app"}]
        },
    )

    tenant: str = Field(pattern=TENANT, description="the tenant whose data the key reaches")
    role: Literal["user", "admin"] = Field(
        "user", description="admin keys see every tenant and must hold the `admin` scope"
    )
    scopes: list[ScopeName] | None = Field(
        None,
        min_length=1,
        description="what the key may do; default: every scope of its role (a user key may "
        "not hold `admin`)",
    )
    name: str = Field("", max_length=128, description="what the key is for, e.g. 'mobile app'")
    expires_in_s: int | None = Field(
        None,
        ge=1,
        le=int(MAX_LIFETIME.total_seconds()),
        description="seconds until it expires (or give expires_at; neither: it never expires)",
    )
    expires_at: Rfc3339 | None = Field(
        None, description="when it expires (RFC 3339, in the future)"
    )


class KeyRead(BaseModel):
    """A key as listed: its public prefix and what it may do, never the key or its hash."""

    prefix: str = Field(description="the key's first 12 characters: DELETE /v1/keys/{prefix}")
    tenant: str
    role: str
    scopes: list[str]
    name: str
    created_at: dt.datetime
    expires_at: dt.datetime | None = Field(description="None: it never expires")
    expired: bool
    last_used_at: dt.datetime | None = Field(
        description="the last request it made (updated at most once a minute); None: never used"
    )
    revoked: bool

    @classmethod
    def of(cls, row: ApiKey, now: dt.datetime | None = None) -> KeyRead:
        """The listing of a key's row."""
        expires_at = row.expires_at
        if expires_at is not None and expires_at.tzinfo is None:  # a fresh row, not read back
            expires_at = expires_at.replace(tzinfo=dt.UTC)
        return cls(
            prefix=row.prefix,
            tenant=row.tenant,
            role=row.role,
            scopes=row.scopes.split(),
            name=row.name,
            created_at=row.created_at,
            expires_at=expires_at,
            expired=expires_at is not None and expires_at <= (now or dt.datetime.now(dt.UTC)),
            last_used_at=row.last_used_at,
            revoked=row.revoked,
        )


class KeyCreated(KeyRead):
    """A new key: `key` is shown in this answer only (only its hash is stored)."""

    key: str = Field(description="send as 'Authorization: Bearer <key>'; store it now")


class KeyPage(BaseModel):
    """A page of keys, newest first."""

    items: list[KeyRead]
    total: int
    limit: int
    offset: int
