"""Per-tenant quotas on both databases: each quota hit answers its status and code and keeps
nothing (rows and stored files counted before and after); a tenant's own limits raise or
lower the defaults for it alone, null returns to the default, every change is audited;
predictions per minute refill with the clock; the admin routes refuse user keys."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.app import create_app
from service.db.models import AuditEvent, Dataset, Image, Job, Model
from service.db.session import session_scope
from service.quotas.predictions import PredictionQuota
from service.rate_limit import LocalBuckets, RedisBuckets
from service.settings import Settings
from tests.factories import png, save_tiny_model, two_classes
from tests.reliability import figures
from tests.service.conftest import REDIS_URL, new_key, register_model, upload

SMALL_PLAN = {"batch_size": 8, "total_steps": 10, "precrop": 40, "crop": 32}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # The per-key limit is tested elsewhere; a long lookup cache, so a test's own clock rules.
    return settings.model_copy(
        update={"device": "cpu", "rate_limit_per_minute": 0, "lookup_cache_s": 60}
    )


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def admin(settings: Settings) -> dict[str, str]:
    return bearer(new_key(settings, "admin", "ops"))


@pytest.fixture
def acme(settings: Settings) -> dict[str, str]:
    return bearer(new_key(settings, "user", "acme"))


@pytest.fixture
def globex(settings: Settings) -> dict[str, str]:
    return bearer(new_key(settings, "user", "globex"))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def kept(settings: Settings) -> tuple[int, int, int, int, frozenset[str]]:
    """(datasets, images, jobs, models, files in the artifact store): what a refusal must
    leave as it was."""
    with session_scope(settings.database_url) as session:
        counts = [
            session.scalar(select(func.count()).select_from(table)) or 0
            for table in (Dataset, Image, Job, Model)
        ]
    root = Path(settings.artifacts_url)
    files = frozenset(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return counts[0], counts[1], counts[2], counts[3], files


def refused(response: Any, status: int, code: str, quota: str, limit: int) -> dict[str, Any]:
    """Assert a quota refusal: status, code, and a message naming the quota, its limit and
    what to do; counted in the figures."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["quota"] == quota and error["limit"] == limit
    message = error["message"]
    assert f"{limit:,}" in message and "ask an operator to raise the quota" in message, message
    figures.add("quotas checked")
    return error


def set_quotas(client: TestClient, admin: dict, tenant: str, **limits: int | None) -> dict:
    response = client.put(f"/v1/tenants/{tenant}/quotas", json=limits, headers=admin)
    assert response.status_code == 200, response.text
    return response.json()


def finetune(client: TestClient, headers: dict, dataset_id: int) -> Any:
    body = {"dataset_id": dataset_id, "base_model": "R14x0.5", "overrides": SMALL_PLAN}
    return client.post("/v1/finetune", json=body, headers=headers)


def finetune_upload(client: TestClient, headers: dict) -> Any:
    images = two_classes()
    return client.post(
        "/v1/finetune/upload",
        files=[("files", (name, data, "image/png")) for name, data, _ in images],
        data={"labels": [label for _, _, label in images], "base_model": "R14x0.5"},
        headers=headers,
    )


# --- storage: images and stored bytes --------------------------------------------------------


def test_images_quota_refuses_every_upload_path_keeping_nothing(
    client: TestClient, settings: Settings, admin: dict, acme: dict, globex: dict
) -> None:
    set_quotas(client, admin, "acme", images=6)
    first = upload(client, acme, two_classes())
    assert first.status_code == 201, first.text
    dataset = first.json()["id"]
    before = kept(settings)
    new_dataset = upload(client, acme, two_classes())
    error = refused(new_dataset, 507, "quota_images_exceeded", "images", 6)
    assert error["usage"] == 4 and error["requested"] == 4
    append = upload(client, acme, two_classes(), url=f"/v1/datasets/{dataset}/images")
    refused(append, 507, "quota_images_exceeded", "images", 6)
    refused(finetune_upload(client, acme), 507, "quota_images_exceeded", "images", 6)
    assert kept(settings) == before
    # Up to the limit still passes; then images already stored add nothing, and pass too.
    two_more = [("c1.png", png(), "cat"), ("d1.png", png(), "dog")]
    for added in (2, 0):
        response = upload(client, acme, two_more, url=f"/v1/datasets/{dataset}/images")
        assert (response.status_code, response.json()["added"]) == (200, added), response.text
    # Another tenant keeps the default.
    assert upload(client, globex, two_classes()).status_code == 201


def test_stored_bytes_quota_counts_images_and_models(
    client: TestClient, settings: Settings, admin: dict, acme: dict, tmp_path: Path
) -> None:
    assert upload(client, acme, two_classes()).status_code == 201
    save_tiny_model(tmp_path / "model")
    register_model(settings, tmp_path / "model", tenant="acme")
    usage = client.get("/v1/quotas", headers=acme).json()["usage"]
    with session_scope(settings.database_url) as session:
        image_bytes = session.scalar(select(func.sum(Image.size_bytes)))
        model_bytes = session.scalar(select(func.sum(Model.size_bytes)))
    assert usage["stored_bytes"] == image_bytes + model_bytes and model_bytes > 0
    assert (usage["images"], usage["models"], usage["active_jobs"]) == (4, 1, 0)
    limit = usage["stored_bytes"] + 10  # no image fits in 10 bytes
    set_quotas(client, admin, "acme", stored_bytes=limit)
    before = kept(settings)
    error = refused(
        upload(client, acme, two_classes()),
        507,
        "quota_stored_bytes_exceeded",
        "stored_bytes",
        limit,
    )
    assert error["usage"] == usage["stored_bytes"] and error["requested"] > 10
    refused(
        finetune_upload(client, acme), 507, "quota_stored_bytes_exceeded", "stored_bytes", limit
    )
    assert kept(settings) == before


# --- counts: active jobs and models ----------------------------------------------------------


def test_active_jobs_quota_refuses_new_jobs_and_retries(
    client: TestClient, settings: Settings, admin: dict, acme: dict
) -> None:
    dataset = upload(client, acme, two_classes()).json()["id"]
    set_quotas(client, admin, "acme", active_jobs=1)
    first = finetune(client, acme, dataset)
    assert first.status_code == 202, first.text
    before = kept(settings)
    refused(finetune(client, acme, dataset), 429, "quota_active_jobs_exceeded", "active_jobs", 1)
    # The upload-and-train call is refused before it stores its dataset.
    refused(finetune_upload(client, acme), 429, "quota_active_jobs_exceeded", "active_jobs", 1)
    assert kept(settings) == before
    # Cancelled, the job frees its place; retrying it while another is queued takes it again.
    job = first.json()["id"]
    assert client.post(f"/v1/jobs/{job}/cancel", headers=acme).json()["status"] == "cancelled"
    second = finetune(client, acme, dataset)
    assert second.status_code == 202, second.text
    retry = client.post(f"/v1/jobs/{job}/retry", headers=acme)
    refused(retry, 429, "quota_active_jobs_exceeded", "active_jobs", 1)
    assert client.get(f"/v1/jobs/{job}", headers=acme).json()["status"] == "cancelled"


def test_active_jobs_quota_applies_to_pretraining_before_its_manifest(
    client: TestClient, settings: Settings, admin: dict
) -> None:
    dataset = upload(client, admin, two_classes()).json()["id"]  # the admin's tenant: ops
    with session_scope(settings.database_url) as session:
        session.add(Job(tenant="ops", kind="finetune", status="running", base_model="R14x0.5"))
    set_quotas(client, admin, "ops", active_jobs=1)
    before = kept(settings)
    response = client.post(
        "/v1/pretrain", json={"arch": "R14x0.5", "dataset_id": dataset}, headers=admin
    )
    refused(response, 429, "quota_active_jobs_exceeded", "active_jobs", 1)
    assert kept(settings) == before  # no pretrain-manifest.jsonl written


def test_models_quota_counts_models_still_training(
    client: TestClient, settings: Settings, admin: dict, acme: dict, tmp_path: Path
) -> None:
    dataset = upload(client, acme, two_classes()).json()["id"]
    save_tiny_model(tmp_path / "model")
    register_model(settings, tmp_path / "model", tenant="acme")
    set_quotas(client, admin, "acme", models=2)
    assert finetune(client, acme, dataset).status_code == 202  # its model will be the 2nd
    before = kept(settings)
    error = refused(finetune(client, acme, dataset), 429, "quota_models_exceeded", "models", 2)
    assert error["usage"] == 2 and "DELETE /v1/models" in error["message"]
    refused(finetune_upload(client, acme), 429, "quota_models_exceeded", "models", 2)
    assert kept(settings) == before


# --- overrides through the admin API ---------------------------------------------------------


def test_overrides_raise_and_lower_one_tenant_and_null_restores_the_default(
    settings: Settings, admin: dict, acme: dict, globex: dict
) -> None:
    defaults = settings.model_copy(update={"quota_images": 4})
    with TestClient(create_app(defaults), raise_server_exceptions=False) as client:
        read = client.get("/v1/tenants/acme/quotas", headers=admin).json()
        assert read["limits"]["images"] == {"limit": 4, "source": "default"}
        assert read["usage"] == {"stored_bytes": 0, "images": 0, "models": 0, "active_jobs": 0}
        assert upload(client, acme, two_classes()).status_code == 201
        refused(upload(client, acme, two_classes()), 507, "quota_images_exceeded", "images", 4)
        # Raised for acme alone.
        raised = set_quotas(client, admin, "acme", images=8)
        assert raised["limits"]["images"] == {"limit": 8, "source": "tenant"}
        assert raised["limits"]["models"]["source"] == "default"
        assert upload(client, acme, two_classes()).status_code == 201
        assert upload(client, globex, two_classes()).status_code == 201
        refused(upload(client, globex, two_classes()), 507, "quota_images_exceeded", "images", 4)
        # 0 is no limit; a quota left out of the body keeps its value.
        set_quotas(client, admin, "acme", images=0, active_jobs=3)
        assert upload(client, acme, two_classes()).status_code == 201
        limits = set_quotas(client, admin, "acme", active_jobs=None)["limits"]
        assert limits["images"] == {"limit": 0, "source": "tenant"}
        assert limits["active_jobs"] == {"limit": settings.quota_active_jobs, "source": "default"}
        # Lowered below what it holds: reads still work, storing more does not.
        set_quotas(client, admin, "acme", images=2)
        refused(upload(client, acme, two_classes()), 507, "quota_images_exceeded", "images", 2)
        assert client.get("/v1/datasets", headers=acme).status_code == 200
        # Null: back to the default.
        restored = set_quotas(client, admin, "acme", images=None)
        assert restored["limits"]["images"] == {"limit": 4, "source": "default"}
        assert restored["usage"]["images"] == 12
        # The user's own view agrees with the admin's.
        assert client.get("/v1/quotas", headers=acme).json() == restored
    with session_scope(settings.database_url) as session:
        audit = session.execute(
            select(AuditEvent.tenant, AuditEvent.detail)
            .where(AuditEvent.action == "quota.set")
            .order_by(AuditEvent.id)
        ).all()
    assert [tenant for tenant, _ in audit] == ["acme"] * 5
    assert audit[0][1] == {"images": {"old": None, "new": 8}}
    assert audit[-1][1] == {"images": {"old": 2, "new": None}}


def test_quota_updates_are_validated_and_admin_only(
    client: TestClient, settings: Settings, admin: dict, acme: dict
) -> None:
    for body in ({"images": -1}, {"disk": 5}, {"models": 2**31}, {"images": "many"}):
        response = client.put("/v1/tenants/acme/quotas", json=body, headers=admin)
        assert response.status_code == 422, body
    too_long = client.get(f"/v1/tenants/{'t' * 65}/quotas", headers=admin)
    assert too_long.status_code == 422
    for method, path in (("GET", "/v1/tenants/acme/quotas"), ("PUT", "/v1/tenants/acme/quotas")):
        response = client.request(method, path, json={"images": 100}, headers=acme)
        assert (response.status_code, response.json()["error"]["code"]) == (403, "admin_required")
    # A PUT that changes nothing, and the refused ones, leave no audit row and no override.
    set_quotas(client, admin, "acme", images=None)
    with session_scope(settings.database_url) as session:
        rows = select(func.count()).where(AuditEvent.action == "quota.set")
        assert session.scalar(rows) == 0
    assert client.get("/v1/quotas", headers=acme).json()["limits"]["images"]["source"] == "default"


# --- predictions per minute ------------------------------------------------------------------


def predict(client: TestClient, headers: dict, model_id: int, images: int) -> Any:
    encoded = [base64.b64encode(png(32, 32)).decode() for _ in range(images)]
    return client.post(
        "/v1/predict", json={"model_id": model_id, "images": encoded}, headers=headers
    )


def test_predictions_quota_answers_429_then_refills_with_the_clock(
    app: FastAPI,
    client: TestClient,
    settings: Settings,
    admin: dict,
    acme: dict,
    globex: dict,
    tmp_path: Path,
) -> None:
    save_tiny_model(tmp_path / "model", crop=32)
    ours = register_model(settings, tmp_path / "model", tenant="acme")
    theirs = register_model(settings, tmp_path / "model", tenant="globex")
    clock = FakeClock()
    quota: PredictionQuota = app.state.prediction_quota
    quota.buckets = LocalBuckets(clock)
    set_quotas(client, admin, "acme", predictions_per_minute=3)
    assert predict(client, acme, ours, 2).status_code == 200
    assert predict(client, acme, ours, 1).status_code == 200
    over = predict(client, acme, ours, 1)
    refused(over, 429, "quota_predictions_exceeded", "predictions_per_minute", 3)
    assert int(over.headers["Retry-After"]) == 20  # a token every 20 s
    assert predict(client, globex, theirs, 4).status_code == 200  # globex: the default
    # The next minute: a full bucket again. A batch larger than what is left still passes,
    # and its debt is waited out.
    clock.now += 60
    assert predict(client, acme, ours, 5).status_code == 200
    again = predict(client, acme, ours, 1)
    refused(again, 429, "quota_predictions_exceeded", "predictions_per_minute", 3)
    assert int(again.headers["Retry-After"]) == 60
    clock.now += 60
    assert predict(client, acme, ours, 1).status_code == 200
    # Lifted: this process applies it at once, despite its cache.
    set_quotas(client, admin, "acme", predictions_per_minute=0)
    assert all(predict(client, acme, ours, 3).status_code == 200 for _ in range(3))


def test_a_warm_predict_reads_no_quota_from_the_database(
    app: FastAPI, client: TestClient, settings: Settings, acme: dict, tmp_path: Path
) -> None:
    save_tiny_model(tmp_path / "model", crop=32)
    model = register_model(settings, tmp_path / "model", tenant="acme")
    quota: PredictionQuota = app.state.prediction_quota
    reads: list[str] = []
    read_limit = quota._read_limit

    def counted(tenant: str) -> int:
        reads.append(tenant)
        return read_limit(tenant)

    quota._read_limit = counted  # type: ignore[method-assign]
    for _ in range(5):
        assert predict(client, acme, model, 1).status_code == 200
    assert reads == ["acme"]


def test_tenant_buckets_in_redis_spend_a_batch_and_wait_out_its_debt(settings: Settings) -> None:
    prefix = f"test-quota-{uuid.uuid4().hex[:8]}:"
    buckets = RedisBuckets(REDIS_URL, prefix)
    try:
        quota = PredictionQuota(settings, buckets)
        assert quota.retry_after("acme", 3, 5) is None  # a full bucket takes a batch of 5
        wait = quota.retry_after("acme", 3, 1)
        assert wait is not None and 59 <= wait <= 60  # 2 tokens of debt + 1 at 20 s each
        assert quota.retry_after("globex", 3, 1) is None  # per tenant
        figures.add("quotas checked")
    finally:
        buckets.close()
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(f"{prefix}*", count=100))
        if keys:
            client.delete(*keys)
        client.close()
