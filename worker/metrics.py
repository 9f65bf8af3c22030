"""Prometheus instruments of a worker process, and how they are recorded and served.

A worker serves them itself (`expose`: an HTTP port per process, BIT_WORKER_METRICS_PORT),
so each worker is one scrape target wherever it runs; `bit serve` also shows its workers' in
the API's /metrics (service.metrics.WorkerMetrics). Counters start at zero with each worker
process, as Prometheus expects of a restarted target.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from service.settings import Settings

if TYPE_CHECKING:
    from bit_core.train import Progress, ProgressCallback

log = logging.getLogger(__name__)

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


def count_run(kind: str, outcome: str, error_code: str | None) -> None:
    """One run of a `kind` job ended with `outcome`; a failed one also counts its code."""
    JOBS_RUN.labels(kind, outcome).inc()
    if outcome == "failed":
        JOB_FAILURES.labels(kind, error_code or "internal_error").inc()


class StepTimer:
    """Observes STEP_SECONDS from the steps a run reports: the wall time between two
    reports, shared by the steps between them. The first report after a start only sets the
    clock, since the time before it also holds loading the data and the model."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.last: tuple[int, float] | None = None  # (step, time) of the previous report

    def note(self, step: int, at: float) -> None:
        """Step `step` finished at `at` (seconds on any one clock)."""
        if self.last is not None and step > self.last[0] and at >= self.last[1]:
            steps = step - self.last[0]
            histogram = STEP_SECONDS.labels(self.kind)
            for _ in range(steps):  # the count stays the number of steps timed
                histogram.observe((at - self.last[1]) / steps)
        self.last = (step, at)

    def wrap(self, callback: ProgressCallback) -> ProgressCallback:
        """`callback`, timing each step it is told of (the engine's progress callback)."""

        def timed(progress: Progress) -> None:
            self.note(progress.step, time.monotonic())
            callback(progress)

        return timed


def expose(settings: Settings) -> bool:
    """Serve REGISTRY at http://<worker_metrics_host>:<worker_metrics_port>/metrics from a
    daemon thread, if a port is set; returns whether it is served. A port already taken is
    logged, not fatal: the worker still runs jobs."""
    port, host = settings.worker_metrics_port, settings.worker_metrics_host
    if not port:
        return False
    try:
        start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        log.error(
            "worker metrics not served on %s:%d (%s): give each worker process on a host its "
            "own BIT_WORKER_METRICS_PORT",
            host,
            port,
            exc.strerror or exc,
        )
        return False
    log.info("worker metrics at http://%s:%d/metrics", host, port)
    return True
