"""Models out and in: export (bundle, official .npz, ONNX) as a download; bundle import."""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from bit_core.checkpoint import WEIGHTS_FILE, read_model_info
from bit_core.export import BundleError, ExportUnavailable, export, read_bundle
from service import quotas
from service.db.models import Model
from service.deps import (
    AUTH_RESPONSES,
    SCOPE_ERRORS,
    IdPath,
    ModelReader,
    ModelWriter,
    SessionDep,
    SettingsDep,
    StoreDep,
)
from service.errors import ApiError, error_responses
from service.models import service
from service.models.bases import ArtifactBaseStore
from service.models.schemas import ModelRead

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/models", tags=["models"], responses=AUTH_RESPONSES)

SUFFIXES = {"bundle": ".zip", "npz": ".npz", "onnx": ".onnx"}
MEDIA_TYPES = {
    "bundle": "application/zip",
    "npz": "application/octet-stream",
    "onnx": "application/octet-stream",
}
IMPORTED_NAME = "imported"


def _remove(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


@router.get(
    "/{model_id}/export",
    summary="Download a model: bundle, official .npz or ONNX",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/zip": {}, "application/octet-stream": {}},
            "description": "the file: application/zip (bundle), else application/octet-stream",
        },
        **error_responses(
            *SCOPE_ERRORS,
            (404, "model_not_found", "no model 7 for this API key"),
            (500, "model_corrupt", "the stored files of model 7 fail their integrity check"),
            (501, "export_unavailable", "ONNX export needs the onnx package on the server"),
            (503, "artifact_store_unavailable", "the files of model 7 cannot be read now"),
        ),
    },
)
def export_model(
    model_id: IdPath,
    session: SessionDep,
    principal: ModelReader,
    store: StoreDep,
    format: Annotated[
        str, Query(pattern="^(bundle|npz|onnx)$", description="bundle | npz | onnx")
    ] = "bundle",
) -> FileResponse:
    """The model as a file: `bundle` (weights.safetensors + model.json, which `bit predict`,
    `bit weights import` and `POST /v1/models/import` take), `npz` (the official BiT layout,
    head included) or `onnx` (weight standardization folded, dynamic batch, preprocessing
    and class names in its metadata)."""
    model = service.get_model(session, principal=principal, model_id=model_id)
    session.close()  # the export below takes seconds; hold no connection meanwhile
    try:
        directory = store.fetch_dir(model.uri)
        if read_model_info(directory).sha256 != model.sha256:
            raise ValueError("model.json differs from the registered model")
    except FileNotFoundError as exc:
        raise ApiError(
            500,
            "model_files_missing",
            f"the stored files of model {model_id} are missing; an operator must restore the "
            "artifact store",
        ) from exc
    except ValueError as exc:
        log.error("model %s: corrupt files under %r: %s", model_id, model.uri, exc)
        raise ApiError(
            500,
            "model_corrupt",
            f"the stored files of model {model_id} fail their integrity check; an operator "
            "must restore them from a backup",
        ) from exc
    except OSError as exc:
        raise ApiError(
            503,
            "artifact_store_unavailable",
            f"the files of model {model_id} cannot be read right now; retry in a few seconds",
            retry_after=5,
        ) from exc
    scratch = tempfile.mkdtemp(prefix="bit-export-")
    filename = f"{model.name or 'model'}-v{model.version}{SUFFIXES[format]}"
    try:
        out = export(directory, format, Path(scratch) / filename, bases=ArtifactBaseStore(store))
    except ExportUnavailable as exc:
        _remove(scratch)
        raise ApiError(501, "export_unavailable", f"{exc}; ask an operator to install it") from exc
    except ValueError as exc:  # sha256 mismatch of the weights
        _remove(scratch)
        raise ApiError(
            500,
            "model_corrupt",
            f"the stored weights of model {model_id} fail their integrity check",
        ) from exc
    except BaseException:
        _remove(scratch)
        raise
    return FileResponse(
        out,
        media_type=MEDIA_TYPES[format],
        filename=filename,  # Content-Disposition: attachment
        background=BackgroundTask(_remove, scratch),
    )


IMPORT_ERRORS: dict[int | str, dict[str, Any]] = error_responses(
    *SCOPE_ERRORS,
    (400, "invalid_multipart", "Invalid multipart data: send a well-formed multipart body"),
    (413, "upload_too_large", "the request body is over the upload limit"),
    (422, "invalid_bundle", "a bundle holds exactly weights.safetensors and model.json"),
    (422, "invalid_model_name", "model name ... is invalid: 1-64 characters"),
    (429, "quota_models_exceeded", "tenant 'acme' has 1,000 models and its limit is 1,000"),
    (507, "quota_stored_bytes_exceeded", "tenant 'acme' stores ... bytes"),
)


@router.post(
    "/import",
    status_code=201,
    response_model=ModelRead,
    summary="Import a model bundle",
    responses=IMPORT_ERRORS,
)
def import_model(
    session: SessionDep,
    principal: ModelWriter,
    store: StoreDep,
    settings: SettingsDep,
    bundle: Annotated[UploadFile, File(description="a bundle from the export (.zip or .tar)")],
    name: Annotated[str | None, Form(description="model name (default: imported)")] = None,
) -> ModelRead:
    """Register a bundle exported by another service (or `bit export --format bundle`) as
    the next version of model `name` of your tenant. The bundle is checked strictly: only
    its two files, within the upload limit, a valid model.json, safetensors weights that
    match its sha256 and architecture (nothing is unpickled)."""
    model_name = service.check_name(name or IMPORTED_NAME)
    tenant = principal.tenant
    limits = quotas.effective_limits(session, settings, tenant=tenant)
    used = quotas.usage(session, tenant=tenant)
    if limits.models and used.models + 1 > limits.models:
        raise ApiError(
            429,
            "quota_models_exceeded",
            f"tenant '{tenant}' has {used.models:,} models and its limit is {limits.models:,}; "
            "delete models you no longer need (DELETE /v1/models/{id}) or ask an operator "
            f"to raise the quota (PUT /v1/tenants/{tenant}/quotas)",
        )
    with tempfile.TemporaryDirectory(prefix="bit-import-") as scratch:
        upload = Path(scratch) / "bundle"
        with open(upload, "wb") as handle:
            shutil.copyfileobj(bundle.file, handle, 1 << 20)
        try:
            info = read_bundle(
                upload, Path(scratch) / "model", max_weights_bytes=settings.max_upload_bytes
            )
        except BundleError as exc:
            reason = str(exc)  # without this host's temporary paths
            for path in (upload, Path(scratch) / "model"):
                reason = reason.replace(str(path), "the bundle")
            raise ApiError(
                422,
                "invalid_bundle",
                f"{reason}; upload a file written by "
                "`bit export --format bundle` or GET /v1/models/{id}/export?format=bundle",
            ) from exc
        model_dir = Path(scratch) / "model"
        size = (model_dir / WEIGHTS_FILE).stat().st_size
        if limits.stored_bytes and used.stored_bytes + size > limits.stored_bytes:
            raise ApiError(
                507,
                "quota_stored_bytes_exceeded",
                f"tenant '{tenant}' stores {used.stored_bytes:,} bytes, this model adds "
                f"{size:,} and the limit is {limits.stored_bytes:,}; delete models or images "
                f"you no longer need, or ask an operator to raise the quota",
            )
        key = f"imports/{uuid.uuid4().hex}"
        store.publish_dir(key, model_dir)  # files first, manifest last
    model = Model(
        tenant=principal.tenant,
        job_id=None,
        name=model_name,
        arch=info.arch,
        classes=info.classes,
        crop=info.crop,
        base_model=info.base_model,
        plan={**info.plan, "imported": True},
        metrics=service.stored_metrics(info),  # its provenance too, as the bundle holds it
        temperature=info.temperature,
        uri=key,
        sha256=info.sha256,
        size_bytes=size,
    )
    service.add_model(session, model)
    session.commit()
    return ModelRead.model_validate(model)
