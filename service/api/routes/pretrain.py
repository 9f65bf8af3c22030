"""Upstream pre-training (admin only): its result becomes a new base model."""

from __future__ import annotations

from fastapi import APIRouter, status

from service.deps import CurrentAdmin, SessionDep, SettingsDep, StoreDep
from service.jobs.schemas import JobRead
from service.pretrain.schemas import PretrainRequest
from service.pretrain.service import create_pretrain_job

router = APIRouter(prefix="/v1", tags=["pretrain"])


@router.post("/pretrain", status_code=status.HTTP_202_ACCEPTED, response_model=JobRead)
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
