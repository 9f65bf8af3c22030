"""Request and response shapes of the models and predict endpoints."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import (
    AliasChoices,
    AliasPath,
    BaseModel,
    ConfigDict,
    Field,
    computed_field,
    field_validator,
)

from service.db.models import MAX_ID
from service.models.status import ModelStatus

MODEL_EXAMPLE: dict[str, Any] = {
    "id": 7,
    "tenant": "acme",
    "name": "defects-v2",
    "job_id": 12,
    "arch": "R50x1",
    "base_model": "BiT-M-R50x1",
    "classes": ["crack", "dent", "ok"],
    "num_classes": 3,
    "crop": 128,
    "plan": {"steps": 500, "batch_size": 512, "base_lr": 0.003, "resize": 160, "crop": 128},
    "metrics": {
        "train_loss": 0.21,
        "quality": {"kind": "holdout", "top1": 0.96, "top5": 1.0, "count": 25},
    },
    "quality": {
        "kind": "holdout",
        "top1": 0.96,
        "top5": 1.0,
        "count": 25,
        "label": "measured on 25 held-out images that did not train",
    },
    "version": "3f2a9c1d0b7e",
    "sha256": "3f2a9c1d0b7e" + "0" * 52,
    "size_bytes": 94_000_000,
    "status": ModelStatus.READY.value,
    "threshold": 0.6,
    "temperature": 1.4,
    "provenance": {
        "seed": 12,
        "plan": {"steps": 500, "batch_size": 512, "base_lr": 0.003},
        "dataset_version": {"dataset_id": 1, "dataset_version_id": 4, "dataset_version": 2},
        "data": None,
        "base_model": "BiT-M-R50x1",
        "base_sha256": "8e1a2c6f4b9d" + "0" * 52,
        "bit_service_version": "0.1.0",
        "git_commit": None,
        "git_dirty": None,
        "python_version": "3.12.3",
        "torch_version": "2.6.0+cu124",
        "cuda_version": "12.4",
        "cudnn_version": 90100,
        "device": "cuda:0 (NVIDIA A100-SXM4-80GB)",
        "precision": "bf16",
        "deterministic": False,
    },
    "created_at": "2025-01-01T12:00:00Z",
}


# Models trained before quality was measured carry only training-set numbers, which say
# nothing about quality; they are shown as unmeasured.
UNMEASURED = {
    "kind": "none",
    "label": "not measured: this model was trained before models were measured on images "
    "that did not train them; run an evaluation (POST /v1/models/{id}/evaluations)",
}


def model_quality(metrics: dict[str, Any]) -> dict[str, Any]:
    """The model's quality as measured on images that did not train it: metrics["quality"]
    less its full report (kept in `metrics`), with a label that says how it was measured."""
    quality = metrics.get("quality")
    if not isinstance(quality, dict) or "kind" not in quality:
        return dict(UNMEASURED)
    summary = {key: value for key, value in quality.items() if key != "report"}
    if summary["kind"] == "holdout" and "label" not in summary:
        summary["label"] = f"measured on {summary.get('count')} held-out images that did not train"
    return summary


def model_version(sha256: str) -> str:
    """A short, stable version string: the first 12 hex digits of the weights' sha256."""
    return sha256[:12]


class ModelBase(BaseModel):
    """What describes a trained classifier."""

    name: str = ""
    arch: str = Field(description="ResNet-v2 architecture, e.g. R50x1")
    base_model: str | None = Field(None, description="the base model it was fine-tuned from")
    classes: list[str] = Field(description="class names, in the order of the model's outputs")
    crop: int = Field(description="input resolution (square) used for prediction")
    plan: dict[str, Any] = Field(default_factory=dict, description="the resolved training plan")
    metrics: dict[str, Any] = Field(
        default_factory=dict,
        description="what training recorded: `quality` (see the `quality` field) and "
        "`train_loss` (on training images: not a measure of quality)",
    )


class ModelRead(ModelBase):
    """A model as the API shows it."""

    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [MODEL_EXAMPLE]})

    id: int
    tenant: str
    version_number: int = Field(
        1,
        validation_alias="version",
        description="1, 2, 3, ... among the models of its name (`name:3` in predict)",
    )
    job_id: int | None = Field(description="the fine-tuning job that produced it")
    sha256: str = Field(
        description="sha256 of the weights file (of the head file, for a model that shares "
        "its base)"
    )
    size_bytes: int = Field(description="bytes of its own files (its head alone, when shared)")
    shared_base_sha256: str | None = Field(
        None,
        description="a linear model stored as its head: the sha256 of the base backbone it "
        "shares with other models of that base (loaded once per server); null: whole",
    )
    status: str = Field(description="ready | archived")
    threshold: float | None = Field(
        None, description="default probability threshold of predict (PATCH sets it); null: none"
    )
    temperature: float | None = Field(
        None, description="predict divides the logits by it (fitted on held-out images)"
    )
    provenance: dict[str, Any] = Field(
        default_factory=dict,
        # Stored in the metrics column (service.models.service.PROVENANCE_KEY).
        validation_alias=AliasChoices(AliasPath("metrics", "provenance"), "provenance"),
        description="what made the model: `seed`, `plan`, `dataset_version` (dataset id, "
        "version id and number), `base_model` and `base_sha256` (its weights file; null "
        "from scratch), `bit_service_version`, `git_commit` and `git_dirty` (where known), "
        "`python_version`, `torch_version`, `cuda_version`, `cudnn_version`, `device`, "
        "`precision` and `deterministic` (whether deterministic algorithms were on); {} for "
        "models trained before it was recorded",
    )
    created_at: dt.datetime

    @field_validator("metrics")
    @classmethod
    def _without_provenance(cls, metrics: dict[str, Any]) -> dict[str, Any]:
        """The provenance is its own field: `metrics` only holds what training measured."""
        return {key: value for key, value in metrics.items() if key != "provenance"}

    @computed_field  # type: ignore[prop-decorator]
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @computed_field(  # type: ignore[prop-decorator]
        description="quality measured on images that did not train the model: `kind` is "
        "holdout (held-out images: top1, top5, count), cross_validated (an estimate of "
        "linear-probe quality on frozen features: top1 mean and top1_std over folds, "
        "per-class recall) or none; `label` says which"
    )
    @property
    def quality(self) -> dict[str, Any]:
        return model_quality(self.metrics)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def version(self) -> str:
        """The first 12 hex digits of the weights' sha256 (what predict answers with)."""
        return model_version(self.sha256)


class ModelUpdate(BaseModel):
    """What PATCH /v1/models/{id} changes; fields left out stay as they are."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"threshold": 0.6}]})

    threshold: float | None = Field(
        None,
        description="predict leaves out classes below this probability (0-1), and marks an "
        "image with none above it `below_threshold`; null removes the threshold",
    )


class AliasRead(BaseModel):
    """An alias of a named model and the version it points at."""

    model_config = ConfigDict(from_attributes=True, protected_namespaces=())
    alias: str
    model_id: int
    version: int
    updated_at: dt.datetime


class AliasMove(BaseModel):
    """Where PUT /v1/models/by-name/{name}/aliases/{alias} points the alias."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"version": 3}]})
    version: int = Field(ge=1, le=MAX_ID, description="the version of the name to point at")


class NamedModel(BaseModel):
    """A model name: its versions, newest first, and its aliases."""

    name: str
    versions: list[ModelRead]
    aliases: list[AliasRead]


class ModelPage(BaseModel):
    """One page of models, newest first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"items": [MODEL_EXAMPLE], "total": 1, "limit": 50, "offset": 0}]
        }
    )

    items: list[ModelRead]
    total: int = Field(description="models matching the filter, over all pages")
    limit: int
    offset: int


class PredictJson(BaseModel):
    """JSON form of a predict call: images as base64 strings."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"model_id": 7, "images": ["iVBORw0KGgoAAAANSUhEUgAA..."], "top_k": 3}]
        },
    )

    model_id: int | None = Field(
        None, ge=1, le=MAX_ID, description="id of a ready model (GET /v1/models); or `model`"
    )
    model: str | None = Field(
        None,
        max_length=140,
        description="instead of `model_id`: `name` (its latest ready version), `name@alias` "
        "(e.g. `shapes@production`) or `name:3` (version 3)",
    )
    images: list[str] = Field(
        description="base64 image files (JPEG, PNG, WebP, ...); a data: URL prefix is allowed"
    )
    top_k: int = Field(5, description="classes to return per image, most likely first (1-1000)")
    threshold: float | None = Field(
        None,
        description="leave out classes below this probability (0-1); default: the model's "
        "threshold (none if it has none); 0 keeps every class",
    )


class LabelProbability(BaseModel):
    label: str
    probability: float


class ImagePrediction(BaseModel):
    """The top classes of one image."""

    filename: str | None = Field(None, description="the uploaded file's name (multipart only)")
    top_k: list[LabelProbability] = Field(
        description="the most likely classes, most likely first; only those at or above the "
        "threshold when there is one"
    )
    below_threshold: bool = Field(
        False, description="no class reaches the threshold: the model is not sure"
    )


class PredictResponse(BaseModel):
    """Predictions, one entry per image in the order sent."""

    model_config = ConfigDict(
        protected_namespaces=(),  # `model_id` / `model_version` are the API's words
        json_schema_extra={
            "examples": [
                {
                    "model_id": 7,
                    "model_version": "3f2a9c1d0b7e",
                    "predictions": [
                        {
                            "filename": "part-0041.jpg",
                            "top_k": [
                                {"label": "crack", "probability": 0.91},
                                {"label": "dent", "probability": 0.07},
                            ],
                            "below_threshold": False,
                        }
                    ],
                    "time_ms": 38.2,
                }
            ]
        },
    )

    model_id: int
    model_version: str = Field(description="the first 12 hex digits of the weights' sha256")
    threshold: float | None = Field(
        None, description="the probability threshold applied (the request's or the model's)"
    )
    predictions: list[ImagePrediction]
    time_ms: float = Field(description="time spent on the server, in milliseconds")
