"""Per-tenant quotas: stored bytes, images, models, active jobs and predictions per minute."""

from service.quotas.service import (
    JOB_QUOTA_ERRORS,
    PREDICTION_QUOTA_ERRORS,
    QUOTAS,
    STORAGE_QUOTA_ERRORS,
    check_new_job,
    check_storage,
    effective_limits,
    read_quotas,
    set_quotas,
    usage,
)

__all__ = [
    "JOB_QUOTA_ERRORS",
    "PREDICTION_QUOTA_ERRORS",
    "QUOTAS",
    "STORAGE_QUOTA_ERRORS",
    "check_new_job",
    "check_storage",
    "effective_limits",
    "read_quotas",
    "set_quotas",
    "usage",
]
