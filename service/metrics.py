"""Prometheus instruments of the API process."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.responses import Response

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "bit_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "bit_http_request_seconds", "HTTP request latency", ["method", "route"], registry=REGISTRY
)
JOBS_BY_STATUS = Gauge("bit_jobs", "Jobs by status", ["status"], registry=REGISTRY)
PREDICT_BATCH = Histogram(
    "bit_predict_batch_size",
    "Images per model forward",
    registry=REGISTRY,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


async def record_request(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Count and time each request by its route template (not its raw path: bounded labels)."""
    began = time.perf_counter()
    response = await call_next(request)
    route = request.scope.get("route")
    template = getattr(route, "path", "unmatched")
    REQUESTS.labels(request.method, template, str(response.status_code)).inc()
    LATENCY.labels(request.method, template).observe(time.perf_counter() - began)
    return response
