"""Evaluations: create one (a row and a job of kind `evaluate`), list and read a model's.

Keyword-only functions taking the DB session. An evaluation measures a model on images it
is told are labelled truly, so every label must be one of the model's classes; it pins
the images it is created for (the split, and the images uploaded by then), so images added
later do not change what it measured. The worker fills `results` (worker.evaluation).
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.auth import Principal, require_visible
from service.db.models import Dataset, Evaluation, Image, Job, utcnow
from service.errors import ApiError
from service.evaluations.schemas import EvaluationCreate, EvaluationRead
from service.jobs.lifecycle import add_event
from service.jobs.service import send
from service.jobs.status import JobStatus
from service.models.service import get_model
from service.quotas import check_new_job
from service.settings import Settings

KIND = "evaluate"
# Labels named in an error message: a dataset of another project could have thousands.
MAX_LABELS_NAMED = 20


def create_evaluation(
    session: Session,
    settings: Settings,
    *,
    principal: Principal,
    model_id: int,
    request: EvaluationCreate | None,
) -> EvaluationRead:
    """Check the model, the dataset and its labels; commit the evaluation and its job,
    then enqueue the job (on the fine-tuning queue)."""
    model = get_model(session, principal=principal, model_id=model_id)
    if request is None:
        raise ApiError(
            422,
            "invalid_request",
            'send a JSON body: {"dataset_id": <id>, "split": "test" | "val" | "train" | null}',
        )
    dataset_id, split = request.dataset_id, request.split
    dataset = require_visible(principal, session.get(Dataset, dataset_id), "dataset", dataset_id)
    if dataset.tenant != model.tenant:  # only an admin sees both; results stay in one tenant
        raise ApiError(
            422,
            "evaluation_other_tenant",
            f"dataset {dataset.id} belongs to tenant '{dataset.tenant}' and model {model.id} "
            f"to '{model.tenant}'; evaluate a model on a dataset of its own tenant",
        )
    query = select(Image.label, func.count(), func.max(Image.id)).where(
        Image.dataset_id == dataset.id, Image.deleted_at.is_(None)
    )
    if split is not None:
        query = query.where(Image.split == split)
    rows = session.execute(query.group_by(Image.label)).all()
    where = f"split '{split}' of dataset {dataset.id}" if split else f"dataset {dataset.id}"
    if not rows:
        raise ApiError(
            422,
            "evaluation_empty",
            f"{where} has no images; upload images to it"
            + (" with that split, or evaluate the whole dataset (split null)" if split else ""),
        )
    known = set(model.classes)
    unknown = sorted(label for label, _, _ in rows if label not in known)
    if unknown:
        named = ", ".join(repr(label) for label in unknown[:MAX_LABELS_NAMED])
        extra = len(unknown) - MAX_LABELS_NAMED
        more = f" and {extra} more" if extra > 0 else ""
        raise ApiError(
            422,
            "evaluation_unknown_labels",
            f"{where} has images labelled {named}{more}, which model {model.id} does not "
            f"know (its classes: {', '.join(model.classes)}); evaluate on images of those "
            "classes only: move or delete the others, or use another dataset",
            labels=unknown[:MAX_LABELS_NAMED],
        )
    check_new_job(session, settings, tenant=model.tenant, kind=KIND)
    count = sum(n for _, n, _ in rows)
    job = Job(
        tenant=model.tenant,
        kind=KIND,
        status=JobStatus.QUEUED,
        dataset_id=dataset.id,
        base_model=model.base_model or model.arch,
        mode=KIND,
        params={
            "model_id": model.id,
            "split": split,
            "up_to_image_id": max(last for _, _, last in rows),
            "count": count,
            "classes": list(model.classes),
        },
        total_steps=0,
        enqueued_at=utcnow(),
    )
    session.add(job)
    session.flush()
    evaluation = Evaluation(
        tenant=model.tenant,
        model_id=model.id,
        job_id=job.id,
        dataset_id=dataset.id,
        split=split,
        results={},
    )
    session.add(evaluation)
    add_event(session, job, "created", detail=f"evaluate model {model.id} on {count} images")
    session.commit()  # the rows exist before any worker can see the message
    send(session, settings, job)
    return evaluation_read(evaluation, job)


def list_evaluations(
    session: Session, *, principal: Principal, model_id: int, limit: int = 100
) -> list[EvaluationRead]:
    """A model's evaluations, newest first, each with its job's status."""
    model = get_model(session, principal=principal, model_id=model_id)
    rows = session.execute(
        select(Evaluation, Job)
        .outerjoin(Job, Job.id == Evaluation.job_id)
        .where(Evaluation.model_id == model.id)
        .order_by(Evaluation.created_at.desc(), Evaluation.id.desc())
        .limit(limit)
    ).all()
    return [evaluation_read(evaluation, job) for evaluation, job in rows]


def get_evaluation(
    session: Session, *, principal: Principal, model_id: int, evaluation_id: int
) -> EvaluationRead:
    """One evaluation of a visible model; 404 `evaluation_not_found` if it is not the
    model's."""
    model = get_model(session, principal=principal, model_id=model_id)
    evaluation = session.get(Evaluation, evaluation_id)
    if evaluation is None or evaluation.model_id != model.id:
        raise ApiError(
            404,
            "evaluation_not_found",
            f"model {model.id} has no evaluation {evaluation_id}; list them with "
            f"GET /v1/models/{model.id}/evaluations",
        )
    job = session.get(Job, evaluation.job_id) if evaluation.job_id is not None else None
    return evaluation_read(evaluation, job)


def evaluation_read(evaluation: Evaluation, job: Job | None) -> EvaluationRead:
    """The API's view of an evaluation; its status is its job's."""
    if job is not None:
        status = job.status
    else:  # the job row is gone: the results say whether it ever finished
        status = JobStatus.SUCCEEDED if evaluation.results else "unknown"
    return EvaluationRead(
        id=evaluation.id,
        model_id=evaluation.model_id,
        dataset_id=evaluation.dataset_id,
        split=evaluation.split,
        job_id=evaluation.job_id,
        status=status,
        results=evaluation.results or {},
        error_code=job.error_code if job is not None else None,
        error=job.error if job is not None else None,
        created_at=evaluation.created_at,
    )
