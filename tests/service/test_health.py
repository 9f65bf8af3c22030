"""Health, readiness and metrics on both database backends."""

from __future__ import annotations

from fastapi.testclient import TestClient


def test_healthz_and_readyz(client: TestClient):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "artifacts": "ok"}


def test_metrics_count_requests(client: TestClient):
    client.get("/healthz")
    text = client.get("/metrics").text
    assert 'bit_http_requests_total{method="GET",route="/healthz",status="200"}' in text


def test_unknown_key_is_refused_with_a_clear_code(client: TestClient):
    response = client.get("/v1/datasets", headers={"Authorization": "Bearer nope"})
    assert response.status_code in (401, 404)
