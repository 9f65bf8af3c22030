"""Pre-training request schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.db.models import MAX_ID


class PretrainRequest(BaseModel):
    """Pre-train a BiT architecture upstream; the result becomes a base model."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "arch": "R50x1",
                    "data_path": "/data/imagenet21k/manifest.jsonl",
                    "recipe": "bit-m",
                    "global_batch": 4096,
                    "nnodes": 8,
                    "nproc_per_node": 8,
                    "name": "house-R50x1",
                }
            ]
        },
    )
    arch: str = Field(..., max_length=32, description="architecture, e.g. R50x1 or R26x1")
    dataset_id: int | None = Field(default=None, ge=1, le=MAX_ID, description="an uploaded dataset")
    data_path: str | None = Field(
        default=None,
        max_length=1024,
        description="an ImageFolder or .csv/.jsonl manifest under BIT_PRETRAIN_DATA_ROOTS",
    )
    recipe: Literal["bit-s", "bit-m", "bit-l"] = "bit-m"
    epochs: float | None = Field(default=None, gt=0, le=1000)
    total_steps: int | None = Field(default=None, ge=1, le=10_000_000)
    global_batch: int = Field(default=4096, ge=1, le=1_000_000)
    nnodes: int = Field(default=1, ge=1, le=1024)
    nproc_per_node: int = Field(default=1, ge=1, le=64)
    max_restarts: int = Field(default=3, ge=0, le=100)
    overrides: dict[str, Any] = Field(default_factory=dict)
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,100}$")
    seed: int = Field(
        default=0,
        ge=0,
        le=2**63 - 1,
        description="seed of the initial weights, batches and augmentation: two runs of one "
        "seed, data and world size end with the same weights (on GPUs, with the server in "
        "deterministic mode)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> PretrainRequest:
        if (self.dataset_id is None) == (self.data_path is None):
            raise ValueError("give exactly one of dataset_id or data_path")
        return self
