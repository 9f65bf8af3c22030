"""API keys: random 256-bit tokens, stored as sha256, sent as `Authorization: Bearer`."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import Protocol, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import ApiKey
from service.errors import not_found

KEY_PREFIX = "bit_"
ROLES = ("user", "admin")
# What a key may do. A route declares the one it needs (service.deps.Scoped); `admin` also
# opens the admin routes and every tenant's data, and only an admin key may hold it.
SCOPES = (
    "predict",
    "datasets:read",
    "datasets:write",
    "jobs:read",
    "jobs:write",
    "models:read",
    "models:write",
    "admin",
)
USER_SCOPES = tuple(scope for scope in SCOPES if scope != "admin")
DEFAULT_SCOPES = {"user": USER_SCOPES, "admin": SCOPES}


@dataclass(frozen=True)
class Principal:
    """Who is calling: resolved from the key on every request.

    `address` is the caller's network address, filled in per request (the rest is cached
    per key by service.lookups); the audit log records it."""

    key_id: int
    tenant: str
    role: str
    scopes: frozenset[str] = frozenset(SCOPES)
    prefix: str = ""
    expires_at: dt.datetime | None = None
    address: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def expired(self, now: dt.datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or dt.datetime.now(dt.UTC))


class Owned(Protocol):
    """A row that belongs to a tenant (dataset, job, model)."""

    @property
    def tenant(self) -> str: ...


OwnedRow = TypeVar("OwnedRow", bound=Owned)


def visible(principal: Principal, row: Owned | None) -> bool:
    """Whether `principal` may see `row`: its own tenant's, or any if admin."""
    return row is not None and (principal.is_admin or row.tenant == principal.tenant)


def require_visible(principal: Principal, row: OwnedRow | None, what: str, ident: int) -> OwnedRow:
    """`row` if `principal` may see it; otherwise the 404 of a missing `what` `ident`:
    another tenant's row answers exactly like a missing one, so ids reveal nothing."""
    if row is None or not visible(principal, row):
        raise not_found(what, ident)
    return row


def hash_key(key: str) -> str:
    # A plain sha256 suffices: keys are 256 random bits, not guessable passwords.
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    session: Session, *, role: str = "user", tenant: str = "default", name: str = ""
) -> str:
    """Create a key and return it; only its hash is stored, so it is shown once."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got '{role}'")
    if not tenant or len(tenant) > 64:
        raise ValueError("tenant must be 1 to 64 characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(
            prefix=key[:12],
            key_hash=hash_key(key),
            role=role,
            tenant=tenant,
            name=name,
            scopes=" ".join(DEFAULT_SCOPES[role]),
        )
    )
    session.flush()
    return key


def authenticate(session: Session, key: str) -> Principal | None:
    """The principal of a valid, unrevoked key; None otherwise."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked:
        return None
    now = dt.datetime.now(dt.UTC)
    last = row.last_used_at
    if (
        last is None
        or (now - (last if last.tzinfo else last.replace(tzinfo=dt.UTC))).total_seconds() > 60
    ):
        row.last_used_at = now  # throttled: one write a minute per key, not per request
        session.commit()
    return principal_of(row)


def principal_of(row: ApiKey) -> Principal:
    """The principal a key's row stands for."""
    expires = row.expires_at
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=dt.UTC)
    return Principal(
        row.id,
        row.tenant,
        row.role,
        scopes=frozenset(row.scopes.split()),
        prefix=row.prefix,
        expires_at=expires,
    )


def revoke_key(session: Session, prefix: str) -> int:
    """Revoke the key(s) starting with `prefix` (its first 12 characters, as `list_keys`
    shows them, or the whole key); returns how many were revoked."""
    if len(prefix) < 12:
        raise ValueError(
            f"give at least the first 12 characters of the key (as `bit admin list-keys` "
            f"shows them), got {len(prefix)}"
        )
    rows = session.scalars(
        select(ApiKey).where(ApiKey.prefix == prefix[:12], ApiKey.revoked.is_(False))
    ).all()
    matching = [row for row in rows if len(prefix) == 12 or row.key_hash == hash_key(prefix)]
    for row in matching:
        row.revoked = True
    session.flush()
    return len(matching)


def list_keys(session: Session) -> list[ApiKey]:
    """Every key, oldest first (their prefixes, never the keys)."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)).all())


def has_admin_key(session: Session) -> bool:
    return (
        session.scalar(
            select(ApiKey.id).where(ApiKey.role == "admin", ApiKey.revoked.is_(False)).limit(1)
        )
        is not None
    )
