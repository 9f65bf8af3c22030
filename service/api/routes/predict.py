"""Predict: classify images with a trained model (multipart upload or base64 JSON)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from bit_core.predict import Prediction
from service.db.models import MAX_ID
from service.deps import AUTH_RESPONSES, Predictor, SettingsDep
from service.errors import ApiError
from service.inference.inference import InferenceDep
from service.inference.timing import PredictTiming
from service.lookups import LookupsDep
from service.models import service
from service.models.schemas import (
    ImagePrediction,
    LabelProbability,
    PredictJson,
    PredictResponse,
    model_version,
)
from service.quotas.predictions import enforce_predictions
from service.settings import Settings

router = APIRouter(prefix="/v1", tags=["predict"], responses=AUTH_RESPONSES)

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["files"],
    "properties": {
        "model_id": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_ID,
            "description": "id of a ready model (or `model`)",
        },
        "model": {
            "type": "string",
            "description": "instead of model_id: `name`, `name@alias` or `name:3`",
        },
        "files": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": f"1 to {service.MAX_IMAGES_PER_REQUEST} image files",
        },
        "top_k": {"type": "integer", "default": 5, "minimum": 1, "maximum": service.MAX_TOP_K},
        "threshold": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "description": "leave out classes below this probability; default: the model's",
        },
    },
}
_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            "application/json": {"schema": PredictJson.model_json_schema()},
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "`invalid_multipart`: a multipart body that cannot be parsed"},
    404: {"description": "`model_not_found`"},
    429: {"description": "`rate_limited` (the key's), `quota_predictions_exceeded` (the tenant's)"},
    409: {"description": "`model_archived`"},
    413: {"description": "`too_many_images`, `image_too_large`, `upload_too_large`"},
    415: {"description": "`unsupported_media_type`"},
    422: {
        "description": "`invalid_model_name`, `invalid_top_k`, `invalid_threshold`, "
        "`invalid_base64`, `invalid_image`, `no_images`, `invalid_request`"
    },
}


@dataclass
class _Inputs:
    model_id: int | None
    top_k: int
    sources: list[bytes]
    names: list[str]  # how errors refer to each image
    filenames: list[str | None]  # echoed in the answer (multipart only)
    encoded: list[str] | None = None  # JSON: base64, decoded once the model is known
    threshold: float | None = None  # the request's; None: the model's
    model: str | None = None  # `name`, `name@alias` or `name:3`, instead of model_id


def _one_model(model_id: int | None, model: str | None) -> None:
    if (model_id is None) == (model is None):
        raise ApiError(
            422,
            "invalid_request",
            "send exactly one of model_id (an id) or model (`name`, `name@alias`, `name:3`)",
        )


def _form_int(value: object, field: str, code: str) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise ApiError(422, code, f"{field} must be an integer, got {str(value)[:40]!r}") from None


def _form_threshold(value: object) -> float | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        threshold = float(str(value))
    except ValueError:
        raise ApiError(
            422,
            "invalid_threshold",
            f"threshold must be a number between 0 and 1, got {str(value)[:40]!r}",
        ) from None
    return service.check_threshold(threshold)


async def _read_multipart(request: Request, settings: Settings) -> _Inputs:
    try:
        form = await request.form(max_files=service.MAX_IMAGES_PER_REQUEST)
    except HTTPException as exc:  # starlette's parser limits and syntax errors
        if "Too many files" in str(exc.detail):
            service.check_image_count(service.MAX_IMAGES_PER_REQUEST + 1)
        raise ApiError(
            400, "invalid_multipart", f"unreadable multipart body: {exc.detail}"
        ) from exc
    try:
        model_ref = str(form["model"]) if "model" in form else None
        model_id = None
        if "model_id" in form:
            model_id = _form_int(form["model_id"], "model_id", "invalid_request")
        _one_model(model_id, model_ref)
        if model_id is not None and not 1 <= model_id <= MAX_ID:
            raise ApiError(
                422, "invalid_request", f"model_id must be 1 to {MAX_ID}, got {model_id}"
            )
        top_k = service.check_top_k(_form_int(form.get("top_k", 5), "top_k", "invalid_top_k"))
        threshold = _form_threshold(form.get("threshold"))
        files = form.getlist("files")
        service.check_image_count(len(files))
        sources, names = [], []
        for index, upload in enumerate(files):
            if not isinstance(upload, UploadFile):
                raise ApiError(
                    422, "invalid_request", "each `files` part must be a file, not a text field"
                )
            name = upload.filename or f"files[{index}]"
            service.check_image_size(name, upload.size or 0, settings.max_image_bytes)
            sources.append(await upload.read())
            names.append(name)
        return _Inputs(
            model_id, top_k, sources, names, list(names), threshold=threshold, model=model_ref
        )
    finally:
        await form.close()


async def _read_json(request: Request) -> _Inputs:
    try:
        body = PredictJson.model_validate_json(await request.body())
    except ValidationError as exc:
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]) or "body", "problem": e["msg"]}
            for e in exc.errors()
        ]
        summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems[:5])
        raise ApiError(
            422, "invalid_request", f"invalid request: {summary}", problems=problems
        ) from exc
    _one_model(body.model_id, body.model)
    top_k = service.check_top_k(body.top_k)
    threshold = service.check_threshold(body.threshold)
    service.check_image_count(len(body.images))
    names = [f"images[{i}]" for i in range(len(body.images))]
    return _Inputs(
        body.model_id, top_k, [], names, [None] * len(names), body.images, threshold, body.model
    )


def _decode_all(encoded: list[str], max_bytes: int) -> list[bytes]:
    return [
        service.decode_base64_image(data, index=i, max_bytes=max_bytes)
        for i, data in enumerate(encoded)
    ]


@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="Classify images",
    openapi_extra=_OPENAPI_BODY,
    responses=_ERRORS,
)
async def predict(
    request: Request,
    response: Response,
    principal: Predictor,
    settings: SettingsDep,
    lookups: LookupsDep,
    inference: InferenceDep,
) -> PredictResponse:
    """Top-k classes per image: multipart `files` + `model_id`, or JSON base64 `images`.

    Classes below the `threshold` (the request's, else the model's) are left out; an image
    with none at or above it is `below_threshold`, so an app can answer "not sure".

    The `Server-Timing` header splits the time: `decode` (the images), `wait` (for the
    forward thread, batching included), `forward` (the model), `total` (= `time_ms`).
    """
    began = time.perf_counter()
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        inputs = await _read_multipart(request, settings)
    elif media_type == "application/json":
        inputs = await _read_json(request)
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"content type {media_type or 'none'!r} is not accepted; send multipart/form-data "
            "(model_id, files, top_k) or application/json (model_id, images as base64, top_k)",
        )

    model_id = inputs.model_id
    if model_id is None:  # a name: resolved from memory when recently resolved
        assert inputs.model is not None
        model_id = await lookups.model_id_of(principal, inputs.model)
    model = await lookups.model(principal, model_id)
    await enforce_predictions(request, principal, len(inputs.names))  # the tenant's quota
    if inputs.encoded is not None:  # up to max_upload_bytes of base64: decode off the loop
        inputs.sources = await run_in_threadpool(
            _decode_all, inputs.encoded, settings.max_image_bytes
        )
    timing = PredictTiming()
    results = await inference.predict(
        model.ref, inputs.sources, inputs.names, top_k=inputs.top_k, timing=timing
    )
    threshold = model.ref.threshold if inputs.threshold is None else inputs.threshold
    predictions = [
        _prediction(filename, row, threshold)
        for filename, row in zip(inputs.filenames, results, strict=True)
    ]
    took = time.perf_counter() - began
    response.headers["Server-Timing"] = timing.header(took)
    return PredictResponse(
        model_id=model.ref.id,
        model_version=model_version(model.ref.sha256),
        threshold=threshold,
        predictions=predictions,
        time_ms=round(took * 1000, 2),
    )


def _prediction(
    filename: str | None, row: list[Prediction], threshold: float | None
) -> ImagePrediction:
    """One image's answer: its top-k classes, those below `threshold` left out."""
    kept = row if threshold is None else [p for p in row if p.probability >= threshold]
    return ImagePrediction(
        filename=filename,
        top_k=[LabelProbability(label=p.label, probability=p.probability) for p in kept],
        below_threshold=not kept,
    )
