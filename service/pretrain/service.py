"""Create pre-training jobs: resolve the data, the upstream plan, commit, then enqueue."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from bit_core.registry import ARCHITECTURES
from bit_core.upstream import upstream_plan
from bit_core.upstream_data import UpstreamImages
from service.auth import Principal
from service.db.artifacts import ArtifactStore, LocalArtifactStore
from service.db.models import Dataset, Image, Job, utcnow
from service.errors import ApiError, not_found
from service.jobs.lifecycle import add_event
from service.jobs.service import send
from service.jobs.status import JobStatus
from service.pretrain.schemas import PretrainRequest
from service.quotas import check_new_job
from service.settings import Settings


def _allowed_path(settings: Settings, raw: str) -> Path:
    """Only folders the operator allowed: a job must not read arbitrary server files."""
    path = Path(raw).resolve()
    roots = [Path(r).resolve() for r in settings.pretrain_data_roots.split(",") if r.strip()]
    if not any(path == root or root in path.parents for root in roots):
        raise ApiError(
            422,
            "data_path_not_allowed",
            f"{raw} is not under an allowed data root; set BIT_PRETRAIN_DATA_ROOTS on the "
            "server, or upload the data as a dataset and pass dataset_id",
        )
    if not path.exists():
        raise ApiError(422, "data_path_missing", f"{raw} does not exist on the server")
    return path


def _dataset_manifest(session: Session, store: ArtifactStore, dataset_id: int) -> Path:
    """Write an uploaded dataset as a JSONL manifest the ranks can read."""
    if not isinstance(store, LocalArtifactStore):
        raise ApiError(
            422,
            "unsupported_store",
            "pre-training from a dataset needs a local or "
            "shared-volume artifact store; pass data_path instead",
        )
    rows = session.execute(
        select(Image.uri, Image.label)
        .where(Image.dataset_id == dataset_id, Image.deleted_at.is_(None))
        .order_by(Image.id)
    ).all()
    text = "\n".join(
        json.dumps({"uri": str(store.path(uri)), "labels": [label]}) for uri, label in rows
    )
    key = f"datasets/{dataset_id}/pretrain-manifest.jsonl"
    store.put_bytes(key, text.encode())
    return store.path(key)


def create_pretrain_job(
    session: Session,
    settings: Settings,
    store: ArtifactStore,
    *,
    principal: Principal,
    request: PretrainRequest,
) -> Job:
    """Validate, plan, commit the job row, then enqueue it on the `pretrain` queue."""
    if request.arch not in ARCHITECTURES:
        raise ApiError(
            422,
            "unknown_architecture",
            f"unknown architecture '{request.arch}'; one of {', '.join(ARCHITECTURES)}",
        )
    # Before the dataset's manifest is written: a refused job leaves nothing behind.
    check_new_job(session, settings, tenant=principal.tenant, kind="pretrain")
    if request.dataset_id is not None:
        dataset = session.get(Dataset, request.dataset_id)
        if dataset is None:
            raise not_found("dataset", request.dataset_id)
        data_path = _dataset_manifest(session, store, dataset.id)
    else:
        data_path = _allowed_path(settings, str(request.data_path))
    try:
        data = (
            UpstreamImages.from_manifest(data_path)
            if data_path.is_file()
            else UpstreamImages.from_folder(data_path)
        )
        plan = upstream_plan(
            len(data),
            len(data.classes),
            recipe=request.recipe,
            multi_label=data.multi_label,
            global_batch=request.global_batch,
            epochs=request.epochs,
            total_steps=request.total_steps,
            **request.overrides,
        )
    except ValueError as exc:
        raise ApiError(422, "invalid_pretrain_request", str(exc)) from exc
    if plan.global_batch % (request.nnodes * request.nproc_per_node):
        raise ApiError(
            422,
            "invalid_pretrain_request",
            f"global_batch {plan.global_batch} must split evenly over "
            f"{request.nnodes * request.nproc_per_node} processes",
        )
    job = Job(
        tenant=principal.tenant,
        kind="pretrain",
        status=JobStatus.QUEUED,
        base_model=request.arch,
        mode="pretrain",
        total_steps=plan.total_steps,
        enqueued_at=utcnow(),
        params={
            "arch": request.arch,
            "data": str(data_path),
            "plan": plan.to_dict(),
            "nnodes": request.nnodes,
            "nproc_per_node": request.nproc_per_node,
            "max_restarts": request.max_restarts,
            "name": request.name,
            "config": {
                "seed": request.seed,
                "deterministic": settings.deterministic,
                "device": settings.device,
                "checkpoint_every": settings.checkpoint_every,
            },
        },
    )
    session.add(job)
    session.flush()
    add_event(session, job, "created")
    session.commit()
    send(session, settings, job)
    return job
