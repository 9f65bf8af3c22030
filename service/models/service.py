"""Models: listing, lookup with tenant isolation, archive, delete; predict-input checks.

Keyword-only functions taking the DB session. A caller sees its own tenant's models;
admins see every tenant's. Another tenant's model answers exactly like a missing one
(404), so ids reveal nothing across tenants.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from typing import Any

from sqlalchemy import Select, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bit_core.checkpoint import ModelInfo
from service.audit import record
from service.auth import Principal, visible
from service.db.artifacts import ArtifactStore
from service.db.models import Job, Model, ModelAlias, utcnow
from service.errors import ApiError
from service.inference.cache import ModelRef
from service.jobs.status import ACTIVE, JobStatus
from service.models.status import ModelStatus

log = logging.getLogger(__name__)

MODEL_STATUSES = tuple(ModelStatus)
MAX_IMAGES_PER_REQUEST = 256
MAX_TOP_K = 1000
DEFAULT_NAME = "model"
_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+;base64,", re.IGNORECASE)


def _visible(principal: Principal) -> Select[Model]:
    query = select(Model)
    return query if principal.is_admin else query.where(Model.tenant == principal.tenant)


def list_models(
    session: Session,
    *,
    principal: Principal,
    status: str | None = None,
    tenant: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Model], int]:
    """A page of the caller's models (newest first) and the total count."""
    query = _visible(principal)
    if status is not None:
        if status not in MODEL_STATUSES:
            raise ApiError(
                422, "invalid_status", f"status must be one of {', '.join(MODEL_STATUSES)}"
            )
        query = query.where(Model.status == status)
    if tenant is not None:
        if not principal.is_admin:
            raise ApiError(403, "admin_required", "filtering by tenant needs an admin API key")
        query = query.where(Model.tenant == tenant)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(
        query.order_by(Model.created_at.desc(), Model.id.desc()).limit(limit).offset(offset)
    ).all()
    return list(rows), total


def _not_found(session: Session, principal: Principal, model_id: int) -> ApiError:
    """404, with a hint when the id is really a job's that has not produced a model yet."""
    message = f"model {model_id} does not exist; list your models with GET /v1/models"
    job = session.get(Job, model_id)
    if job is not None and visible(principal, job):
        if job.status in ACTIVE:
            message = (
                f"model {model_id} does not exist, but job {model_id} is {job.status}: "
                f"wait for it to succeed (GET /v1/jobs/{model_id}), then use the model_id "
                "it reports"
            )
        elif job.status == JobStatus.SUCCEEDED and job.model_id is not None:
            message = (
                f"model {model_id} does not exist; job {model_id} produced model "
                f"{job.model_id}: pass model_id={job.model_id}"
            )
    return ApiError(404, "model_not_found", message)


def get_model(session: Session, *, principal: Principal, model_id: int) -> Model:
    """The model if the caller may see it; 404 `model_not_found` otherwise."""
    model = session.get(Model, model_id)
    if model is None or not visible(principal, model):
        raise _not_found(session, principal, model_id)
    return model


def model_for_prediction(session: Session, *, principal: Principal, model_id: int) -> Model:
    """A visible, ready model; 404 `model_not_found` or 409 `model_archived` otherwise."""
    model = get_model(session, principal=principal, model_id=model_id)
    if model.status == ModelStatus.ARCHIVED:
        raise ApiError(
            409,
            "model_archived",
            f"model {model_id} is archived and no longer serves predictions; use a ready "
            "model (GET /v1/models?status=ready) or fine-tune a new one",
        )
    return model


# A model's provenance (ModelInfo.provenance) is kept in its `metrics` column under this
# key: JSON like the rest of what its run recorded, and no migration for it.
PROVENANCE_KEY = "provenance"


def stored_metrics(info: ModelInfo) -> dict[str, Any]:
    """The `metrics` column of a model: what its run measured, and what made it."""
    if not info.provenance:
        return dict(info.metrics)
    return {**info.metrics, PROVENANCE_KEY: info.provenance}


def model_provenance(model: Model) -> dict[str, Any]:
    """What made the model (seed, plan, data, base, versions, device); {} if unrecorded."""
    provenance = (model.metrics or {}).get(PROVENANCE_KEY)
    return provenance if isinstance(provenance, dict) else {}


def model_row(
    info: ModelInfo, *, job: Job, uri: str, size_bytes: int, name: str | None = None
) -> Model:
    """The row of a model saved at `uri` (artifact key of its directory) by `job`: named
    `name`, else the job's `model_name`, else "model". Its version is assigned by
    `add_model`."""
    return Model(
        tenant=job.tenant,
        job_id=job.id,
        name=name or str((job.params or {}).get("model_name") or DEFAULT_NAME),
        arch=info.arch,
        classes=info.classes,
        crop=info.crop,
        base_model=info.base_model,
        plan=info.plan,
        metrics=stored_metrics(info),
        temperature=info.temperature,  # fitted on held-out images, when the job calibrated
        uri=uri,
        sha256=info.sha256,
        size_bytes=size_bytes,
        shared_base_sha256=info.shared_base["sha256"] if info.shared_base else None,
    )


NAME_RULE = "1-64 characters of A-Z a-z 0-9 . _ -, not all digits"
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_VERSION_RETRIES = 5


def check_name(value: str, what: str = "model name") -> str:
    """A model name or alias: 1-64 of [A-Za-z0-9._-], not all digits; 422 otherwise."""
    if not _NAME.match(value) or value.isdigit():
        raise ApiError(422, "invalid_model_name", f"{what} {value[:70]!r} is invalid: {NAME_RULE}")
    return value


def add_model(session: Session, model: Model) -> Model:
    """Insert `model` as the next version of its (tenant, name): 1, 2, 3, ...

    Race-safe: two registrations of one name may read the same maximum; the unique
    (tenant, name, version) constraint refuses the second, which retries in a savepoint.
    """
    for attempt in range(_VERSION_RETRIES):
        latest = session.scalar(
            select(func.max(Model.version)).where(
                Model.tenant == model.tenant, Model.name == model.name
            )
        )
        model.version = (latest or 0) + 1
        try:
            with session.begin_nested():
                session.add(model)
                session.flush()
            return model
        except IntegrityError:
            if attempt == _VERSION_RETRIES - 1:
                raise
    raise AssertionError("unreachable")


def _parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """`name`, `name@alias` or `name:3` -> (name, alias, version); 422 otherwise."""
    alias: str | None = None
    version: int | None = None
    name = ref
    if "@" in ref:
        name, alias = ref.split("@", 1)
        check_name(alias, "alias")
    elif ":" in ref:
        name, number = ref.split(":", 1)
        if not number.isdigit() or not 1 <= int(number) <= 2**31 - 1:
            raise ApiError(
                422, "invalid_model_name", f"version in {ref[:70]!r} must be a positive integer"
            )
        version = int(number)
    check_name(name)
    return name, alias, version


def resolve_model_id(session: Session, *, principal: Principal, ref: str) -> int:
    """The id `ref` names in the caller's tenant: `name` (its latest ready version),
    `name@alias` or `name:3`; 404 `model_not_found` when nothing matches."""
    name, alias, version = _parse_ref(ref)
    tenant = principal.tenant
    if alias is not None:
        model_id = session.scalar(
            select(ModelAlias.model_id).where(
                ModelAlias.tenant == tenant, ModelAlias.name == name, ModelAlias.alias == alias
            )
        )
    else:
        query = select(Model.id).where(Model.tenant == tenant, Model.name == name)
        if version is not None:
            query = query.where(Model.version == version)
        else:
            query = query.where(Model.status == ModelStatus.READY)
        model_id = session.scalar(query.order_by(Model.version.desc()).limit(1))
    if model_id is None:
        raise ApiError(
            404,
            "model_not_found",
            f"no model {ref!r} in tenant {tenant}; see the versions and aliases of a name "
            f"with GET /v1/models/by-name/{name}",
        )
    return int(model_id)


def named_model(
    session: Session, *, principal: Principal, name: str
) -> tuple[list[Model], list[ModelAlias]]:
    """The versions (newest first) and aliases of `name` in the caller's tenant; 404 if none."""
    check_name(name)
    versions = session.scalars(
        select(Model)
        .where(Model.tenant == principal.tenant, Model.name == name)
        .order_by(Model.version.desc())
    ).all()
    if not versions:
        raise ApiError(
            404, "model_not_found", f"no model named {name!r}; list your models with GET /v1/models"
        )
    aliases = session.scalars(
        select(ModelAlias)
        .where(ModelAlias.tenant == principal.tenant, ModelAlias.name == name)
        .order_by(ModelAlias.alias)
    ).all()
    return list(versions), list(aliases)


def set_alias(
    session: Session,
    *,
    principal: Principal,
    name: str,
    alias: str,
    version: int,
    tenant: str | None = None,
) -> ModelAlias:
    """Point `name@alias` at version `version` (creating the alias); audited `alias.move`.
    The caller's tenant's name, or (admins only, the dashboard) `tenant`'s."""
    check_name(name)
    check_name(alias, "alias")
    if tenant is not None and tenant != principal.tenant and not principal.is_admin:
        raise ApiError(403, "admin_required", "another tenant's alias needs an admin API key")
    tenant = tenant or principal.tenant
    model = session.scalar(
        select(Model).where(Model.tenant == tenant, Model.name == name, Model.version == version)
    )
    if model is None:
        raise ApiError(
            404,
            "model_not_found",
            f"model {name!r} has no version {version}; see its versions with "
            f"GET /v1/models/by-name/{name}",
        )
    row = session.scalar(
        select(ModelAlias)
        .where(ModelAlias.tenant == tenant, ModelAlias.name == name, ModelAlias.alias == alias)
        .with_for_update()
    )
    previous = None if row is None else row.model_id
    if row is None:
        row = ModelAlias(tenant=tenant, name=name, alias=alias, model_id=model.id)
        session.add(row)
    row.model_id = model.id
    row.updated_at = utcnow()
    record(
        session,
        principal,
        "alias.move",
        tenant=tenant,
        target=f"{name}@{alias}",
        detail={"model_id": model.id, "version": version, "previous_model_id": previous},
    )
    session.commit()
    return row


def delete_alias(session: Session, *, principal: Principal, name: str, alias: str) -> None:
    """Remove `name@alias`; 404 `model_not_found` (no such name) or `alias_not_found`."""
    named_model(session, principal=principal, name=name)  # the name's 404 first
    check_name(alias, "alias")
    row = session.scalar(
        select(ModelAlias).where(
            ModelAlias.tenant == principal.tenant,
            ModelAlias.name == name,
            ModelAlias.alias == alias,
        )
    )
    if row is None:
        raise ApiError(
            404,
            "alias_not_found",
            f"{name}@{alias} does not exist; see GET /v1/models/by-name/{name}",
        )
    record(
        session,
        principal,
        "alias.move",
        tenant=principal.tenant,
        target=f"{name}@{alias}",
        detail={"model_id": None, "previous_model_id": row.model_id},
    )
    session.delete(row)
    session.commit()


def model_ref(model: Model) -> ModelRef:
    """The plain values the inference cache needs (ORM rows stay in their session)."""
    return ModelRef(
        id=model.id,
        uri=model.uri,
        sha256=model.sha256,
        threshold=model.threshold,
        temperature=model.temperature,
    )


def archive_model(session: Session, *, principal: Principal, model_id: int) -> Model:
    """Mark a model archived (idempotent); predict then answers 409 `model_archived`."""
    return _move_status(session, principal, model_id, ModelStatus.ARCHIVED, "model.archive")


def unarchive_model(session: Session, *, principal: Principal, model_id: int) -> Model:
    """Serve an archived model again (idempotent; audited `model.unarchive`)."""
    return _move_status(session, principal, model_id, ModelStatus.READY, "model.unarchive")


def _move_status(
    session: Session, principal: Principal, model_id: int, to: ModelStatus, action: str
) -> Model:
    """Set the model's status and audit it; a model already there changes nothing (no row)."""
    model = get_model(session, principal=principal, model_id=model_id)
    if model.status != to:
        model.status = to
        record(
            session,
            principal,
            action,
            tenant=model.tenant,
            target=f"model {model.id}",
            detail={"name": model.name},
        )
        session.commit()
    return model


def check_threshold(threshold: float | None) -> float | None:
    """A probability threshold: None (keep every class) or a finite number in 0..1."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:  # NaN fails this too
        raise ApiError(
            422,
            "invalid_threshold",
            f"threshold must be a probability between 0 and 1 (or null for none), not "
            f"{threshold}; pick one from the model's precision-recall curves",
        )
    return threshold


def set_threshold(
    session: Session, *, principal: Principal, model_id: int, threshold: float | None
) -> Model:
    """Set the model's default probability threshold (None: predict keeps every class)."""
    model = get_model(session, principal=principal, model_id=model_id)
    model.threshold = check_threshold(threshold)
    session.commit()
    return model


def delete_model(
    session: Session, *, principal: Principal, model_id: int, store: ArtifactStore
) -> None:
    """Delete a model's row, then its files."""
    model = get_model(session, principal=principal, model_id=model_id)
    uri = model.uri
    record(
        session,
        principal,
        "model.delete",
        tenant=model.tenant,
        target=f"model {model.id}",
        detail={"name": model.name, "status": model.status},
    )
    # Its aliases go with it (the foreign key cascades too, where the database enforces it).
    session.execute(delete(ModelAlias).where(ModelAlias.model_id == model.id))
    session.delete(model)
    session.commit()
    # Row first: a crash in between leaves unreferenced files (harmless), never a row
    # pointing at deleted files.
    try:
        store.delete_prefix(uri)
    except OSError:
        log.exception("model %s deleted, but its files at %r could not be removed", model_id, uri)


# --- predict inputs -------------------------------------------------------------------


def check_top_k(top_k: int) -> int:
    """1..1000, else 422 `invalid_top_k`."""
    if not 1 <= top_k <= MAX_TOP_K:
        raise ApiError(
            422,
            "invalid_top_k",
            f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}; it is capped at the "
            "model's class count anyway",
        )
    return top_k


def check_image_count(count: int) -> None:
    """At least one image and at most MAX_IMAGES_PER_REQUEST."""
    if count == 0:
        raise ApiError(
            422, "no_images", "send at least one image: multipart `files` or JSON `images`"
        )
    if count > MAX_IMAGES_PER_REQUEST:
        raise ApiError(
            413,
            "too_many_images",
            f"{count} images in one call; send at most {MAX_IMAGES_PER_REQUEST} per call "
            "and split the rest into more calls",
        )


def check_image_size(name: str, size: int, max_bytes: int) -> None:
    """413 `image_too_large` naming the file when it is over `max_bytes`."""
    if size > max_bytes:
        raise ApiError(
            413,
            "image_too_large",
            f"{name}: {size} bytes is over the limit of {max_bytes} per image; "
            "downscale or re-compress it",
            file=name,
        )


def decode_base64_image(data: str, *, index: int, max_bytes: int) -> bytes:
    """The bytes of JSON `images[index]`; 422 `invalid_base64` or 413 `image_too_large`."""
    name = f"images[{index}]"
    text = _DATA_URL.sub("", data.strip(), count=1)
    text = "".join(text.split())  # line breaks (MIME-style base64) are allowed
    # 4 characters carry 3 bytes: refuse before decoding what would be too large anyway.
    check_image_size(name, len(text) * 3 // 4 - text.count("=", -2), max_bytes)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(
            422,
            "invalid_base64",
            f"{name} is not valid base64 ({exc}); send each image file's bytes base64-encoded "
            "(standard alphabet, with padding)",
            field=name,
        ) from exc
