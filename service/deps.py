"""Injected types, declared once: settings, DB session, artifact store, the caller."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from sqlalchemy.orm import Session

from service.auth import Principal, authenticate
from service.datasets.schemas import error_responses
from service.db.artifacts import ArtifactStore, open_store
from service.db.models import MAX_ID
from service.db.session import session_factory
from service.errors import ApiError
from service.rate_limit import enforce as enforce_rate_limit
from service.settings import Settings, get_settings

SettingsDep = Annotated[Settings, Depends(get_settings)]

# Ids in paths and page offsets: out of the database's range is a 422, not a crash.
IdPath = Annotated[int, Path(ge=1, le=MAX_ID)]
OffsetQuery = Annotated[int, Query(ge=0, le=MAX_ID)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    session = session_factory(settings.database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


@lru_cache(maxsize=4)
def _store(url: str, cache: str) -> ArtifactStore:
    return open_store(url, cache)


def get_store(settings: SettingsDep) -> ArtifactStore:
    return _store(settings.artifacts_url, str(settings.home.resolve() / "cache"))


StoreDep = Annotated[ArtifactStore, Depends(get_store)]


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def current_principal(request: Request, session: SessionDep) -> Principal:
    token = bearer_token(request)
    if token is None:
        raise ApiError(
            401,
            "unauthenticated",
            "missing API key: send 'Authorization: Bearer <key>' (create one with "
            "`bit admin create-key`)",
        )
    principal = authenticate(session, token)
    # End the read transaction: it would hold a pooled connection for the rest of the
    # request (an upload, a forward), and with more requests in flight than the pool has
    # connections, they would all wait on each other. The next query takes one again.
    session.commit()
    if principal is None:
        raise ApiError(401, "invalid_api_key", "the API key is unknown or revoked")
    request.state.principal = principal
    enforce_rate_limit(request, principal)  # every authenticated route: one place
    return principal


CurrentUser = Annotated[Principal, Depends(current_principal)]


def admin_principal(principal: CurrentUser) -> Principal:
    if not principal.is_admin:
        raise ApiError(403, "admin_required", "this action needs an admin API key")
    return principal


CurrentAdmin = Annotated[Principal, Depends(admin_principal)]

# What the caller's dependencies and the body parsers may answer, for routes' `responses=`.
AUTH_ERRORS = (
    (401, "unauthenticated", "missing API key: send 'Authorization: Bearer <key>' ..."),
    (401, "invalid_api_key", "the API key is unknown or revoked"),
    (429, "rate_limited", "this API key is over its rate limit of 600 requests a minute ..."),
)
ADMIN_ERRORS = ((403, "admin_required", "this action needs an admin API key"),)
BODY_ERRORS = (
    (400, "invalid_body", "There was an error parsing the body: send a well-formed body ..."),
    (413, "upload_too_large", "the request body is over the limit of 209715200 bytes; ..."),
)
AUTH_RESPONSES = error_responses(*AUTH_ERRORS)  # every authenticated router's
