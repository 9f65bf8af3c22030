"""Prometheus instruments of a worker process (exposed by `expose`, see its docstring)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry()
JOBS_RUN = Counter(
    "bit_worker_jobs_total",
    "Job runs this worker ended, by kind and outcome",
    ["kind", "outcome"],
    registry=REGISTRY,
)
JOB_FAILURES = Counter(
    "bit_worker_job_failures_total",
    "Job runs that failed, by kind and error code",
    ["kind", "code"],
    registry=REGISTRY,
)
STEP_SECONDS = Histogram(
    "bit_worker_step_seconds",
    "Wall time of one training step",
    ["kind"],
    registry=REGISTRY,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
WEBHOOK_ATTEMPTS = Counter(
    "bit_worker_webhook_attempts_total",
    "Webhook POSTs, by result: delivered, http_error, refused, network_error",
    ["result"],
    registry=REGISTRY,
)
WEBHOOK_SECONDS = Histogram(
    "bit_worker_webhook_seconds",
    "Duration of one webhook POST",
    registry=REGISTRY,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
