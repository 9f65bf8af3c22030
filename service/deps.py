"""Injected types, declared once: settings, DB session, artifact store, the caller.

FastAPI runs every plain-`def` dependency on a worker thread: a hop each, several per
request, that shows in a CPU predict's overhead (BENCHMARKS.md). The ones here are
`async def` so they run on the event loop; the API-key lookup takes a thread only when it
must ask the database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from service.auth import SCOPES, Principal
from service.db.artifacts import ArtifactStore, store_for
from service.db.models import MAX_ID
from service.db.session import session_factory
from service.errors import ApiError, error_responses
from service.rate_limit import enforce as enforce_rate_limit
from service.settings import Settings

if TYPE_CHECKING:  # at run time it is on app.state; lookups imports the model service
    from service.lookups import Lookups


async def app_settings(request: Request) -> Settings:
    """The settings the app was created with (`create_app`)."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(app_settings)]

# Ids in paths and page offsets: out of the database's range is a 422, not a crash.
IdPath = Annotated[int, Path(ge=1, le=MAX_ID)]
OffsetQuery = Annotated[int, Query(ge=0, le=MAX_ID)]


async def get_session(settings: SettingsDep) -> AsyncIterator[Session]:
    """A session for the request; creating one does no I/O, its queries run on threads."""
    session = session_factory(settings.database_url)()
    try:
        yield session
    finally:
        if session.in_transaction():  # closing rolls back over the connection
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


async def get_store(settings: SettingsDep) -> ArtifactStore:
    return store_for(settings)


StoreDep = Annotated[ArtifactStore, Depends(get_store)]


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def current_principal(request: Request) -> Principal:
    """The caller, from its API key (read through `lookups`: most requests skip the database).

    Not a route's dependency: routes take the `Scoped` types below, which call this."""
    token = bearer_token(request)
    if token is None:
        raise ApiError(
            401,
            "unauthenticated",
            "missing API key: send 'Authorization: Bearer <key>' (create one with "
            "`bit admin create-key`)",
        )
    lookups: Lookups = request.app.state.lookups
    # Its own session, closed once read: a request's session would hold a pooled connection
    # for the rest of the request (an upload, a forward), and with more requests in flight
    # than the pool has connections, they would all wait on each other.
    principal = await lookups.principal(token)
    if principal is None:
        raise ApiError(401, "invalid_api_key", "the API key is unknown or revoked")
    # Asked on every request: the principal is remembered per key, the clock moves on.
    if principal.expires_at is not None and principal.expired():
        raise ApiError(
            401,
            "expired_api_key",
            f"the API key expired at {principal.expires_at.isoformat(timespec='seconds')}; "
            "create a new key (an admin does, with POST /v1/keys or `bit admin create-key`)",
        )
    # The remembered principal is shared by requests; the address is this request's own.
    principal = replace(principal, address=request.client.host if request.client else None)
    request.state.principal = principal
    await enforce_rate_limit(request, principal)  # every authenticated route: one place
    return principal


# Any valid key, whatever its scopes: only `Scoped` takes it, so that no route can forget to
# declare what it needs (the security suite checks every route for its `Scoped`).
_AnyKey = Annotated[Principal, Depends(current_principal)]


class Scoped:
    """A route's dependency: the caller, whose key must hold `scope` (service.auth.SCOPES).

    Every authenticated route declares its scope through one of these (the security suite
    finds it on each route and tries every scope against it)."""

    def __init__(self, scope: str) -> None:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope '{scope}'; the scopes are {', '.join(SCOPES)}")
        self.scope = scope

    async def __call__(self, principal: _AnyKey) -> Principal:
        # `admin` asks the role too (Principal.is_admin): it opens every tenant's data.
        if not (principal.is_admin if self.scope == "admin" else principal.has_scope(self.scope)):
            if self.scope == "admin":
                raise ApiError(403, "admin_required", "this action needs an admin API key")
            raise ApiError(
                403,
                "insufficient_scope",
                f"this API key lacks the '{self.scope}' scope; use a key that has it "
                "(an admin creates one with POST /v1/keys)",
                scope=self.scope,
            )
        return principal


CurrentAdmin = Annotated[Principal, Depends(Scoped("admin"))]
Predictor = Annotated[Principal, Depends(Scoped("predict"))]
DatasetReader = Annotated[Principal, Depends(Scoped("datasets:read"))]
DatasetWriter = Annotated[Principal, Depends(Scoped("datasets:write"))]
JobReader = Annotated[Principal, Depends(Scoped("jobs:read"))]
JobWriter = Annotated[Principal, Depends(Scoped("jobs:write"))]
ModelReader = Annotated[Principal, Depends(Scoped("models:read"))]
ModelWriter = Annotated[Principal, Depends(Scoped("models:write"))]

# What the caller's dependencies and the body parsers may answer, for routes' `responses=`.
AUTH_ERRORS = (
    (401, "unauthenticated", "missing API key: send 'Authorization: Bearer <key>' ..."),
    (401, "invalid_api_key", "the API key is unknown or revoked"),
    (401, "expired_api_key", "the API key expired at 2026-01-31T12:00:00+00:00; create ..."),
    (403, "insufficient_scope", "this API key lacks the 'jobs:write' scope; ..."),
    (429, "rate_limited", "this API key is over its rate limit of 600 requests a minute ..."),
)
ADMIN_ERRORS = ((403, "admin_required", "this action needs an admin API key"),)
SCOPE_ERRORS = ((403, "insufficient_scope", "this API key lacks the 'jobs:write' scope; ..."),)
BODY_ERRORS = (
    (400, "invalid_body", "There was an error parsing the body: send a well-formed body ..."),
    (413, "upload_too_large", "the request body is over the limit of 209715200 bytes; ..."),
)
AUTH_RESPONSES = error_responses(*AUTH_ERRORS)  # every authenticated router's
