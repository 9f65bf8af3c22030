"""API keys: random 256-bit tokens, stored as sha256, sent as `Authorization: Bearer`."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar, get_args

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import ApiKey
from service.errors import ApiError, not_found

KEY_PREFIX = "bit_"
ROLES = ("user", "admin")
# What a key may do. A route declares the one it needs (service.deps.Scoped); `admin` also
# opens the admin routes and every tenant's data, and only an admin key may hold it.
# The Literal is the one list: the key schemas validate against it, SCOPES is read from it.
ScopeName = Literal[
    "predict",
    "datasets:read",
    "datasets:write",
    "jobs:read",
    "jobs:write",
    "models:read",
    "models:write",
    "admin",
]
SCOPES: tuple[str, ...] = get_args(ScopeName)
USER_SCOPES = tuple(scope for scope in SCOPES if scope != "admin")
DEFAULT_SCOPES = {"user": USER_SCOPES, "admin": SCOPES}
# A key's public name, shown by list-keys and taken by revoke: "bit_" and 8 random characters.
PREFIX_CHARS = 12
MAX_LIFETIME = dt.timedelta(days=36525)  # a hundred years; beyond that, leave the expiry out


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
        """An admin sees every tenant: the admin role with the `admin` scope (the key rules
        keep the two together; both are asked, so a row edited by hand cannot split them)."""
        return self.role == "admin" and "admin" in self.scopes

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


class KeyRuleError(ApiError, ValueError):
    """A key request that breaks a rule: the API answers it as a 422 with its code, the CLI
    prints its message (what to change)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(422, code, message)


def key_expiry(
    *,
    expires_in_s: float | None = None,
    expires_at: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> dt.datetime | None:
    """When a key that lasts `expires_in_s` seconds, or until `expires_at`, expires, in UTC
    (a time without an offset is taken as UTC); None: never."""
    if expires_in_s is not None and expires_at is not None:
        raise KeyRuleError("invalid_expiry", "give expires_in_s or expires_at, not both")
    try:
        if expires_in_s is not None:
            if not 0 < expires_in_s <= MAX_LIFETIME.total_seconds():
                raise KeyRuleError(
                    "invalid_expiry",
                    f"a key's lifetime must be from 1 second to {MAX_LIFETIME.days} days, "
                    f"got {expires_in_s:g} s; leave it out for a key that does not expire",
                )
            return (now or dt.datetime.now(dt.UTC)) + dt.timedelta(seconds=expires_in_s)
        if expires_at is None:
            return None
        aware = expires_at if expires_at.tzinfo else expires_at.replace(tzinfo=dt.UTC)
        return aware.astimezone(dt.UTC)
    except OverflowError as exc:  # past year 9999 once in UTC
        raise KeyRuleError("invalid_expiry", "the expiry is out of range") from exc


def check_key_rules(
    *,
    role: str,
    tenant: str,
    name: str = "",
    scopes: Iterable[str] | None = None,
    expires_at: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> tuple[str, ...]:
    """Check a new key against the rules the API and the CLI share; returns its scopes (the
    role's by default), in SCOPES order. Raises KeyRuleError naming the broken rule.

    `admin` goes with the admin role and only with it: an admin key sees every tenant, so a
    user key may not hold `admin`, and an admin key without it would be a user key by
    another name (create a user key instead)."""
    if role not in ROLES:
        raise KeyRuleError("invalid_role", f"role must be one of {', '.join(ROLES)}, got '{role}'")
    if not 0 < len(tenant) <= 64 or not tenant.isprintable():
        raise KeyRuleError("invalid_tenant", "tenant must be 1 to 64 printable characters")
    if len(name) > 128 or not name.isprintable():
        raise KeyRuleError("invalid_name", "name must be at most 128 printable characters")
    wanted = set(DEFAULT_SCOPES[role] if scopes is None else scopes)
    unknown = sorted(wanted - set(SCOPES))
    if unknown:
        raise KeyRuleError(
            "unknown_scope", f"unknown scope(s) {unknown}; the scopes are {', '.join(SCOPES)}"
        )
    if not wanted:
        raise KeyRuleError("invalid_scopes", "give at least one scope, e.g. predict")
    if role == "user" and "admin" in wanted:
        raise KeyRuleError(
            "invalid_scopes",
            "a user key may not hold the 'admin' scope; create an admin key (role admin)",
        )
    if role == "admin" and "admin" not in wanted:
        raise KeyRuleError(
            "invalid_scopes",
            "an admin key must hold the 'admin' scope; for a key that may do less, create a "
            "user key with the scopes it needs",
        )
    if expires_at is not None and expires_at <= (now or dt.datetime.now(dt.UTC)):
        raise KeyRuleError(
            "invalid_expiry",
            f"the expiry {expires_at.isoformat(timespec='seconds')} is not in the future",
        )
    return tuple(scope for scope in SCOPES if scope in wanted)


def issue_key(
    session: Session,
    *,
    role: str = "user",
    tenant: str = "default",
    name: str = "",
    scopes: Iterable[str] | None = None,
    expires_at: dt.datetime | None = None,
    actor: Principal | None = None,
) -> tuple[str, ApiKey]:
    """Create a key by the rules (`check_key_rules`) and audit it, in the caller's
    transaction; returns the key, shown once (only its hash is stored), and its row.
    `actor` None: the CLI on the server."""
    expires_at = key_expiry(expires_at=expires_at)
    granted = check_key_rules(
        role=role, tenant=tenant, name=name, scopes=scopes, expires_at=expires_at
    )
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        prefix=key[:PREFIX_CHARS],
        key_hash=hash_key(key),
        role=role,
        tenant=tenant,
        name=name,
        scopes=" ".join(granted),
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    _audit(session, actor, "key.create", row)
    return key, row


def create_key(
    session: Session,
    *,
    role: str = "user",
    tenant: str = "default",
    name: str = "",
    scopes: Iterable[str] | None = None,
    expires_at: dt.datetime | None = None,
) -> str:
    """Create a key (by the CLI, or a test) and return it; see `issue_key`."""
    key, _ = issue_key(
        session, role=role, tenant=tenant, name=name, scopes=scopes, expires_at=expires_at
    )
    return key


def _audit(session: Session, actor: Principal | None, action: str, row: ApiKey) -> None:
    # Imported here: service.audit imports Principal from this module.
    from service.audit import record

    record(
        session,
        actor,
        action,
        tenant=row.tenant,
        target=f"key {row.prefix}",
        detail={
            "role": row.role,
            "scopes": row.scopes.split(),
            "name": row.name,
            "expires_at": row.expires_at.isoformat() if row.expires_at else None,
        },
    )


def authenticate(session: Session, key: str) -> Principal | None:
    """The principal of an unrevoked key; None otherwise. An expired key's principal is
    returned too, so the caller can say it expired (`Principal.expired`)."""
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked:
        return None
    principal = principal_of(row)
    if principal.expired():
        return principal  # refused by the caller; not a use
    now = dt.datetime.now(dt.UTC)
    last = row.last_used_at
    if (
        last is None
        or (now - (last if last.tzinfo else last.replace(tzinfo=dt.UTC))).total_seconds() > 60
    ):
        row.last_used_at = now  # throttled: one write a minute per key, not per request
        session.commit()
    return principal


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


def revoke_key(session: Session, prefix: str, *, actor: Principal | None = None) -> int:
    """Revoke, and audit, the unrevoked key(s) starting with `prefix` (its first 12
    characters, as `list_keys` shows them, or the whole key); returns how many.
    `actor` None: the CLI on the server."""
    if len(prefix) < PREFIX_CHARS:
        raise KeyRuleError(
            "invalid_prefix",
            f"give at least the first {PREFIX_CHARS} characters of the key (as "
            f"`bit admin list-keys` and GET /v1/keys show them), got {len(prefix)}",
        )
    rows = session.scalars(
        select(ApiKey).where(ApiKey.prefix == prefix[:PREFIX_CHARS], ApiKey.revoked.is_(False))
    ).all()
    matching = [
        row for row in rows if len(prefix) == PREFIX_CHARS or row.key_hash == hash_key(prefix)
    ]
    for row in matching:
        row.revoked = True
        _audit(session, actor, "key.revoke", row)
    session.flush()
    return len(matching)


def list_keys(session: Session) -> list[ApiKey]:
    """Every key, oldest first (their prefixes, never the keys)."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)).all())


def key_page(
    session: Session, *, tenant: str | None = None, limit: int = 50, offset: int = 0
) -> tuple[list[ApiKey], int]:
    """A page of the keys (of one tenant, or all), newest first, and how many there are."""
    query = select(ApiKey)
    if tenant is not None:
        query = query.where(ApiKey.tenant == tenant)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(ApiKey.id.desc()).limit(limit).offset(offset)).all()
    return list(rows), total


def has_admin_key(session: Session) -> bool:
    return (
        session.scalar(
            select(ApiKey.id).where(ApiKey.role == "admin", ApiKey.revoked.is_(False)).limit(1)
        )
        is not None
    )
