"""A model's evaluations: run one on a dataset (a job), list them, read one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, status

from service.deps import (
    AUTH_RESPONSES,
    BODY_ERRORS,
    IdPath,
    JobWriter,
    ModelReader,
    SessionDep,
    SettingsDep,
)
from service.errors import error_responses
from service.evaluations import service
from service.evaluations.schemas import EvaluationCreate, EvaluationPage, EvaluationRead
from service.quotas import JOB_QUOTA_ERRORS

router = APIRouter(prefix="/v1/models", tags=["evaluations"], responses=AUTH_RESPONSES)

MODEL_NOT_FOUND = (404, "model_not_found", "model 7 does not exist; list your models ...")


@router.post(
    "/{model_id}/evaluations",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=EvaluationRead,
    summary="Evaluate a model",
    responses=error_responses(
        *BODY_ERRORS,
        MODEL_NOT_FOUND,
        (404, "dataset_not_found", "dataset 2 does not exist"),
        (422, "invalid_request", 'send a JSON body: {"dataset_id": ..., "split": ...}'),
        (422, "evaluation_empty", "split 'test' of dataset 2 has no images; upload ..."),
        (422, "evaluation_unknown_labels", "dataset 2 has images labelled 'cat', which ..."),
        (422, "evaluation_other_tenant", "dataset 2 belongs to tenant 'globex' and ..."),
        *JOB_QUOTA_ERRORS,
    ),
)
def create_evaluation(
    model_id: IdPath,
    session: SessionDep,
    settings: SettingsDep,
    principal: JobWriter,
    body: Annotated[EvaluationCreate | None, Body()] = None,
) -> EvaluationRead:
    """Measure a model on a dataset (or its `split`): queues an evaluation job; its results
    (top-1/5, per-class P/R/F1 and PR curves with AP, confusion, calibration, suggested
    thresholds) appear on the evaluation when the job succeeds."""
    # The body is optional to FastAPI so that a missing model answers 404 before the 422.
    return service.create_evaluation(
        session, settings, principal=principal, model_id=model_id, request=body
    )


@router.get(
    "/{model_id}/evaluations",
    response_model=EvaluationPage,
    summary="List a model's evaluations",
    responses=error_responses(MODEL_NOT_FOUND),
)
def list_evaluations(
    model_id: IdPath,
    session: SessionDep,
    principal: ModelReader,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> EvaluationPage:
    """A model's evaluations, newest first, each with its job's status and its results."""
    return EvaluationPage(
        items=service.list_evaluations(session, principal=principal, model_id=model_id, limit=limit)
    )


@router.get(
    "/{model_id}/evaluations/{evaluation_id}",
    response_model=EvaluationRead,
    summary="Get an evaluation",
    responses=error_responses(
        MODEL_NOT_FOUND,
        (404, "evaluation_not_found", "model 7 has no evaluation 3; list them with ..."),
    ),
)
def get_evaluation(
    model_id: IdPath, evaluation_id: IdPath, session: SessionDep, principal: ModelReader
) -> EvaluationRead:
    """One evaluation: its job's status, and its results once that job succeeded."""
    return service.get_evaluation(
        session, principal=principal, model_id=model_id, evaluation_id=evaluation_id
    )
