"""The dashboard's pages under /admin: server-rendered, HTTP only (queries live elsewhere).

Pages need a session (see `auth`); every POST carries the session's CSRF token. Actions
call the same service functions as the API, as the signed-in admin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse
from sqlalchemy.orm import Session
from starlette.responses import Response

from service.audit import record
from service.auth import authenticate
from service.base_models import list_base_models
from service.dashboard import audit_views, model_views, queries
from service.dashboard.auth import (
    AdminApi,
    AdminPage,
    AdminSession,
    check_csrf,
    check_login_token,
    client_address,
    end_session,
    login_token,
    opens_dashboard,
    read_session,
    safe_next,
    set_flash,
    set_login_cookie,
    start_session,
)
from service.dashboard.evaluation import training_metrics
from service.dashboard.rendering import (
    PAGE_SIZE,
    PageNotFound,
    PageNumber,
    page_context,
    page_offset,
    pager,
    render,
)
from service.dashboard.templating import NO_STORE, page, when
from service.dashboard.thumbnails import SIZES, thumbnail
from service.db.models import Dataset, Image, Job
from service.deps import IdPath, SessionDep, SettingsDep, StoreDep
from service.errors import ApiError
from service.jobs import service as jobs
from service.jobs.status import ACTIVE, RETRYABLE, TERMINAL
from service.settings import Settings
from service.webhooks.service import delivery_reads, resend

router = APIRouter(prefix="/admin", include_in_schema=False)

THUMBS_PER_CLASS = 12
MAX_KEY_CHARS = 512  # keys are 47 characters; anything far longer is not one


# --- login -----------------------------------------------------------------------------------


@router.get("/login")
def login_form(
    request: Request, session: SessionDep, settings: SettingsDep, next: str = "/admin"
) -> Response:
    """The login page: paste an admin API key."""
    if read_session(request, session, settings) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return _login_page(request, settings, safe_next(next))


def _login_page(
    request: Request, settings: Settings, next_path: str, *, error: str | None = None
) -> Response:
    token, new = login_token(request, settings)
    response = page(
        request,
        "login.html",
        page_context(None, "login", login_token=token, next=next_path, error=error),
        status_code=401 if error else 200,
    )
    if new:
        set_login_cookie(request, response, token)
    return response


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    api_key: Annotated[str, Form()] = "",
    login_token_: Annotated[str, Form(alias="login_token")] = "",
    next: Annotated[str, Form()] = "/admin",
) -> Response:
    """Exchange an admin API key for a session cookie."""
    check_login_token(request, settings, login_token_)
    key = api_key.strip()
    principal = authenticate(session, key) if 0 < len(key) <= MAX_KEY_CHARS else None
    if principal is None or not opens_dashboard(principal):
        # One message for unknown, revoked, expired and non-admin keys: it tells nothing about them.
        return _login_page(
            request,
            settings,
            safe_next(next),
            error="That key cannot open the dashboard. Use an admin API key "
            "(created with `bit admin create-key --role admin`).",
        )
    # Only a successful sign-in is recorded: a wrong key writes nothing.
    record(
        session,
        principal,
        "admin.login",
        tenant=principal.tenant,
        target="dashboard",
        address=client_address(request),
    )
    session.commit()
    response = RedirectResponse(safe_next(next), status_code=303)
    start_session(request, response, settings, principal)
    return response


@router.post("/logout")
def logout(admin: AdminPage, csrf_token: Annotated[str, Form()] = "") -> Response:
    """End the session."""
    check_csrf(admin, csrf_token)
    response = RedirectResponse("/admin/login", status_code=303)
    end_session(response)
    return response


# --- overview and jobs -----------------------------------------------------------------------


@router.get("")
def overview(
    request: Request, admin: AdminPage, session: SessionDep, settings: SettingsDep
) -> Response:
    """Jobs by status, queue depths, workers alive, recent failures."""
    return render(
        request,
        settings,
        "overview.html",
        page_context(
            admin,
            "overview",
            counts=queries.job_counts(session),
            statuses=queries.STATUSES,
            depths=queries.queue_depths(settings),
            workers=queries.workers(session, settings),
            alive_window=queries.ALIVE_BEATS * settings.reconcile_every_s,
            failures=queries.recent_failures(session),
        ),
    )


@router.get("/jobs")
def job_list(
    request: Request,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
    status: str = "",
    kind: str = "",
    page_number: PageNumber = 1,
) -> Response:
    """Jobs, newest first, filtered by status and kind, with progress and ETA."""
    status = status if status in queries.STATUSES else ""
    kind = kind if kind in queries.KINDS else ""
    rows, total = jobs.list_jobs(
        session,
        principal=admin.principal,
        status=status or None,
        kind=kind or None,
        limit=PAGE_SIZE,
        offset=page_offset(page_number),
    )
    return render(
        request,
        settings,
        "jobs.html",
        page_context(
            admin,
            "jobs",
            jobs=rows,
            status=status,
            kind=kind,
            statuses=queries.STATUSES,
            kinds=queries.KINDS,
            pager=pager(total, page_number),
        ),
    )


def _job(session: Session, admin: AdminSession, job_id: int) -> Job:
    try:
        return jobs.get_job(session, principal=admin.principal, job_id=job_id)
    except ApiError as exc:
        raise PageNotFound(f"job {job_id} does not exist") from exc


@router.get("/jobs/{job_id}")
def job_page(
    request: Request, job_id: IdPath, admin: AdminPage, session: SessionDep, settings: SettingsDep
) -> Response:
    """A job: plan, live curves, throughput, attempts and history, error, actions."""
    job = _job(session, admin, job_id)
    return render(
        request,
        settings,
        "job.html",
        page_context(
            admin,
            "jobs",
            job=job,
            plan=queries.plan_rows(job.params or {}),
            holdout=queries.holdout_of(job.params or {}),
            metrics=queries.scalar_rows(training_metrics(job.metrics or {})),
            events=jobs.job_events(session, job.id),
            model=queries.model_of_job(session, job),
            dataset=session.get(Dataset, job.dataset_id) if job.dataset_id else None,
            active=job.status in ACTIVE,
            run_s=queries.run_seconds(job),
            webhooks=delivery_reads(session, job.id),
        ),
    )


@router.get("/api/jobs/{job_id}")
def job_state(
    job_id: IdPath, admin: AdminApi, session: SessionDep, after: Annotated[int, Query(ge=0)] = 0
) -> JSONResponse:
    """A job's progress and the curve points after point `after` (polled by the job page)."""
    job = session.get(Job, job_id)
    if job is None:
        return JSONResponse({"error": {"code": "job_not_found"}}, status_code=404)
    points = queries.curve_points(session, job.id, after_id=after)
    body = {
        "id": job.id,
        "status": job.status,
        "active": job.status in ACTIVE,
        "can_cancel": job.status not in TERMINAL,
        "can_retry": job.status in RETRYABLE,
        "progress": job.progress,
        "step": job.step,
        "total_steps": job.total_steps,
        "eta_s": job.eta_s,
        "images_per_s": job.images_per_s,
        "run_s": queries.run_seconds(job),
        "attempts": job.attempts,
        "model_id": job.model_id,
        "error": job.error,
        "started_at": when(job.started_at),
        "finished_at": when(job.finished_at),
        "heartbeat_at": when(job.heartbeat_at),
        "lease_owner": job.lease_owner or "—",
        "events": [
            {
                "at": when(e.at),
                "kind": e.kind,
                "attempt": e.attempt,
                "step": e.step,
                "worker": e.worker or "—",
                "detail": e.detail or "",
            }
            for e in jobs.job_events(session, job.id)
        ],
        "points": points,
        "last_id": points[-1]["id"] if points else after,
    }
    return JSONResponse(body, headers=NO_STORE)


def _job_action(
    request: Request, settings: Settings, job_id: int, action: str, run: Callable[[], Job]
) -> Response:
    response = RedirectResponse(f"/admin/jobs/{job_id}", status_code=303)
    try:
        job = run()
    except ApiError as exc:
        if exc.status == 404:
            raise PageNotFound(f"job {job_id} does not exist") from exc
        set_flash(request, response, settings, exc.message)
    else:
        set_flash(request, response, settings, f"Job {job.id}: {action} ({job.status}).")
    return response


@router.post("/jobs/{job_id}/cancel")
def cancel(
    request: Request,
    job_id: IdPath,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Cancel a job (queued: at once; running: between two steps)."""
    check_csrf(admin, csrf_token)
    return _job_action(
        request,
        settings,
        job_id,
        "cancel requested",
        lambda: jobs.cancel_job(session, settings, principal=admin.principal, job_id=job_id),
    )


@router.post("/jobs/{job_id}/retry")
def retry(
    request: Request,
    job_id: IdPath,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Re-run a failed or cancelled job from its last checkpoint."""
    check_csrf(admin, csrf_token)
    return _job_action(
        request,
        settings,
        job_id,
        "queued again",
        lambda: jobs.retry_job(session, settings, principal=admin.principal, job_id=job_id),
    )


@router.post("/jobs/{job_id}/webhooks/{delivery_id}/resend")
def resend_webhook(
    request: Request,
    job_id: IdPath,
    delivery_id: IdPath,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Send a job's webhook delivery again (same event id, a fresh retry window)."""
    check_csrf(admin, csrf_token)
    response = RedirectResponse(f"/admin/jobs/{job_id}", status_code=303)
    try:
        delivery = resend(
            session, settings, principal=admin.principal, job_id=job_id, delivery_id=delivery_id
        )
    except ApiError as exc:
        if exc.code == "job_not_found":
            raise PageNotFound(f"job {job_id} does not exist") from exc
        set_flash(request, response, settings, exc.message)
    else:
        set_flash(
            request,
            response,
            settings,
            f"Job {job_id}: webhook {delivery.event_id} queued to be sent again.",
        )
    return response


# --- datasets and base models ----------------------------------------------------------------


@router.get("/datasets")
def dataset_list(
    request: Request,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
    page_number: PageNumber = 1,
) -> Response:
    """Datasets, newest first, with class and image counts."""
    rows, total = queries.datasets_page(session, limit=PAGE_SIZE, offset=page_offset(page_number))
    return render(
        request,
        settings,
        "datasets.html",
        page_context(admin, "datasets", datasets=rows, pager=pager(total, page_number)),
    )


@router.get("/datasets/{dataset_id}")
def dataset_page(
    request: Request,
    dataset_id: IdPath,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
) -> Response:
    """A dataset: images per class and split, and thumbnails of each class."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise PageNotFound(f"dataset {dataset_id} does not exist")
    counts = queries.split_counts(session, dataset.id)
    totals = {label: sum(splits.values()) for label, splits in counts.items()}
    split_totals = {
        split: sum(splits.get(split, 0) for splits in counts.values())
        for split in ("train", "val", "test")
    }
    return render(
        request,
        settings,
        "dataset.html",
        page_context(
            admin,
            "datasets",
            dataset=dataset,
            counts=counts,
            totals=totals,
            split_totals=split_totals,
            largest=max(totals.values(), default=1),
            samples=queries.sample_images(session, dataset.id, THUMBS_PER_CLASS),
            jobs=queries.jobs_of_dataset(session, dataset.id),
        ),
    )


@router.get("/thumbnails/{image_id}.jpg")
def image_thumbnail(
    request: Request,
    image_id: IdPath,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    size: Annotated[int, Query()] = SIZES[0],
) -> Response:
    """A dataset image, resized and re-encoded as JPEG (never the uploaded bytes)."""
    row = session.get(Image, image_id)
    if row is None or size not in SIZES:
        return Response(status_code=404)
    etag = f'"{row.sha256[:32]}-{size}"'
    # private: only a signed-in browser may keep it; the image never changes under its id.
    headers = {"Cache-Control": "private, max-age=86400", "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    data = thumbnail(
        store,
        uri=row.uri,
        sha256=row.sha256,
        size=size,
        cache_dir=settings.home.resolve() / "cache" / "thumbnails",
        max_pixels=settings.max_image_pixels,
    )
    return Response(data, media_type="image/jpeg", headers=headers)


@router.get("/base-models")
def base_model_list(request: Request, admin: AdminPage, settings: SettingsDep) -> Response:
    """Installed base models, and how to install the others."""
    rows = list_base_models(settings)
    return render(
        request,
        settings,
        "base_models.html",
        page_context(
            admin,
            "base-models",
            installed=[r for r in rows if r.installed and r.source != "scratch"],
            available=[r for r in rows if not r.installed],
            scratch=[r for r in rows if r.source == "scratch"],
            weights_dir=settings.weights_dir,
        ),
    )


# The model and audit pages live in their own modules, under the same /admin prefix.
router.include_router(model_views.router)
router.include_router(audit_views.router)
