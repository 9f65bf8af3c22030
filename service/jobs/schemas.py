"""Job schemas: what the API accepts and answers."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator

from service.db.models import MAX_ID
from service.webhooks.schemas import WebhookDeliveryRead

MAX_SEED = 2**63 - 1


class FinetuneOverrides(BaseModel):
    """Overrides of the BiT-HyperRule plan; anything unset follows the rule."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    base_lr: float | None = Field(default=None, gt=0, le=10)
    total_steps: int | None = Field(default=None, ge=5, le=1_000_000)
    precrop: int | None = Field(default=None, ge=16, le=1024)
    crop: int | None = Field(default=None, ge=16, le=1024)
    mixup_alpha: float | None = Field(default=None, ge=0, le=10)
    resolution_rule: Literal["paper", "official"] | None = None
    # How the job measures its model (not part of the HyperRule plan).
    holdout_fraction: float | None = Field(
        default=None,
        ge=0,
        le=0.5,
        description="share of each class's train images held out to measure the model, when "
        "the dataset has no val images and every class has 8+ train images (default 0.2; "
        "0 turns the hold-out off)",
    )
    eval_every: int | None = Field(
        default=None,
        ge=0,
        le=1_000_000,
        description="steps between validations on the held-out images in full mode (default "
        "about ten per run; 0: only at the end)",
    )
    calibrate: bool | None = Field(
        default=None,
        description="fit a temperature on the held-out images so that probabilities match "
        "accuracy (default false)",
    )
    # How the job draws its random numbers (not part of the HyperRule plan).
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="seed of every random draw of the job: the automatic hold-out, the "
        "initial weights of a base without weights, batches, augmentation, MixUp (default: "
        "the job's id); two jobs of one seed, plan and dataset version train the same model "
        "on a CPU, and on a GPU where the server runs in deterministic mode",
    )

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class FinetuneRequest(BaseModel):
    """Fine-tune a base model on one of your datasets."""

    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),  # `model_name` is the API's word
        json_schema_extra={
            "examples": [
                {
                    "dataset_id": 1,
                    "base_model": "BiT-M-R50x1",
                    "mode": "full",
                    "overrides": {"batch_size": 64, "total_steps": 200},
                    "callback_url": "https://example.com/hooks/bit",
                }
            ]
        },
    )
    dataset_id: int = Field(..., ge=1, le=MAX_ID)
    base_model: str | None = Field(
        default=None, max_length=256, description="default: the server's"
    )
    mode: Literal["full", "linear"] = "full"
    overrides: FinetuneOverrides = Field(default_factory=lambda: FinetuneOverrides())
    callback_url: HttpUrl | None = None
    model_name: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="the name the model is registered under, as its next version (1, 2, "
        "...); 1-64 of A-Z a-z 0-9 . _ -, not all digits; default: `model`",
    )

    @field_validator("model_name")
    @classmethod
    def _not_all_digits(cls, value: str | None) -> str | None:
        if value is not None and value.isdigit():
            raise ValueError("a model name cannot be all digits (it would read as an id)")
        return value


class JobRead(BaseModel):
    """A job as the API shows it."""

    model_config = ConfigDict(from_attributes=True)
    id: int
    kind: str
    status: str
    dataset_id: int | None
    base_model: str
    mode: str
    plan: dict[str, Any] = Field(
        validation_alias="params",
        description="the resolved plan; a fine-tuning job's also holds `seed` (of every "
        "random draw of its run), `holdout` (`source` split|auto|none, `fraction`, `seed`, "
        "`val_image_ids`: the images that measure it and never train it), `eval_every` and "
        "`calibrate`",
    )
    progress: float
    step: int
    total_steps: int
    images_per_s: float | None
    eta_s: float | None
    metrics: dict[str, Any]
    error: str | None
    error_code: str | None
    attempts: int
    model_id: int | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class JobPage(BaseModel):
    items: list[JobRead]
    total: int
    limit: int
    offset: int


class MetricPoint(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    step: int
    loss: float | None
    lr: float | None
    val_top1: float | None
    images_per_s: float | None


class EventRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    kind: str
    attempt: int
    step: int
    worker: str | None
    detail: str | None
    at: dt.datetime


class JobDetail(JobRead):
    """A job with its curves, history and webhook deliveries (each with its attempts)."""

    curves: list[MetricPoint] = []
    events: list[EventRead] = []
    webhooks: list[WebhookDeliveryRead] = []
