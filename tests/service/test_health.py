"""Health, readiness and metrics on both database backends."""

from __future__ import annotations

import datetime as dt

import pytest
from fastapi.testclient import TestClient

from bit_core.backends import BackendUnavailable, onnxruntime_installed
from service.app import create_app
from service.db.models import Worker, utcnow
from service.db.session import session_scope
from service.settings import Settings


def test_healthz_and_readyz(client: TestClient):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert {k: checks[k] for k in ("database", "broker", "artifacts")} == dict.fromkeys(
        ("database", "broker", "artifacts"), "ok"
    )
    backend = "onnxruntime" if onnxruntime_installed() else "torch"  # auto, on a CPU
    assert ready.json()["inference_backend"] == backend


def test_a_backend_that_cannot_run_refuses_to_start(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr("bit_core.backends.onnxruntime_installed", lambda: False)
    chosen = settings.model_copy(update={"inference_backend": "onnxruntime"})
    with pytest.raises(BackendUnavailable, match="BIT_INFERENCE_BACKEND=torch"):
        create_app(chosen)


def test_readyz_says_when_no_worker_is_alive_but_stays_ready(
    client: TestClient, settings: Settings
):
    none_yet = client.get("/readyz")
    assert none_yet.status_code == 200  # an API host still serves predictions
    assert none_yet.json()["workers_alive"] is False
    assert none_yet.json()["checks"]["workers"] == (
        "none alive: queued jobs wait until a worker starts"
    )

    gone = utcnow() - dt.timedelta(seconds=4 * settings.reconcile_every_s)
    with session_scope(settings.database_url) as session:
        session.add(
            Worker(name="old:1", host="old", device="cpu", queues="finetune", last_seen=gone)
        )
    assert client.get("/readyz").json()["workers_alive"] is False  # missed 3 beats: gone

    with session_scope(settings.database_url) as session:
        for name in ("a:1", "b:2"):
            session.add(Worker(name=name, host=name, device="cpu", queues="finetune"))
    ready = client.get("/readyz").json()
    assert ready["workers_alive"] is True
    assert ready["checks"]["workers"] == "2 alive"


def test_metrics_count_requests(client: TestClient):
    client.get("/healthz")
    text = client.get("/metrics").text
    assert 'bit_http_requests_total{method="GET",route="/healthz",status="200"}' in text


def test_unknown_key_is_refused_with_a_clear_code(client: TestClient):
    response = client.get("/v1/datasets", headers={"Authorization": "Bearer nope"})
    assert response.status_code in (401, 404)
