"""Prometheus instruments of the API process (the gauges counted from the database at each
scrape are service.gauges'), and, under `bit serve`, its workers' metrics."""

from __future__ import annotations

import logging
import socket
import time
import urllib.request
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.settings import Settings

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "bit_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "bit_http_request_seconds", "HTTP request latency", ["method", "route"], registry=REGISTRY
)
PREDICT_BATCH = Histogram(
    "bit_predict_batch_size",
    "Images per model forward",
    registry=REGISTRY,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BACKBONE_FORWARDS = Counter(
    "bit_backbone_forwards_total",
    "Backbone forward calls by inference backend (one may serve several models' requests)",
    ["backend"],
    registry=REGISTRY,
)
MODEL_CACHE = Gauge(
    "bit_model_cache",
    "The API process's model cache: models and backbones held, and their weights' bytes",
    ["what"],
    registry=REGISTRY,
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


class WorkerMetrics:
    """A Prometheus collector that reads local workers' metrics from their ports at each
    scrape: `bit serve` registers one for its workers, so that one target (the API's
    /metrics) shows every process. Each worker's samples get a `worker` label (the families
    of two workers merge into one); `bit_worker_metrics_up` says which ones answered."""

    # Well under a scrape's usual timeout: a stuck worker costs the scrape this, no more.
    TIMEOUT_S = 2.0

    def __init__(self, urls: dict[str, str]) -> None:
        self.urls = urls  # worker name -> its metrics URL

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "bit_worker_metrics_up",
            "1 if the local worker's metrics answered this scrape",
            labels=["worker"],
        )
        merged: dict[str, Metric] = {}
        for worker, url in self.urls.items():
            try:
                with urllib.request.urlopen(url, timeout=self.TIMEOUT_S) as response:
                    text = response.read().decode()
            except OSError as exc:  # not started yet, restarting, or its port is taken
                log.debug("worker metrics at %s: %s", url, exc)
                up.add_metric([worker], 0)
                continue
            up.add_metric([worker], 1)
            for family in text_string_to_metric_families(text):
                into = merged.setdefault(
                    family.name,
                    Metric(family.name, family.documentation, family.type, family.unit),
                )
                into.samples.extend(
                    sample._replace(labels={**sample.labels, "worker": worker})
                    for sample in family.samples
                )
        yield up
        yield from merged.values()


_local_workers: WorkerMetrics | None = None


def show_local_workers(settings: Settings, names: list[str]) -> dict[str, dict[str, str]]:
    """For `bit serve`: this process's /metrics also shows its supervised workers', read
    from their ports: the first worker's is BIT_WORKER_METRICS_PORT (so it can be scraped
    directly too), the others' (and the first's when that is 0) free ones. Returns, by
    worker name, the environment that tells each worker its port."""
    global _local_workers
    host = settings.worker_metrics_host
    reach = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a wildcard: via loopback
    envs, urls = {}, {}
    for index, name in enumerate(names):
        port = settings.worker_metrics_port if index == 0 else 0
        if not port:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
                probe.bind((host, 0))
                port = int(probe.getsockname()[1])
        where = f"[{reach}]" if ":" in reach else reach
        urls[name] = f"http://{where}:{port}/metrics"
        envs[name] = {"BIT_WORKER_METRICS_PORT": str(port)}
    if _local_workers is None:
        _local_workers = WorkerMetrics(urls)
        REGISTRY.register(_local_workers)
    _local_workers.urls = urls
    return envs
