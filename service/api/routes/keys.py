"""API keys, for admins: create (shown once), list, revoke. The rules are the CLI's
(`bit admin create-key`), checked by service.auth."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from service.auth import issue_key, key_expiry, key_page, revoke_key
from service.deps import (
    ADMIN_ERRORS,
    AUTH_RESPONSES,
    BODY_ERRORS,
    CurrentAdmin,
    OffsetQuery,
    SessionDep,
)
from service.errors import ApiError, error_responses
from service.key_schemas import TENANT, KeyCreate, KeyCreated, KeyPage, KeyRead
from service.lookups import LookupsDep

router = APIRouter(prefix="/v1/keys", tags=["keys"], responses=AUTH_RESPONSES)

KEY_RULE_ERRORS = (
    (422, "invalid_tenant", "tenant must be 1 to 64 printable characters"),
    (422, "invalid_name", "name must be at most 128 printable characters"),
    (422, "invalid_scopes", "a user key may not hold the 'admin' scope; create an admin key ..."),
    (422, "invalid_expiry", "the expiry 2025-01-01T00:00:00+00:00 is not in the future"),
)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=KeyCreated,
    summary="Create an API key",
    responses=error_responses(*ADMIN_ERRORS, *BODY_ERRORS, *KEY_RULE_ERRORS),
)
def create_key(body: KeyCreate, principal: CurrentAdmin, session: SessionDep) -> KeyCreated:
    """Create a key for a tenant with its scopes and an optional expiry; the key is in this
    answer only (only its hash is stored)."""
    expires_at = key_expiry(expires_in_s=body.expires_in_s, expires_at=body.expires_at)
    key, row = issue_key(
        session,
        role=body.role,
        tenant=body.tenant,
        name=body.name,
        scopes=body.scopes,
        expires_at=expires_at,
        actor=principal,
    )
    created = KeyCreated(**KeyRead.of(row).model_dump(), key=key)
    session.commit()  # the key and its audit row: both or neither
    return created


@router.get(
    "",
    response_model=KeyPage,
    summary="List API keys",
    responses=error_responses(*ADMIN_ERRORS),
)
def list_keys(
    principal: CurrentAdmin,
    session: SessionDep,
    tenant: Annotated[str | None, Query(description="one tenant's keys", pattern=TENANT)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: OffsetQuery = 0,
) -> KeyPage:
    """Keys, newest first: prefix, tenant, role, scopes, expiry, last use; never a key."""
    rows, total = key_page(session, tenant=tenant, limit=limit, offset=offset)
    return KeyPage(items=[KeyRead.of(row) for row in rows], total=total, limit=limit, offset=offset)


@router.delete(
    "/{prefix}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Revoke an API key",
    responses=error_responses(
        *ADMIN_ERRORS, (404, "key_not_found", "no unrevoked key starts with 'bit_Xy12ab34'")
    ),
)
def revoke(
    prefix: Annotated[
        str,
        # The prefix only: a whole key in a URL would land in access logs.
        Path(min_length=12, max_length=12, description="the key's first 12 characters"),
    ],
    principal: CurrentAdmin,
    session: SessionDep,
    lookups: LookupsDep,
) -> Response:
    """Revoke the key(s) with this prefix: refused at once by this process, by the others
    within BIT_LOOKUP_CACHE_S."""
    if not revoke_key(session, prefix, actor=principal):
        raise ApiError(
            404,
            "key_not_found",
            f"no unrevoked key starts with {prefix!r}; list the keys with GET /v1/keys",
        )
    session.commit()  # the revoke and its audit rows: both or neither
    lookups.forget_key(prefix)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
