"""The dashboard's pages under /admin: server-rendered, HTTP only (queries live elsewhere).

Pages need a session (see `auth`); every POST carries the session's CSRF token. Actions
call the same service functions as the API, as the signed-in admin.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.responses import Response

from service.audit import ACTIONS, AuditFilter, AuditSlice, list_events, record
from service.auth import authenticate
from service.base_models import list_base_models
from service.dashboard import queries
from service.dashboard.auth import (
    FLASH_COOKIE,
    AdminApi,
    AdminPage,
    AdminSession,
    check_csrf,
    check_login_token,
    clear_flash,
    client_address,
    end_session,
    login_token,
    opens_dashboard,
    read_flash,
    read_session,
    safe_next,
    set_flash,
    set_login_cookie,
    start_session,
)
from service.dashboard.evaluation import (
    EVALUATION_SPLITS,
    cv_recall_rows,
    has_results,
    model_quality,
    report_view,
    training_metrics,
)
from service.dashboard.templating import NO_STORE, page, when
from service.dashboard.thumbnails import SIZES, thumbnail
from service.db.models import Dataset, Image, Job, Model
from service.deps import IdPath, SessionDep, SettingsDep, StoreDep
from service.errors import ApiError
from service.evaluations.schemas import EvaluationCreate
from service.evaluations.service import create_evaluation
from service.inference import InferenceDep
from service.jobs import service as jobs
from service.jobs.status import ACTIVE, RETRYABLE, TERMINAL
from service.models import service as models
from service.settings import Settings
from service.webhooks.service import delivery_reads, resend

router = APIRouter(prefix="/admin", include_in_schema=False)

PAGE_SIZE = 25
TRY_TOP_K = 5
THUMBS_PER_CLASS = 12
MAX_KEY_CHARS = 512  # keys are 47 characters; anything far longer is not one


class PageNotFound(Exception):
    """A dashboard URL naming a row that does not exist (answered as an HTML 404)."""


def _context(admin: AdminSession | None, nav: str, **values: Any) -> dict[str, Any]:
    return {"admin": admin, "csrf": admin.csrf if admin else "", "nav": nav, **values}


def _render(
    request: Request,
    settings: Settings,
    template: str,
    context: dict[str, Any],
    *,
    status_code: int = 200,
) -> Response:
    """A page, with the one-time notice left by the previous action (if any)."""
    context["flash"] = read_flash(request, settings)
    response = page(request, template, context, status_code=status_code)
    if FLASH_COOKIE in request.cookies:
        clear_flash(response)
    return response


def _pages(total: int, page_number: int) -> dict[str, int]:
    last = max(1, math.ceil(total / PAGE_SIZE))
    return {"page": min(page_number, last), "last": last, "total": total}


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
        _context(None, "login", login_token=token, next=next_path, error=error),
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
    return _render(
        request,
        settings,
        "overview.html",
        _context(
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
    page_number: Annotated[int, Query(alias="page", ge=1, le=100_000)] = 1,
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
        offset=(page_number - 1) * PAGE_SIZE,
    )
    return _render(
        request,
        settings,
        "jobs.html",
        _context(
            admin,
            "jobs",
            jobs=rows,
            status=status,
            kind=kind,
            statuses=queries.STATUSES,
            kinds=queries.KINDS,
            pager=_pages(total, page_number),
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
    return _render(
        request,
        settings,
        "job.html",
        _context(
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


# --- models ----------------------------------------------------------------------------------


@router.get("/models")
def model_list(
    request: Request,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
    page_number: Annotated[int, Query(alias="page", ge=1, le=100_000)] = 1,
) -> Response:
    """Trained models, newest first."""
    rows, total = queries.models_page(
        session, limit=PAGE_SIZE, offset=(page_number - 1) * PAGE_SIZE
    )
    return _render(
        request,
        settings,
        "models.html",
        _context(
            admin,
            "models",
            models=rows,
            qualities={m.id: model_quality(m) for m in rows},
            pager=_pages(total, page_number),
        ),
    )


def _model(session: Session, admin: AdminSession, model_id: int) -> Model:
    try:
        return models.get_model(session, principal=admin.principal, model_id=model_id)
    except ApiError as exc:
        raise PageNotFound(f"model {model_id} does not exist") from exc


def _choose_report(
    rows: list[queries.EvaluationRow], quality: dict[str, Any], choice: str
) -> tuple[str, dict[str, Any] | None]:
    """Which report the page details: the one asked for, else the newest finished
    evaluation, else the held-out report of training. ("", None): none to show."""
    holdout = quality.get("report") if quality["kind"] == "holdout" else None
    holdout = holdout if has_results(holdout) else None
    if choice == "holdout" and holdout is not None:
        return "holdout", holdout
    for row in rows:
        if choice == str(row.evaluation.id):
            results = row.evaluation.results
            return choice, results if has_results(results) else None
    for row in rows:
        if has_results(row.evaluation.results):
            return str(row.evaluation.id), row.evaluation.results
    return ("holdout", holdout) if holdout is not None else ("", None)


def _model_context(
    admin: AdminSession, session: Session, model_id: int, choice: str = ""
) -> dict[str, Any]:
    model = _model(session, admin, model_id)
    job = session.get(Job, model.job_id) if model.job_id else None
    quality = model_quality(model)
    rows = queries.evaluations_of_model(session, model.id)
    selected, report = _choose_report(rows, quality, choice)
    return _context(
        admin,
        "models",
        model=model,
        job=job,
        quality=quality,
        cv_recall=cv_recall_rows(quality, model.classes),
        evaluations=rows,
        selected=selected,
        selected_row=next((r for r in rows if str(r.evaluation.id) == selected), None),
        view=report_view(report, threshold=model.threshold) if report else None,
        splits=EVALUATION_SPLITS,
        plan=queries.plan_rows(model.plan or {}),
        metrics=queries.scalar_rows(training_metrics(model.metrics or {})),
        top_k=min(TRY_TOP_K, len(model.classes)),  # the form's max is the class count
    )


@router.get("/models/{model_id}")
def model_page(
    request: Request,
    model_id: IdPath,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
    evaluation: Annotated[str, Query(max_length=20)] = "",
) -> Response:
    """A model: quality on held-out images, evaluations with PR curves, threshold, try it."""
    context = _model_context(admin, session, model_id, evaluation)
    return _render(request, settings, "model.html", context)


def _model_url(model_id: int, evaluation: str, anchor: str) -> str:
    query = f"?{urlencode({'evaluation': evaluation})}" if evaluation.isalnum() else ""
    return f"/admin/models/{model_id}{query}#{anchor}"


@router.post("/models/{model_id}/threshold")
def save_threshold(
    request: Request,
    model_id: IdPath,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
    threshold: Annotated[str, Form()] = "",
    clear: Annotated[str, Form()] = "",
    evaluation: Annotated[str, Form(max_length=20)] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Set (or clear) the model's default probability threshold, as PATCH /v1/models does."""
    check_csrf(admin, csrf_token)
    response = RedirectResponse(_model_url(model_id, evaluation, "threshold-h"), status_code=303)
    try:
        value = None if clear else float(threshold)
        model = models.set_threshold(
            session, principal=admin.principal, model_id=model_id, threshold=value
        )
    except ValueError:
        set_flash(request, response, settings, f"'{threshold[:40]}' is not a number.")
    except ApiError as exc:
        if exc.status == 404:
            raise PageNotFound(f"model {model_id} does not exist") from exc
        set_flash(request, response, settings, exc.message)
    else:
        shown = "none: predict keeps every class" if model.threshold is None else model.threshold
        set_flash(request, response, settings, f"Model {model.id}: default threshold {shown}.")
    return response


@router.post("/models/{model_id}/evaluations")
def run_evaluation(
    request: Request,
    model_id: IdPath,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
    dataset_id: Annotated[str, Form()] = "",
    split: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Evaluate the model on a dataset or one split of it, as POST /v1/models/{id}/evaluations."""
    check_csrf(admin, csrf_token)
    response = RedirectResponse(f"/admin/models/{model_id}#evaluations-h", status_code=303)
    try:
        wanted = EvaluationCreate(dataset_id=dataset_id.strip(), split=split or None)  # type: ignore[arg-type]
    except ValidationError:
        set_flash(
            request, response, settings, "Give the id of a dataset, and test, val, train or all."
        )
        return response
    try:
        evaluation = create_evaluation(
            session, settings, principal=admin.principal, model_id=model_id, request=wanted
        )
    except ApiError as exc:
        if exc.code == "model_not_found":
            raise PageNotFound(f"model {model_id} does not exist") from exc
        set_flash(request, response, settings, exc.message)
        return response
    response = RedirectResponse(
        _model_url(model_id, str(evaluation.id), "report-h"), status_code=303
    )
    set_flash(
        request,
        response,
        settings,
        f"Evaluation {evaluation.id} queued as job {evaluation.job_id}: "
        "its results show here when the job ends.",
    )
    return response


@router.post("/models/{model_id}/try")
async def try_model(
    request: Request,
    model_id: IdPath,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
    inference: InferenceDep,
    image: Annotated[UploadFile | None, File()] = None,
    top_k: Annotated[str, Form()] = str(TRY_TOP_K),
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Classify one uploaded image with the model and show the top-k."""
    check_csrf(admin, csrf_token)
    context = await run_in_threadpool(_model_context, admin, session, model_id)
    model: Model = context["model"]
    error, predictions, preview = None, None, None
    try:
        k = max(1, min(int(top_k), len(model.classes)))
    except ValueError:
        k = TRY_TOP_K
    context["top_k"] = k
    if image is None or not image.filename:
        error = "Choose an image file first."
    elif (image.size or 0) > settings.max_image_bytes:
        error = f"{image.filename} is over the limit of {settings.max_image_bytes} bytes."
    else:
        data = await image.read()
        try:
            ready = await run_in_threadpool(
                models.model_for_prediction, session, principal=admin.principal, model_id=model.id
            )
            rows = await inference.predict(
                models.model_ref(ready), [data], [image.filename], top_k=k
            )
            predictions = rows[0]
            preview = await run_in_threadpool(_preview, data, settings)
        except ApiError as exc:
            error = exc.message
    context.update(try_error=error, predictions=predictions, preview=preview, tried=image)
    return _render(request, settings, "model.html", context, status_code=422 if error else 200)


def _preview(data: bytes, settings: Settings) -> str:
    """The tried image as a small JPEG data URL: pixels we encoded, not the upload."""
    from service.dashboard.thumbnails import render

    jpeg = render(data, SIZES[-1], max_pixels=settings.max_image_pixels)
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


# --- datasets and base models ----------------------------------------------------------------


@router.get("/datasets")
def dataset_list(
    request: Request,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
    page_number: Annotated[int, Query(alias="page", ge=1, le=100_000)] = 1,
) -> Response:
    """Datasets, newest first, with class and image counts."""
    rows, total = queries.datasets_page(
        session, limit=PAGE_SIZE, offset=(page_number - 1) * PAGE_SIZE
    )
    return _render(
        request,
        settings,
        "datasets.html",
        _context(admin, "datasets", datasets=rows, pager=_pages(total, page_number)),
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
    return _render(
        request,
        settings,
        "dataset.html",
        _context(
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
    return _render(
        request,
        settings,
        "base_models.html",
        _context(
            admin,
            "base-models",
            installed=[r for r in rows if r.installed and r.source != "scratch"],
            available=[r for r in rows if not r.installed],
            scratch=[r for r in rows if r.source == "scratch"],
            weights_dir=settings.weights_dir,
        ),
    )


# --- audit log -------------------------------------------------------------------------------


def _audit_filter(values: dict[str, str]) -> AuditFilter:
    """The form's filters as an AuditFilter; ApiError (shown on the page) for a bad one."""
    for name in ("tenant", "actor"):
        if not values[name].isprintable():
            raise ApiError(422, "invalid_filter", f"{name} must be printable text")

    def moment(name: str) -> dt.datetime | None:
        text = values[name]
        if not text:
            return None
        try:
            parsed = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ApiError(
                422,
                "invalid_time",
                f"{name} '{text}' is not a time; write e.g. 2025-01-31 12:00 (UTC) or an "
                "RFC 3339 time such as 2025-01-31T12:00:00+01:00",
            ) from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)  # the form says UTC

    return AuditFilter(
        tenant=values["tenant"] or None,
        action=values["action"] or None,
        actor=values["actor"] or None,
        since=moment("since"),
        until=moment("until"),
    )


@router.get("/audit")
def audit_log(
    request: Request,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
    tenant: str = "",
    action: str = "",
    actor: str = "",
    since: str = "",
    until: str = "",
    page_number: Annotated[int, Query(alias="page", ge=1, le=100_000)] = 1,
) -> Response:
    """Who did what, newest first, filtered by tenant, action, acting key and time."""
    values = {
        "tenant": tenant.strip()[:64],
        "action": action if action in ACTIONS else "",
        "actor": actor.strip()[:16],
        "since": since.strip()[:64],
        "until": until.strip()[:64],
    }
    error = None
    try:
        found = list_events(
            session,
            where=_audit_filter(values),
            limit=PAGE_SIZE,
            offset=(page_number - 1) * PAGE_SIZE,
        )
    except ApiError as exc:  # a filter the form cannot use: say so, show nothing
        error, found = exc.message, AuditSlice([], 0, False)
    return _render(
        request,
        settings,
        "audit.html",
        _context(
            admin,
            "audit",
            events=found.rows,
            actions=ACTIONS,
            filters=values,
            filtered=any(values.values()),
            query=urlencode({name: value for name, value in values.items() if value}),
            error=error,
            pager=_pages(found.total, page_number),
        ),
        status_code=422 if error else 200,
    )
