"""The dashboard's model pages: the list, a model's quality and evaluations, its threshold,
running an evaluation and trying the model on an image."""

from __future__ import annotations

import base64
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.responses import Response

from service.dashboard import queries
from service.dashboard.auth import AdminPage, AdminSession, check_csrf, set_flash
from service.dashboard.evaluation import (
    EVALUATION_SPLITS,
    cv_recall_rows,
    has_results,
    model_quality,
    report_view,
    training_metrics,
)
from service.dashboard.rendering import (
    PAGE_SIZE,
    PageNotFound,
    PageNumber,
    page_context,
    page_offset,
    pager,
    render,
)
from service.dashboard.thumbnails import SIZES
from service.db.models import Job, Model, ModelAlias
from service.deps import IdPath, SessionDep, SettingsDep
from service.errors import ApiError
from service.evaluations.schemas import EvaluationCreate
from service.evaluations.service import create_evaluation
from service.inference import InferenceDep
from service.models import service as models
from service.settings import Settings

router = APIRouter(include_in_schema=False)

TRY_TOP_K = 5


@router.get("/models")
def model_list(
    request: Request,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
    page_number: PageNumber = 1,
) -> Response:
    """Trained models, newest first."""
    rows, total = queries.models_page(session, limit=PAGE_SIZE, offset=page_offset(page_number))
    return render(
        request,
        settings,
        "models.html",
        page_context(
            admin,
            "models",
            models=rows,
            qualities={m.id: model_quality(m) for m in rows},
            pager=pager(total, page_number),
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
    return page_context(
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
        provenance=provenance_rows(models.model_provenance(model)),
        metrics=queries.scalar_rows(training_metrics(model.metrics or {})),
        top_k=min(TRY_TOP_K, len(model.classes)),  # the form's max is the class count
        **_name_context(session, model),
    )


def provenance_rows(provenance: dict[str, Any]) -> list[tuple[str, str]]:
    """What made the model, as (name, value) rows; its plan is the page's Plan section."""
    shown = {key: value for key, value in provenance.items() if key != "plan"}
    return [(name, "—" if value == "None" else value) for name, value in queries.plan_rows(shown)]


def _name_context(session: Session, model: Model) -> dict[str, Any]:
    """The other versions of the model's name, and its aliases with the versions they name."""
    versions = session.execute(
        select(Model.id, Model.version, Model.status)
        .where(Model.tenant == model.tenant, Model.name == model.name)
        .order_by(Model.version.desc())
    ).all()
    aliases = session.execute(
        select(ModelAlias.alias, Model.version, ModelAlias.model_id)
        .join(Model, Model.id == ModelAlias.model_id)
        .where(ModelAlias.tenant == model.tenant, ModelAlias.name == model.name)
        .order_by(ModelAlias.alias)
    ).all()
    return {"versions": versions, "aliases": aliases}


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
    return render(request, settings, "model.html", context)


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


@router.post("/models/{model_id}/alias")
def move_alias(
    request: Request,
    model_id: IdPath,
    admin: AdminPage,
    session: SessionDep,
    settings: SettingsDep,
    alias: Annotated[str, Form(max_length=64)] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Point an alias of the model's name at this version, as PUT .../aliases/{alias} does."""
    check_csrf(admin, csrf_token)
    model = _model(session, admin, model_id)
    response = RedirectResponse(f"/admin/models/{model_id}#naming", status_code=303)
    try:
        models.set_alias(
            session,
            principal=admin.principal,
            name=model.name,
            alias=alias.strip(),
            version=model.version,
            tenant=model.tenant,
        )
    except ApiError as exc:
        set_flash(request, response, settings, exc.message)
    else:
        set_flash(
            request,
            response,
            settings,
            f"{model.name}@{alias.strip()} now points at version {model.version}.",
        )
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
    return render(request, settings, "model.html", context, status_code=422 if error else 200)


def _preview(data: bytes, settings: Settings) -> str:
    """The tried image as a small JPEG data URL: pixels we encoded, not the upload."""
    from service.dashboard.thumbnails import render

    jpeg = render(data, SIZES[-1], max_pixels=settings.max_image_pixels)
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
