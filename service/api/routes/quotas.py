"""Quotas: a tenant's limits and usage (admins: any tenant's, and set them; users: their own).
HTTP only: the limits, usage and audit row are service.quotas'."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from service import quotas
from service.deps import (
    ADMIN_ERRORS,
    AUTH_RESPONSES,
    BODY_ERRORS,
    SCOPE_ERRORS,
    CurrentAdmin,
    DatasetReader,
    SessionDep,
    SettingsDep,
)
from service.errors import error_responses
from service.quotas.predictions import PredictionQuota
from service.quotas.schemas import QuotasRead, QuotaUpdate

router = APIRouter(prefix="/v1", tags=["quotas"], responses=AUTH_RESPONSES)

# As API keys name tenants (service.auth.create_key).
TenantPath = Annotated[str, Path(min_length=1, max_length=64, description="the tenant's name")]


@router.get(
    "/quotas",
    response_model=QuotasRead,
    summary="Your tenant's quotas and usage",
    responses=error_responses(*SCOPE_ERRORS),
)
def own_quotas(principal: DatasetReader, session: SessionDep, settings: SettingsDep) -> QuotasRead:
    """Your tenant's limits (0: none), where each comes from, and what it uses of them."""
    return quotas.read_quotas(session, settings, tenant=principal.tenant)


@router.get(
    "/tenants/{tenant}/quotas",
    response_model=QuotasRead,
    summary="A tenant's quotas and usage (admin)",
    responses=error_responses(*ADMIN_ERRORS),
)
def tenant_quotas(
    tenant: TenantPath, principal: CurrentAdmin, session: SessionDep, settings: SettingsDep
) -> QuotasRead:
    """Any tenant's limits, each from the tenant's own setting or the server default, and usage."""
    return quotas.read_quotas(session, settings, tenant=tenant)


@router.put(
    "/tenants/{tenant}/quotas",
    response_model=QuotasRead,
    summary="Set a tenant's quotas (admin)",
    responses=error_responses(*ADMIN_ERRORS, *BODY_ERRORS),
)
def set_tenant_quotas(
    tenant: TenantPath,
    body: QuotaUpdate,
    request: Request,
    principal: CurrentAdmin,
    session: SessionDep,
    settings: SettingsDep,
) -> QuotasRead:
    """Set a tenant's own limits (0: none); null returns one to the default, and a quota left
    out keeps its value. Audited as `quota.set`."""
    read = quotas.set_quotas(session, settings, principal=principal, tenant=tenant, update=body)
    # This process applies a new predictions limit at once (others within lookup_cache_s).
    prediction_quota: PredictionQuota = request.app.state.prediction_quota
    prediction_quota.forget(tenant)
    return read
