"""Prometheus instruments of the API process."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


class RequestMetrics:
    """ASGI middleware: count and time each request by its route template (bounded labels).

    Plain ASGI, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware passes every
    request through an extra task and memory streams, which cost the event loop more than
    the route itself on a cached GET.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500  # unless the app starts a response: an exception ends in a 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            template = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(scope["method"], template, str(status)).inc()
            LATENCY.labels(scope["method"], template).observe(time.perf_counter() - began)
