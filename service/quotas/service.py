"""Per-tenant quotas: the limits in force, what a tenant uses, and the checks that refuse a
request before it stores or queues anything.

A limit is the tenant's own (a `tenant_quotas` column) or else the server's `quota_*`
setting; 0 means no limit. Usage is counted from the rows themselves, never kept as a
running total that could drift: stored bytes are the tenant's images' and models' sizes,
images its image rows, models its model rows (ready or archived), active jobs its queued,
running and cancelling ones.

Checks run in the request's transaction, before anything is written. Two requests of one
tenant that run at the same moment both count the usage without the other's rows, so
together they may pass a limit by at most what those in-flight requests add (each upload is
bounded by `max_upload_bytes`); the next request is refused. Serialising a tenant's uploads
with a lock would close that gap at the price of making them wait on each other's file
writes, which a quota does not need.

A finished fine-tuning job registers its model in the worker, where a refusal would throw
the training away. So the models quota is checked when the job is created (and retried):
the tenant's models plus its active fine-tuning jobs, each of which may become one, must
stay within it. Pre-training jobs make base models, which belong to no tenant.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.audit import record
from service.auth import Principal
from service.db.models import Dataset, Image, Job, Model, TenantQuota, utcnow
from service.errors import ApiError
from service.jobs.status import ACTIVE
from service.quotas.schemas import QuotaLimit, QuotaLimits, QuotasRead, QuotaUpdate, QuotaUsage
from service.settings import Settings

# The quotas, as named in the API, the `tenant_quotas` columns and (`quota_` + name) settings.
QUOTAS = ("stored_bytes", "images", "models", "active_jobs", "predictions_per_minute")
# How messages name each quota.
LABELS = {
    "stored_bytes": "stored bytes",
    "images": "images",
    "models": "models",
    "active_jobs": "active jobs (queued, running or cancelling)",
    "predictions_per_minute": "predictions per minute",
}


@dataclass(frozen=True)
class Limits:
    """A tenant's limits in force (0: none), and which of them are the tenant's own."""

    stored_bytes: int
    images: int
    models: int
    active_jobs: int
    predictions_per_minute: int
    own: frozenset[str] = frozenset()


def effective_limits(session: Session, settings: Settings, *, tenant: str) -> Limits:
    """The tenant's own limits where it has them, the settings' defaults elsewhere."""
    values = {name: getattr(settings, f"quota_{name}") for name in QUOTAS}
    own = set()
    row = session.get(TenantQuota, tenant)
    if row is not None:
        for name in QUOTAS:
            value = getattr(row, name)
            if value is not None:
                values[name] = value
                own.add(name)
    return Limits(**values, own=frozenset(own))


def _stored(session: Session, tenant: str) -> tuple[int, int]:
    """(bytes of the tenant's images, how many images)."""
    size, count = session.execute(
        select(func.coalesce(func.sum(Image.size_bytes), 0), func.count(Image.id))
        .join(Dataset, Image.dataset_id == Dataset.id)
        .where(Dataset.tenant == tenant)
    ).one()
    return int(size), int(count)


def _models(session: Session, tenant: str) -> tuple[int, int]:
    """(bytes of the tenant's models, how many models)."""
    size, count = session.execute(
        select(func.coalesce(func.sum(Model.size_bytes), 0), func.count(Model.id)).where(
            Model.tenant == tenant
        )
    ).one()
    return int(size), int(count)


def _active_jobs(session: Session, tenant: str, kind: str | None = None) -> int:
    query = select(func.count(Job.id)).where(Job.tenant == tenant, Job.status.in_(ACTIVE))
    if kind is not None:
        query = query.where(Job.kind == kind)
    return session.scalar(query) or 0


def usage(session: Session, *, tenant: str) -> QuotaUsage:
    """What the tenant uses now, counted from its rows."""
    image_bytes, images = _stored(session, tenant)
    model_bytes, models = _models(session, tenant)
    return QuotaUsage(
        stored_bytes=image_bytes + model_bytes,
        images=images,
        models=models,
        active_jobs=_active_jobs(session, tenant),
    )


def _exceeded(
    status: int, name: str, *, tenant: str, limit: int, used: int, adding: int, remedy: str
) -> ApiError:
    """The refusal of a request that would take `tenant` past its `name` quota."""
    return ApiError(
        status,
        f"quota_{name}_exceeded",
        f"tenant '{tenant}' would go over its {LABELS[name]} quota: it has {used:,}, this "
        f"request adds {adding:,} and the limit is {limit:,}. {remedy}, or ask an operator "
        f"to raise the quota (PUT /v1/tenants/{tenant}/quotas)",
        quota=name,
        limit=limit,
        usage=used,
        requested=adding,
    )


def check_storage(
    session: Session, settings: Settings, *, tenant: str, images: int, size_bytes: int
) -> None:
    """Refuse (507) an upload of `images` new images (`size_bytes`) that would take the tenant
    over its images or stored-bytes quota; call it before anything is stored."""
    if images <= 0:
        return  # stores nothing: passes even a tenant over a lowered limit
    limits = effective_limits(session, settings, tenant=tenant)
    if not (limits.images or limits.stored_bytes):
        return
    image_bytes, image_count = _stored(session, tenant)
    remedy = "Delete images or datasets you no longer need"
    if limits.images and image_count + images > limits.images:
        raise _exceeded(
            507,
            "images",
            tenant=tenant,
            limit=limits.images,
            used=image_count,
            adding=images,
            remedy=remedy,
        )
    if limits.stored_bytes:
        stored = image_bytes + _models(session, tenant)[0]
        if stored + size_bytes > limits.stored_bytes:
            raise _exceeded(
                507,
                "stored_bytes",
                tenant=tenant,
                limit=limits.stored_bytes,
                used=stored,
                adding=size_bytes,
                remedy=remedy + " (or models)",
            )


def check_new_job(session: Session, settings: Settings, *, tenant: str, kind: str) -> None:
    """Refuse (429) a job that would take the tenant over its active-jobs quota, or, for a
    fine-tuning job, its models quota (its model counts from the start: see the module)."""
    limits = effective_limits(session, settings, tenant=tenant)
    active = _active_jobs(session, tenant) if limits.active_jobs else 0
    if limits.active_jobs and active + 1 > limits.active_jobs:
        raise _exceeded(
            429,
            "active_jobs",
            tenant=tenant,
            limit=limits.active_jobs,
            used=active,
            adding=1,
            remedy="Wait for a job to finish or cancel one (POST /v1/jobs/{id}/cancel)",
        )
    if kind == "finetune" and limits.models:
        coming = _models(session, tenant)[1] + _active_jobs(session, tenant, "finetune")
        if coming + 1 > limits.models:
            raise _exceeded(
                429,
                "models",
                tenant=tenant,
                limit=limits.models,
                used=coming,
                adding=1,
                remedy="Delete models you no longer need (DELETE /v1/models/{id}; models "
                "still being trained count too)",
            )


def read_quotas(session: Session, settings: Settings, *, tenant: str) -> QuotasRead:
    """A tenant's limits, each with its source, and its usage."""
    limits = effective_limits(session, settings, tenant=tenant)
    return QuotasRead(
        tenant=tenant,
        limits=QuotaLimits(
            **{
                name: QuotaLimit(
                    limit=getattr(limits, name),
                    source="tenant" if name in limits.own else "default",
                )
                for name in QUOTAS
            }
        ),
        usage=usage(session, tenant=tenant),
    )


def set_quotas(
    session: Session,
    settings: Settings,
    *,
    principal: Principal,
    tenant: str,
    update: QuotaUpdate,
) -> QuotasRead:
    """Set the tenant's own limits given in `update` (null: back to the default), with an
    audit row of the old and new values in the same transaction."""
    for attempt in range(2):  # the second: another admin created the row meanwhile
        try:
            _apply(session, principal, tenant, update)
            session.commit()
            break
        except IntegrityError:
            session.rollback()
            if attempt:
                raise
    return read_quotas(session, settings, tenant=tenant)


def _apply(session: Session, principal: Principal, tenant: str, update: QuotaUpdate) -> None:
    row = session.get(TenantQuota, tenant)
    if row is None:
        row = TenantQuota(tenant=tenant)
        session.add(row)
    changes = {}
    for name in sorted(update.model_fields_set):
        old, new = getattr(row, name), getattr(update, name)
        if old != new:
            setattr(row, name, new)
            changes[name] = {"old": old, "new": new}
    if all(getattr(row, name) is None for name in QUOTAS):
        # Nothing of its own left: no row, as for a tenant that never had one.
        if row in session.new:
            session.expunge(row)
        else:
            session.delete(row)
    else:
        row.updated_at = utcnow()
    if changes:  # a PUT that changes nothing leaves no audit row, like any no-op
        record(
            session,
            principal,
            "quota.set",
            tenant=tenant,
            target=f"tenant {tenant}",
            detail=changes,
        )


# What the checks answer, for the routes' `responses=` (service.errors.error_responses).
STORAGE_QUOTA_ERRORS = (
    (507, "quota_images_exceeded", "tenant 'acme' would go over its images quota: ..."),
    (507, "quota_stored_bytes_exceeded", "tenant 'acme' would go over its stored bytes ..."),
)
JOB_QUOTA_ERRORS = (
    (429, "quota_active_jobs_exceeded", "tenant 'acme' would go over its active jobs ..."),
    (429, "quota_models_exceeded", "tenant 'acme' would go over its models quota: ..."),
)
PREDICTION_QUOTA_ERRORS = (
    (429, "quota_predictions_exceeded", "tenant 'acme' is over its predictions per minute ..."),
)
