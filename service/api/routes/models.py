"""Models: list, read, archive, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response

from service.db.models import Model, ModelAlias
from service.deps import (
    ADMIN_ERRORS,
    AUTH_RESPONSES,
    BODY_ERRORS,
    SCOPE_ERRORS,
    IdPath,
    ModelReader,
    ModelWriter,
    OffsetQuery,
    SessionDep,
    StoreDep,
)
from service.errors import error_responses
from service.inference.inference import InferenceDep
from service.lookups import LookupsDep
from service.models import service
from service.models.schemas import (
    AliasMove,
    AliasRead,
    ModelPage,
    ModelRead,
    ModelUpdate,
    NamedModel,
)

router = APIRouter(prefix="/v1/models", tags=["models"], responses=AUTH_RESPONSES)

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "`model_not_found`: no such model for this API key"}
}


@router.get(
    "",
    response_model=ModelPage,
    summary="List models",
    responses=error_responses(
        *ADMIN_ERRORS,
        *SCOPE_ERRORS,
        (422, "invalid_status", "status must be one of ready, archived"),
    ),
)
def list_models(
    session: SessionDep,
    principal: ModelReader,
    status: Annotated[str | None, Query(description="ready | archived")] = None,
    tenant: Annotated[
        str | None,
        Query(
            description="admins only: one tenant's models",
            pattern=r"^[^\x00-\x1f\x7f]{1,64}$",  # a tenant name: 1-64 printable characters
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: OffsetQuery = 0,
) -> ModelPage:
    """Your tenant's models, newest first (admins see every tenant's)."""
    rows, total = service.list_models(
        session, principal=principal, status=status, tenant=tenant, limit=limit, offset=offset
    )
    return ModelPage(
        items=[ModelRead.model_validate(row) for row in rows],
        total=total,
        limit=limit,
        offset=offset,
    )


NAME_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "`model_not_found`: no model of this name (or version) for this key"},
    **error_responses((422, "invalid_model_name", "model name ... is invalid: 1-64 characters")),
}


def _aliases(session: SessionDep, rows: list[ModelAlias]) -> list[AliasRead]:
    out = []
    for row in rows:
        model = session.get(Model, row.model_id)
        assert model is not None  # the foreign key cascades
        out.append(
            AliasRead(
                alias=row.alias,
                model_id=row.model_id,
                version=model.version,
                updated_at=row.updated_at,
            )
        )
    return out


@router.get(
    "/by-name/{name}",
    response_model=NamedModel,
    summary="A model name's versions and aliases",
    responses={**NAME_ERRORS, **error_responses(*SCOPE_ERRORS)},
)
def get_named_model(name: str, session: SessionDep, principal: ModelReader) -> NamedModel:
    """Every version of `name` in your tenant, newest first, and where its aliases point."""
    versions, aliases = service.named_model(session, principal=principal, name=name)
    return NamedModel(
        name=name,
        versions=[ModelRead.model_validate(row) for row in versions],
        aliases=_aliases(session, aliases),
    )


@router.put(
    "/by-name/{name}/aliases/{alias}",
    response_model=AliasRead,
    summary="Point an alias at a version",
    responses={**NAME_ERRORS, **error_responses(*BODY_ERRORS, *SCOPE_ERRORS)},
)
def move_alias(
    name: str,
    alias: str,
    body: AliasMove,
    session: SessionDep,
    principal: ModelWriter,
    lookups: LookupsDep,
) -> AliasRead:
    """Create or move `name@alias` (e.g. `production`) to version `version`: predict with
    `model: "name@alias"` uses it from the next request on in this process, and within
    BIT_LOOKUP_CACHE_S in others."""
    row = service.set_alias(
        session, principal=principal, name=name, alias=alias, version=body.version
    )
    lookups.forget_name(principal.tenant, name)
    return _aliases(session, [row])[0]


@router.delete(
    "/by-name/{name}/aliases/{alias}",
    status_code=204,
    summary="Remove an alias",
    responses={
        404: {"description": "`alias_not_found`"},
        **error_responses((422, "invalid_model_name", "alias ... is invalid"), *SCOPE_ERRORS),
    },
)
def remove_alias(
    name: str, alias: str, session: SessionDep, principal: ModelWriter, lookups: LookupsDep
) -> Response:
    """Remove `name@alias`; predict with it answers 404 from then on."""
    service.delete_alias(session, principal=principal, name=name, alias=alias)
    lookups.forget_name(principal.tenant, name)
    return Response(status_code=204)


@router.get("/{model_id}", response_model=ModelRead, summary="Get a model", responses=NOT_FOUND)
def get_model(model_id: IdPath, session: SessionDep, principal: ModelReader) -> ModelRead:
    """A model's classes, metrics, base model, training plan and job."""
    model = service.get_model(session, principal=principal, model_id=model_id)
    return ModelRead.model_validate(model)


@router.patch(
    "/{model_id}",
    response_model=ModelRead,
    summary="Change a model's settings",
    responses={
        **NOT_FOUND,
        **error_responses(
            *BODY_ERRORS,
            (422, "invalid_threshold", "threshold must be a probability between 0 and 1 ..."),
        ),
    },
)
def update_model(
    model_id: IdPath,
    session: SessionDep,
    principal: ModelWriter,
    lookups: LookupsDep,
    body: Annotated[ModelUpdate | None, Body()] = None,
) -> ModelRead:
    """Set a model's default probability threshold for predict (null: none)."""
    # The body is optional to FastAPI so that a missing model answers 404 before the 422.
    model = service.get_model(session, principal=principal, model_id=model_id)
    if body is not None and "threshold" in body.model_fields_set:
        model = service.set_threshold(
            session, principal=principal, model_id=model_id, threshold=body.threshold
        )
        # This process predicts with the new threshold from the next request on; others
        # once their lookup of the model expires (BIT_LOOKUP_CACHE_S).
        lookups.forget_model(model_id)
    return ModelRead.model_validate(model)


@router.post(
    "/{model_id}/archive", response_model=ModelRead, summary="Archive a model", responses=NOT_FOUND
)
def archive_model(
    model_id: IdPath,
    session: SessionDep,
    principal: ModelWriter,
    lookups: LookupsDep,
    inference: InferenceDep,
) -> ModelRead:
    """Stop serving a model (predict answers 409) and free its memory; files are kept."""
    model = service.archive_model(session, principal=principal, model_id=model_id)
    # Only this process's caches: other API processes refuse it once their lookup of it
    # expires (BIT_LOOKUP_CACHE_S), and their loaded copy ages out of their LRU.
    lookups.forget_model(model_id)
    lookups.forget_name(model.tenant, model.name)  # `name` means its latest ready version
    inference.evict(model_id)
    return ModelRead.model_validate(model)


@router.post(
    "/{model_id}/unarchive",
    response_model=ModelRead,
    summary="Unarchive a model",
    responses=NOT_FOUND,
)
def unarchive_model(
    model_id: IdPath, session: SessionDep, principal: ModelWriter, lookups: LookupsDep
) -> ModelRead:
    """Serve an archived model again (idempotent): undoes POST /v1/models/{id}/archive."""
    model = service.unarchive_model(session, principal=principal, model_id=model_id)
    lookups.forget_model(model_id)
    lookups.forget_name(model.tenant, model.name)
    return ModelRead.model_validate(model)


@router.delete("/{model_id}", status_code=204, summary="Delete a model", responses=NOT_FOUND)
def delete_model(
    model_id: IdPath,
    session: SessionDep,
    principal: ModelWriter,
    store: StoreDep,
    lookups: LookupsDep,
    inference: InferenceDep,
) -> Response:
    """Delete a model and its files, for good."""
    model = service.get_model(session, principal=principal, model_id=model_id)
    tenant, name = model.tenant, model.name
    service.delete_model(session, principal=principal, model_id=model_id, store=store)
    lookups.forget_model(model_id)
    lookups.forget_name(tenant, name)
    inference.evict(model_id)
    return Response(status_code=204)
