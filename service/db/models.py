"""The tables. The database is the source of truth for datasets, jobs and models."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from service.jobs.status import JobStatus
from service.models.status import ModelStatus

# Primary keys are Integer: int4 on PostgreSQL, so no row has a larger id. Inputs are checked
# against it, since a value past 64 bits does not even reach SQLite (OverflowError).
MAX_ID = 2**31 - 1


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UtcDateTime(TypeDecorator[dt.datetime]):
    """A timestamp read back timezone-aware on every database.

    Everything is stored in UTC, but SQLite drops the zone: without this, the API would
    answer `2025-01-31T12:00:00` (no offset, not an RFC 3339 date-time) on SQLite only.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value


class Base(DeclarativeBase):
    """Declarative base of every table."""


class Timestamped:
    created_at: Mapped[dt.datetime] = mapped_column(
        UtcDateTime(), default=utcnow, server_default=func.now()
    )


class ApiKey(Timestamped, Base):
    """An API key; only its sha256 is stored (keys are random, 256 bits)."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # user | admin
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    # Space-separated scopes (service.auth.SCOPES): what the key may do within its tenant.
    scopes: Mapped[str] = mapped_column(String(256), default="")
    expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())


class Dataset(Timestamped, Base):
    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(256), default="")
    images: Mapped[list[Image]] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", passive_deletes=True
    )


class Image(Timestamped, Base):
    __tablename__ = "images"
    __table_args__ = (Index("ix_images_dataset_label", "dataset_id", "label"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    label: Mapped[str] = mapped_column(String(256))
    filename: Mapped[str] = mapped_column(String(512), default="")  # as uploaded, for messages
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    split: Mapped[str] = mapped_column(String(8), default="train")  # train | val | test
    uri: Mapped[str] = mapped_column(String(512))
    # Set by DELETE: the row (and its file) stays for the dataset versions that hold it.
    deleted_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    dataset: Mapped[Dataset] = relationship(back_populates="images")


class DatasetVersion(Timestamped, Base):
    """An immutable snapshot of a dataset: which images, with which labels and splits.

    Every change to a dataset's images makes a new one (numbered 1, 2, ... per dataset);
    the latest is the dataset as it is. A fine-tuning job pins the version it was created
    with (its params' `dataset_version_id`)."""

    __tablename__ = "dataset_versions"
    __table_args__ = (
        UniqueConstraint("dataset_id", "number", name="uq_dataset_versions_dataset_number"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(Integer)
    image_count: Mapped[int] = mapped_column(Integer, default=0)


class DatasetVersionImage(Base):
    """One image of a dataset version, with its label and split as they were then."""

    __tablename__ = "dataset_version_images"
    version_id: Mapped[int] = mapped_column(
        ForeignKey("dataset_versions.id", ondelete="CASCADE"), primary_key=True
    )
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    label: Mapped[str] = mapped_column(String(256))
    split: Mapped[str] = mapped_column(String(8))


class Job(Timestamped, Base):
    """A fine-tuning or pre-training job; its row carries status, lease and progress."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_kind", "status", "kind"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # finetune | pretrain
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    base_model: Mapped[str] = mapped_column(String(256))
    mode: Mapped[str] = mapped_column(String(16), default="full")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the resolved plan
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    images_per_s: Mapped[float | None] = mapped_column(Float)
    eta_s: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    traceback: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    started_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    finished_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    callback_url: Mapped[str | None] = mapped_column(String(2048))
    callback_status: Mapped[str | None] = mapped_column(String(64))
    model_id: Mapped[int | None] = mapped_column(Integer)


class JobMetric(Base):
    """One point of a job's curves (throttled: not every step)."""

    __tablename__ = "job_metrics"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    val_top1: Mapped[float | None] = mapped_column(Float)
    images_per_s: Mapped[float | None] = mapped_column(Float)
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class JobEvent(Base):
    """Attempts, resumes, failures, cancels: a job's history."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[str | None] = mapped_column(Text)
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Model(Timestamped, Base):
    """A trained classifier, ready for prediction."""

    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("tenant", "name", "version", name="uq_models_tenant_name_version"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    name: Mapped[str] = mapped_column(String(256), default="")
    # 1, 2, 3, ... per (tenant, name): assigned when the model is registered (add_model).
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    arch: Mapped[str] = mapped_column(String(32))
    classes: Mapped[list[Any]] = mapped_column(JSON)
    crop: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str | None] = mapped_column(String(256))
    plan: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    uri: Mapped[str] = mapped_column(String(512))  # artifact key of the model directory
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(16), default=ModelStatus.READY)
    # Predict leaves out classes whose probability is below this (None: keep every class).
    threshold: Mapped[float | None] = mapped_column(Float)
    # Temperature scaling fitted on held-out images: logits / temperature (None: 1).
    temperature: Mapped[float | None] = mapped_column(Float)
    # A linear model stored as its head: the sha256 of the base backbone it shares (the
    # artifact store's `bases/{sha256}`). None: the model's weights file is whole.
    shared_base_sha256: Mapped[str | None] = mapped_column(String(64), index=True)


class ModelAlias(Base):
    """A movable name (e.g. `production`) for one version of a named model."""

    __tablename__ = "model_aliases"
    __table_args__ = (
        UniqueConstraint("tenant", "name", "alias", name="uq_model_aliases_tenant_name_alias"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(256))
    alias: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class BaseModelRecord(Timestamped, Base):
    """A base model produced here (pre-training) or imported; official ones live on disk."""

    __tablename__ = "base_models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    arch: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(32))  # pretrain | imported
    uri: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(Integer)


class Worker(Base):
    """A worker process's heartbeat, for the dashboard."""

    __tablename__ = "workers"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(128))
    device: Mapped[str] = mapped_column(String(128))
    queues: Mapped[str] = mapped_column(String(128))
    current_job_id: Mapped[int | None] = mapped_column(Integer)
    last_seen: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class AuditEvent(Base):
    """Who did what, when and from where: appended in the same transaction as the change,
    so a failed request leaves no row. Never holds a secret (keys appear by prefix)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_tenant_at", "tenant", "at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow, index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)  # e.g. key.revoke
    tenant: Mapped[str] = mapped_column(String(64))  # the tenant whose data was acted on
    actor_tenant: Mapped[str | None] = mapped_column(String(64))
    actor_key_prefix: Mapped[str | None] = mapped_column(String(16))  # None: the CLI/system
    address: Mapped[str | None] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256), default="")  # e.g. "model 12"
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class WebhookDelivery(Timestamped, Base):
    """One callback to send: a job reached a final status (its `occurrence`-th). Written in
    the same transaction as that status, so each final status is delivered exactly once
    (at least once to the receiver, which dedupes by `event_id`)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("job_id", "occurrence", name="uq_webhook_deliveries_job_occurrence"),
        Index("ix_webhook_deliveries_state_next", "state", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    occurrence: Mapped[int] = mapped_column(Integer)  # 1: the job's first final status, ...
    event_id: Mapped[str] = mapped_column(String(64), unique=True)  # the idempotency key
    job_status: Mapped[str] = mapped_column(String(16))  # the final status it reports
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # pending|delivered|failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    give_up_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime())
    last_result: Mapped[str | None] = mapped_column(String(256))


class WebhookAttempt(Base):
    """One POST of a delivery: when, what came back, how long it took."""

    __tablename__ = "webhook_attempts"
    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(256))  # refused, timeout, ... (no secrets)
    duration_ms: Mapped[float] = mapped_column(Float, default=0.0)
    worker: Mapped[str | None] = mapped_column(String(128))


class TenantQuota(Base):
    """A tenant's own limits; a column left empty takes the setting's default."""

    __tablename__ = "tenant_quotas"
    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    stored_bytes: Mapped[int | None] = mapped_column(BigInteger)
    images: Mapped[int | None] = mapped_column(Integer)
    models: Mapped[int | None] = mapped_column(Integer)
    active_jobs: Mapped[int | None] = mapped_column(Integer)
    predictions_per_minute: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Evaluation(Timestamped, Base):
    """A stored evaluation of a model on a dataset (or one split of it), run as a job of
    kind `evaluate`; `results` is filled when that job succeeds."""

    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"))
    split: Mapped[str | None] = mapped_column(String(8))  # None: every image of the dataset
    results: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
