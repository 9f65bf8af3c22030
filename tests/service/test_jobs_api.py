"""Job endpoints through the app: create, plan, errors, tenants, cancel, retry, SSE."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select

from service.db.models import Job
from service.db.session import session_scope
from service.queueing import celery_client
from service.settings import Settings
from tests.service.conftest import dataset_rows, finetune
from worker.reconciler import queue_depths


def test_finetune_commits_the_job_then_enqueues_it(
    client: TestClient, settings: Settings, user_headers
):
    response = finetune(client, user_headers, dataset_rows(settings))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["kind"] == "finetune"
    plan = job["plan"]
    assert (
        plan["total_steps"] == 10 and plan["batch_size"] == 8 and plan["classes"] == ["cat", "dog"]
    )
    assert plan["image_hw"] == [480, 640] and plan["overrides"]["total_steps"] == 10
    assert queue_depths(celery_client(settings))["finetune"] == 1


def test_hyperrule_defaults_apply_without_overrides(
    client: TestClient, settings: Settings, user_headers
):
    response = finetune(client, user_headers, dataset_rows(settings), overrides={})
    plan = response.json()["plan"]
    assert plan["supports"] == [100, 200, 300, 400, 500] and plan["crop"] == 384
    assert plan["base_lr"] == 0.003 and plan["mixup_alpha"] == 0.0


def test_finetune_errors_are_clear(client: TestClient, settings: Settings, user_headers):
    dataset_id = dataset_rows(settings)
    missing = finetune(client, user_headers, dataset_id, base_model="BiT-M-R50x1")
    assert missing.status_code == 422
    assert missing.json()["error"]["code"] == "base_model_not_installed"
    assert "bit weights pull BiT-M-R50x1" in missing.json()["error"]["message"]

    unknown = finetune(client, user_headers, dataset_id, base_model="ResNet-9000")
    assert unknown.json()["error"]["code"] == "unknown_base_model"

    bad = finetune(client, user_headers, dataset_id, overrides={"warp_speed": 9})
    assert bad.status_code == 422 and "warp_speed" in bad.json()["error"]["message"]

    small = dataset_rows(settings, per_class=1)
    few = finetune(client, user_headers, small)
    assert few.status_code == 422 and few.json()["error"]["code"] == "too_few_images"

    absent = finetune(client, user_headers, 999_999)
    assert absent.status_code == 404 and absent.json()["error"]["code"] == "dataset_not_found"
    with session_scope(settings.database_url) as session:
        assert session.scalars(select(Job)).all() == []  # nothing half-created


def test_tenants_see_only_their_jobs(
    client: TestClient, settings: Settings, user_headers, other_tenant_headers, admin_headers
):
    job = finetune(client, user_headers, dataset_rows(settings)).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=other_tenant_headers).status_code == 404
    assert (
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=other_tenant_headers).status_code == 404
    )
    assert client.get("/v1/jobs", headers=other_tenant_headers).json()["total"] == 0
    assert (
        finetune(client, other_tenant_headers, dataset_rows(settings, tenant="globex")).status_code
        == 202
    )
    assert client.get("/v1/jobs", headers=admin_headers).json()["total"] == 2
    foreign = finetune(client, other_tenant_headers, dataset_rows(settings, tenant="acme"))
    assert foreign.status_code == 404


def test_list_filters_and_paginates(client: TestClient, settings: Settings, user_headers):
    dataset_id = dataset_rows(settings)
    ids = [finetune(client, user_headers, dataset_id).json()["id"] for _ in range(3)]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=user_headers)
    page = client.get("/v1/jobs?limit=2&offset=0", headers=user_headers).json()
    assert page["total"] == 3 and [j["id"] for j in page["items"]] == ids[::-1][:2]
    cancelled = client.get("/v1/jobs?status=cancelled", headers=user_headers).json()
    assert [j["id"] for j in cancelled["items"]] == [ids[0]]
    assert client.get("/v1/jobs?limit=0", headers=user_headers).status_code == 422


def test_cancel_then_retry(client: TestClient, settings: Settings, user_headers):
    job = finetune(client, user_headers, dataset_rows(settings)).json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=user_headers).json()
    assert cancelled["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=user_headers)
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    retried = client.post(f"/v1/jobs/{job['id']}/retry", headers=user_headers).json()
    assert retried["status"] == "queued"
    assert client.post(f"/v1/jobs/{job['id']}/retry", headers=user_headers).status_code == 409
    events = [
        e["kind"]
        for e in client.get(f"/v1/jobs/{job['id']}", headers=user_headers).json()["events"]
    ]
    assert events == ["created", "cancelled", "retried"]


def test_progress_stream_ends_with_the_job(client: TestClient, settings: Settings, user_headers):
    job = finetune(client, user_headers, dataset_rows(settings)).json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=user_headers)
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=user_headers) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    assert "event: progress" in text and 'event: end\ndata: {"status": "cancelled"}' in text


def test_jobs_need_a_key(client: TestClient):
    response = client.get("/v1/jobs")
    assert (
        response.status_code == 401
        and "bit admin create-key" in response.json()["error"]["message"]
    )
