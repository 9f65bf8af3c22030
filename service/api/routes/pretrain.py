"""Upstream pre-training (admin only): its result becomes a new base model."""

from __future__ import annotations

from fastapi import APIRouter, status

from service.deps import (
    ADMIN_ERRORS,
    AUTH_ERRORS,
    AUTH_RESPONSES,
    BODY_ERRORS,
    CurrentAdmin,
    SessionDep,
    SettingsDep,
    StoreDep,
)
from service.errors import error_responses
from service.jobs.schemas import JobRead
from service.pretrain.schemas import PretrainRequest
from service.pretrain.service import create_pretrain_job
from service.quotas import JOB_QUOTA_ERRORS

router = APIRouter(prefix="/v1", tags=["pretrain"], responses=AUTH_RESPONSES)


@router.post(
    "/pretrain",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRead,
    responses=error_responses(
        *ADMIN_ERRORS,
        *BODY_ERRORS,
        (404, "dataset_not_found", "dataset 7 does not exist"),
        (422, "invalid_pretrain_request", "give either data_path or dataset_id, not both"),
        (422, "data_path_missing", "data_path '/data/x' is not a folder this server may read"),
        *AUTH_ERRORS,
        *JOB_QUOTA_ERRORS[:1],  # pre-training makes a base model: no models quota
    ),
)
def pretrain(
    body: PretrainRequest,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    principal: CurrentAdmin,
) -> JobRead:
    """Queue an upstream pre-training job on the cluster queue (admins only)."""
    job = create_pretrain_job(session, settings, store, principal=principal, request=body)
    return JobRead.model_validate(job)
