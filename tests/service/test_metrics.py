"""GET /metrics: gauges counted afresh at each scrape (both backends), a scrape with the
database down, and `bit serve`'s view of its worker's metrics."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.db.models import Job, WebhookDelivery, Worker, utcnow
from service.db.session import session_scope
from service.jobs.status import JobStatus
from service.metrics import WorkerMetrics
from service.settings import JOB_KINDS, Settings
from tests.polling import free_port
from tests.service.conftest import make_settings

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition, by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def jobs(scraped: Samples, status: str, kind: str = "finetune") -> float | None:
    return scraped.get(("bit_jobs", frozenset({("status", status), ("kind", kind)})))


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    return samples(response.text)


def add_jobs(settings: Settings, status: str, count: int, kind: str = "finetune") -> list[int]:
    with session_scope(settings.database_url) as session:
        rows = [
            Job(tenant="acme", kind=kind, status=status, base_model="R14x0.5") for _ in range(count)
        ]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def test_every_status_and_kind_is_counted_zero_included(client: TestClient, settings: Settings):
    add_jobs(settings, JobStatus.QUEUED, 2)
    add_jobs(settings, JobStatus.FAILED, 1, kind="pretrain")
    scraped = scrape(client)
    assert scraped[("bit_metrics_db_up", frozenset())] == 1
    counted = {
        (dict(labels)["status"], dict(labels)["kind"]): value
        for (name, labels), value in scraped.items()
        if name == "bit_jobs"
    }
    expected = {(status.value, kind): 0.0 for status in JobStatus for kind in JOB_KINDS}
    expected[("queued", "finetune")] = 2
    expected[("failed", "pretrain")] = 1
    assert counted == expected


def test_a_status_that_drops_to_zero_reads_zero_at_the_next_scrape(
    client: TestClient, settings: Settings
):
    ids = add_jobs(settings, JobStatus.RUNNING, 3)
    assert jobs(scrape(client), "running") == 3
    with session_scope(settings.database_url) as session:
        for job in session.query(Job).filter(Job.id.in_(ids)):
            job.status = JobStatus.SUCCEEDED
    scraped = scrape(client)
    assert jobs(scraped, "running") == 0
    assert jobs(scraped, "succeeded") == 3


def test_workers_alive_and_pending_callbacks_are_counted(client: TestClient, settings: Settings):
    (job_id,) = add_jobs(settings, JobStatus.SUCCEEDED, 1)
    gone = utcnow() - dt.timedelta(seconds=4 * settings.reconcile_every_s)
    with session_scope(settings.database_url) as session:
        session.add(Worker(name="a:1", host="a", device="cpu", queues="finetune"))
        session.add(Worker(name="b:2", host="b", device="cpu", queues="finetune", last_seen=gone))
        for occurrence, state in enumerate(("pending", "pending", "delivered", "failed"), 1):
            session.add(
                WebhookDelivery(
                    job_id=job_id,
                    tenant="acme",
                    occurrence=occurrence,
                    event_id=f"evt_{occurrence}",
                    job_status="succeeded",
                    url="https://example.com/hook",
                    state=state,
                    give_up_at=utcnow() + dt.timedelta(hours=1),
                )
            )
    scraped = scrape(client)
    assert scraped[("bit_workers_alive", frozenset())] == 1
    assert scraped[("bit_webhook_deliveries_pending", frozenset())] == 2

    with session_scope(settings.database_url) as session:
        session.query(WebhookDelivery).update({"state": "delivered"})
    assert scrape(client)[("bit_webhook_deliveries_pending", frozenset())] == 0


def test_the_scrape_answers_with_the_database_down(tmp_path: Path):
    # Nothing listens on this loopback port: every connection is refused.
    down = make_settings(tmp_path, f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/bit")
    with TestClient(create_app(down)) as client:
        client.get("/healthz")
        scraped = scrape(client)
    assert scraped[("bit_metrics_db_up", frozenset())] == 0
    # Missing, not zero: a count the scrape could not read is not reported as none.
    assert not [name for name, _ in scraped if name == "bit_jobs"]
    assert ("bit_workers_alive", frozenset()) not in scraped
    # The process's own instruments are still there.
    healthz = frozenset({("method", "GET"), ("route", "/healthz"), ("status", "200")})
    assert scraped[("bit_http_requests_total", healthz)] >= 1


def test_bit_serve_shows_its_workers_metrics_and_says_when_they_are_missing():
    worker_registry = CollectorRegistry()
    runs = Counter("bit_worker_jobs", "runs", ["kind", "outcome"], registry=worker_registry)
    runs.labels("finetune", "succeeded").inc(2)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=worker_registry)
    api_side = CollectorRegistry()
    # A second worker that is not listening (not started yet, or restarting).
    urls = {
        "jobs": f"http://127.0.0.1:{port}/metrics",
        "webhooks": f"http://127.0.0.1:{free_port()}/metrics",
    }
    api_side.register(WorkerMetrics(urls))
    try:
        scraped = samples(generate_latest(api_side).decode())
        assert scraped[("bit_worker_metrics_up", frozenset({("worker", "jobs")}))] == 1
        assert scraped[("bit_worker_metrics_up", frozenset({("worker", "webhooks")}))] == 0
        succeeded = frozenset({("kind", "finetune"), ("outcome", "succeeded"), ("worker", "jobs")})
        assert scraped[("bit_worker_jobs_total", succeeded)] == 2
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    gone = samples(generate_latest(api_side).decode())
    assert gone == {("bit_worker_metrics_up", frozenset({("worker", name)})): 0 for name in urls}
