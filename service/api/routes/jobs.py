"""Fine-tuning requests and the job endpoints (list, get, cancel, retry, progress stream)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile, status
from fastapi.responses import StreamingResponse
from pydantic import HttpUrl, TypeAdapter, ValidationError

from service.datasets.service import create_dataset
from service.datasets.uploads import UPLOAD_ERROR_CODES, parse_multipart_items
from service.db.session import session_factory
from service.deps import (
    AUTH_ERRORS,
    AUTH_RESPONSES,
    BODY_ERRORS,
    IdPath,
    JobReader,
    JobWriter,
    OffsetQuery,
    Scoped,
    SessionDep,
    SettingsDep,
    StoreDep,
)
from service.errors import ApiError, error_responses
from service.jobs import service
from service.jobs.lifecycle import TERMINAL
from service.jobs.schemas import (
    EventRead,
    FinetuneOverrides,
    FinetuneRequest,
    JobDetail,
    JobPage,
    JobRead,
    MetricPoint,
)
from service.models import service as model_service
from service.quotas import JOB_QUOTA_ERRORS, STORAGE_QUOTA_ERRORS, check_new_job
from service.webhooks.service import check_callback_url, delivery_reads

router = APIRouter(prefix="/v1", tags=["jobs"], responses=AUTH_RESPONSES)

JOB_NOT_FOUND = (404, "job_not_found", "job 12 does not exist")
PLAN_ERRORS = (
    (422, "unknown_base_model", "unknown base model 'R9'; list them with GET /v1/base-models"),
    (422, "base_model_not_installed", "BiT-M-R50x1 is not installed; run `bit weights ...`"),
    (422, "invalid_overrides", "unknown override(s) ['lr']; accepted: ..."),
    (422, "too_few_images", "fine-tuning needs at least 2 classes with 2+ images ..."),
)
CALLBACK_ERRORS = (
    (422, "callback_url_refused", "callback_url refused: 10.0.0.5 is a private network; ..."),
    (422, "webhooks_disabled", "webhooks are turned off on this server; leave callback_url ..."),
)


def _read(job: object) -> JobRead:
    return JobRead.model_validate(job)


@router.post(
    "/finetune",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRead,
    responses=error_responses(
        *BODY_ERRORS,
        (404, "dataset_not_found", "dataset 7 does not exist"),
        *PLAN_ERRORS,
        *CALLBACK_ERRORS,
        *AUTH_ERRORS,
        *JOB_QUOTA_ERRORS,
    ),
)
def finetune(
    body: FinetuneRequest, session: SessionDep, settings: SettingsDep, principal: JobWriter
) -> JobRead:
    """Fine-tune a base model on a dataset; answers the queued job with its resolved plan."""
    job = service.create_finetune_job(
        session,
        settings,
        principal=principal,
        dataset_id=body.dataset_id,
        base_model=body.base_model,
        mode=body.mode,
        overrides=body.overrides.as_dict(),
        callback_url=str(body.callback_url) if body.callback_url else None,
        model_name=body.model_name,
    )
    return _read(job)


@router.post(
    "/finetune/upload",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRead,
    responses=error_responses(
        *UPLOAD_ERROR_CODES,
        (422, "invalid_model_name", "model name '12' is invalid: 1-64 characters ..."),
        *PLAN_ERRORS,
        *CALLBACK_ERRORS,
        *AUTH_ERRORS,
        *JOB_QUOTA_ERRORS,
        *STORAGE_QUOTA_ERRORS,
    ),
    # It creates a dataset as well as a job: the key needs both scopes.
    dependencies=[Depends(Scoped("datasets:write"))],
)
def finetune_upload(
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    principal: JobWriter,
    files: Annotated[list[UploadFile], File(description="the labeled images")],
    labels: Annotated[list[str], Form(description="one label per file, in order")],
    base_model: Annotated[str | None, Form()] = None,
    mode: Annotated[str, Form(pattern="^(full|linear)$")] = "full",
    overrides: Annotated[str, Form(description="JSON object of plan overrides")] = "{}",
    callback_url: Annotated[str | None, Form()] = None,
    name: Annotated[str, Form(max_length=256)] = "",
    model_name: Annotated[
        str | None,
        Form(description="the model's name (1-64 of A-Z a-z 0-9 . _ -); default: `model`"),
    ] = None,
    split: Annotated[
        str | None, Form(description="train | val | test, for every file (default train)")
    ] = None,
    splits: Annotated[
        list[str] | None, Form(description="instead of `split`: one split per file, in order")
    ] = None,
) -> JobRead:
    """Upload labeled images and fine-tune on them in one call (a dataset is created)."""
    field = "overrides"
    try:
        parsed = FinetuneOverrides.model_validate_json(overrides)
        field = "callback_url"
        url = str(TypeAdapter(HttpUrl).validate_python(callback_url)) if callback_url else None
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join([field, *map(str, problem["loc"])])  # the form field, then within it
        raise ApiError(422, "invalid_request", f"{where}: {problem['msg']}", field=field) from exc
    # Check the base and the callback before storing anything, so a bad request leaves
    # nothing behind.
    if model_name is not None:
        model_service.check_name(model_name)
    service.resolve_base_model(settings, base_model or settings.default_base_model)
    check_callback_url(settings, url)
    # The job's quotas too (the dataset's are checked as it is created, before storing).
    check_new_job(session, settings, tenant=principal.tenant, kind="finetune")
    items = parse_multipart_items(files, labels, settings, split=split, splits=splits)
    dataset = create_dataset(
        session, store, settings, tenant=principal.tenant, name=name, items=items
    )
    job = service.create_finetune_job(
        session,
        settings,
        principal=principal,
        dataset_id=dataset.id,
        base_model=base_model,
        mode=mode,
        overrides=parsed.as_dict(),
        callback_url=url,
        model_name=model_name,
    )
    return _read(job)


@router.get("/jobs", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    principal: JobReader,
    status_filter: Annotated[
        str | None,
        Query(alias="status", pattern="^(queued|running|cancelling|succeeded|failed|cancelled)$"),
    ] = None,
    kind: Annotated[str | None, Query(pattern="^(finetune|pretrain|evaluate)$")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: OffsetQuery = 0,
) -> JobPage:
    """Your jobs, newest first; filter by status and kind."""
    rows, total = service.list_jobs(
        session, principal=principal, status=status_filter, kind=kind, limit=limit, offset=offset
    )
    return JobPage(items=[_read(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/jobs/{job_id}", response_model=JobDetail, responses=error_responses(JOB_NOT_FOUND))
def get_job(job_id: IdPath, session: SessionDep, principal: JobReader) -> JobDetail:
    """A job: status, progress, ETA, plan, metrics, error, curves, history and webhooks."""
    job = service.get_job(session, principal=principal, job_id=job_id)
    detail = JobDetail.model_validate(job)
    detail.curves = [MetricPoint.model_validate(m) for m in service.job_curves(session, job.id)]
    detail.events = [EventRead.model_validate(e) for e in service.job_events(session, job.id)]
    detail.webhooks = delivery_reads(session, job.id)
    return detail


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobRead,
    responses=error_responses(
        JOB_NOT_FOUND, (409, "job_finished", "job 12 already ended (succeeded)")
    ),
)
def cancel_job(
    job_id: IdPath, session: SessionDep, settings: SettingsDep, principal: JobWriter
) -> JobRead:
    """Cancel: queued jobs stop at once, running ones between two training steps."""
    return _read(service.cancel_job(session, settings, principal=principal, job_id=job_id))


@router.post(
    "/jobs/{job_id}/retry",
    response_model=JobRead,
    responses=error_responses(
        JOB_NOT_FOUND,
        (409, "job_not_retryable", "job 12 is running; only failed or cancelled jobs can ..."),
        *AUTH_ERRORS,
        *JOB_QUOTA_ERRORS,
    ),
)
def retry_job(
    job_id: IdPath, session: SessionDep, settings: SettingsDep, principal: JobWriter
) -> JobRead:
    """Re-run a failed or cancelled job (it resumes from its last checkpoint)."""
    return _read(service.retry_job(session, settings, principal=principal, job_id=job_id))


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses=error_responses(JOB_NOT_FOUND),
)
async def job_events(
    job_id: IdPath,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: JobReader,
) -> StreamingResponse:
    """Server-Sent Events: a `progress` event whenever the job changes, `end` when it ends."""
    service.get_job(session, principal=principal, job_id=job_id)  # 404 before streaming
    make_session = session_factory(settings.database_url)

    def snapshot() -> JobRead:
        with make_session() as poll:
            return _read(service.get_job(poll, principal=principal, job_id=job_id))

    async def stream() -> AsyncIterator[str]:
        last = None
        while not await request.is_disconnected():
            current = await asyncio.to_thread(snapshot)
            payload = current.model_dump_json()
            if payload != last:
                yield f"event: progress\ndata: {payload}\n\n"
                last = payload
            if current.status in TERMINAL:
                yield f"event: end\ndata: {json.dumps({'status': current.status})}\n\n"
                return
            await asyncio.sleep(0.5)  # poll interval of the stream, not a wait for a result

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
