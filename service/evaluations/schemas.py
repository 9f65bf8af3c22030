"""Request and response shapes of the evaluations endpoints."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.db.models import MAX_ID

EVALUATION_EXAMPLE: dict[str, Any] = {
    "id": 3,
    "model_id": 7,
    "dataset_id": 2,
    "split": "test",
    "job_id": 15,
    "status": "succeeded",
    "results": {
        "count": 60,
        "classes": ["crack", "dent", "ok"],
        "top1": 0.93,
        "top5": 1.0,
        "map": 0.95,
        "macro_f1": 0.92,
        "temperature": 1.4,
        "per_class": {"crack": {"precision": 0.95, "recall": 0.9, "f1": 0.92, "ap": 0.96}},
        "confusion": [[18, 2, 0], [1, 19, 0], [0, 1, 19]],
        "calibration": {"ece": 0.04, "bins": []},
    },
    "error_code": None,
    "error": None,
    "created_at": "2025-01-01T12:00:00Z",
}


class EvaluationCreate(BaseModel):
    """Evaluate a model on one of your datasets, or on one split of it."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"dataset_id": 2, "split": "test"}]}
    )
    dataset_id: int = Field(ge=1, le=MAX_ID, description="a dataset whose labels are the model's")
    split: Literal["train", "val", "test"] | None = Field(
        None, description="evaluate only this split's images; null: every image of the dataset"
    )


class EvaluationRead(BaseModel):
    """An evaluation and the status of the job that computes it."""

    model_config = ConfigDict(json_schema_extra={"examples": [EVALUATION_EXAMPLE]})

    id: int
    model_id: int
    dataset_id: int | None = Field(description="null once the dataset is deleted")
    split: str | None = Field(description="the split evaluated; null: the whole dataset")
    job_id: int | None
    status: str = Field(description="the job's: queued, running, succeeded, failed, ...")
    results: dict[str, Any] = Field(
        description="empty until the job succeeds; then top1, top5, per_class (precision, "
        "recall, f1, support, ap, pr_curve, thresholds), map, macro_f1, confusion[true]"
        "[predicted], calibration (ece, bins) and the temperature applied"
    )
    error_code: str | None = Field(None, description="why the job failed, if it did")
    error: str | None = None
    created_at: dt.datetime


class EvaluationPage(BaseModel):
    """A model's evaluations, newest first."""

    items: list[EvaluationRead]
