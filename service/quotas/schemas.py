"""Quota shapes: a tenant's limits (each with where it comes from), its usage, and the
admin's update."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The largest values the tenant_quotas columns hold: BIGINT for bytes, INTEGER for counts.
MAX_BYTES = 2**63 - 1
MAX_COUNT = 2**31 - 1

QUOTA_EXAMPLE: dict[str, Any] = {
    "tenant": "acme",
    "limits": {
        "stored_bytes": {"limit": 21474836480, "source": "default"},
        "images": {"limit": 50000, "source": "tenant"},
        "models": {"limit": 1000, "source": "default"},
        "active_jobs": {"limit": 20, "source": "default"},
        "predictions_per_minute": {"limit": 0, "source": "tenant"},
    },
    "usage": {"stored_bytes": 81234567, "images": 1204, "models": 3, "active_jobs": 1},
}


class QuotaLimit(BaseModel):
    """One limit in force, and whether the tenant has its own or takes the setting's."""

    limit: int = Field(description="0: no limit")
    source: Literal["default", "tenant"] = Field(
        description="`tenant`: set for this tenant through the admin API; `default`: the "
        "server's BIT_QUOTA_* setting"
    )


class QuotaLimits(BaseModel):
    """Every quota of a tenant."""

    stored_bytes: QuotaLimit = Field(description="bytes of its images and models")
    images: QuotaLimit = Field(description="images in all its datasets")
    models: QuotaLimit = Field(description="its models, ready or archived")
    active_jobs: QuotaLimit = Field(description="its jobs queued, running or cancelling")
    predictions_per_minute: QuotaLimit = Field(
        description="images classified per minute, over all its keys"
    )


class QuotaUsage(BaseModel):
    """What a tenant uses now, in the units of its limits."""

    stored_bytes: int
    images: int
    models: int
    active_jobs: int


class QuotasRead(BaseModel):
    """A tenant's limits and usage."""

    model_config = ConfigDict(json_schema_extra={"examples": [QUOTA_EXAMPLE]})

    tenant: str
    limits: QuotaLimits
    usage: QuotaUsage


class QuotaUpdate(BaseModel):
    """New limits for a tenant: a number sets the tenant's own (0: no limit), null returns
    it to the server's default, and a quota left out keeps what it has."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"images": 50000, "predictions_per_minute": None}]},
    )

    stored_bytes: int | None = Field(default=None, ge=0, le=MAX_BYTES)
    images: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    models: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    active_jobs: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    predictions_per_minute: int | None = Field(default=None, ge=0, le=MAX_COUNT)
