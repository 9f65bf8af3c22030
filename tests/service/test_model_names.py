"""Named models: versions per (tenant, name), aliases, predict by `name`, `name@alias` and
`name:3`, unarchive; on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select

from bit_core.checkpoint import ModelInfo, read_model_info
from service.app import create_app
from service.db.models import AuditEvent, Job, Model
from service.db.session import get_engine, session_scope
from service.models.service import add_model, model_row
from service.settings import Settings
from tests.factories import png_bytes
from tests.service.conftest import (
    SMALL,
    dataset_rows,
    error_of,
    finetune,
    register_model,
    upload,
    uploads,
)

INFO = ModelInfo(arch="R14x0.5", classes=["cat", "dog"], crop=32)


@pytest.fixture
def warm_client(settings: Settings) -> Iterator[TestClient]:
    """An app that remembers lookups for a minute: only its own moves can refresh a name."""
    with TestClient(create_app(settings.model_copy(update={"lookup_cache_s": 60}))) as client:
        yield client


def predict_by(client: TestClient, headers: dict, model: str, count: int = 1):
    return client.post(
        "/v1/predict",
        files=uploads(count),
        data={"model": model, "top_k": "2"},
        headers=headers,
    )


def move(client: TestClient, headers: dict, name: str, alias: str, version: int):
    return client.put(
        f"/v1/models/by-name/{name}/aliases/{alias}", json={"version": version}, headers=headers
    )


def test_versions_are_numbered_per_name_and_tenant(settings: Settings, template: Path):
    a1 = register_model(settings, template, name="shapes")
    a2 = register_model(settings, template, name="shapes")
    b1 = register_model(settings, template, name="other")
    c1 = register_model(settings, template, name="shapes", tenant="globex")
    a3 = register_model(settings, template, name="shapes")
    with session_scope(settings.database_url) as session:
        versions = {m.id: m.version for m in session.scalars(select(Model))}
    assert versions == {a1: 1, a2: 2, b1: 1, c1: 1, a3: 3}


def test_a_version_taken_meanwhile_is_retried(settings: Settings, template: Path):
    """Race safety: a registration that read a maximum another worker has since passed hits
    the unique (tenant, name, version) constraint and takes the next free version."""
    register_model(settings, template, name="shapes")
    register_model(settings, template, name="shapes")
    info = read_model_info(template)
    with session_scope(settings.database_url) as session:
        job = Job(tenant="acme", kind="finetune", status="succeeded", base_model="R14x0.5")
        session.add(job)
        session.flush()
        real_scalar = session.scalar
        reads: list[object] = []

        def stale_once(statement, *args, **kwargs):
            value = real_scalar(statement, *args, **kwargs)
            reads.append(value)
            return 1 if len(reads) == 1 else value  # the first read misses version 2

        session.scalar = stale_once  # type: ignore[method-assign]
        model = add_model(session, model_row(info, job=job, uri="y", size_bytes=1, name="shapes"))
        session.scalar = real_scalar  # type: ignore[method-assign, assignment]
        assert reads == [2, 2] and model.version == 3
    with session_scope(settings.database_url) as session:
        versions = session.scalars(select(Model.version).order_by(Model.version)).all()
    assert versions == [1, 2, 3]


def test_predict_by_name_alias_and_version(
    client: TestClient, settings: Settings, user_headers, template: Path
):
    v1 = register_model(settings, template)
    v2 = register_model(settings, template)
    assert predict_by(client, user_headers, "shapes").json()["model_id"] == v2  # latest
    assert predict_by(client, user_headers, "shapes:1").json()["model_id"] == v1
    assert predict_by(client, user_headers, "shapes:2").json()["model_id"] == v2
    moved = move(client, user_headers, "shapes", "production", 1)
    assert moved.status_code == 200, moved.text
    assert moved.json()["model_id"] == v1 and moved.json()["version"] == 1
    answer = predict_by(client, user_headers, "shapes@production")
    assert answer.status_code == 200 and answer.json()["model_id"] == v1
    assert len(answer.json()["predictions"][0]["top_k"]) == 2
    # JSON bodies take `model` too.
    body = {
        "model": "shapes@production",
        "images": [base64.b64encode(uploads(1)[0][1][1]).decode()],
    }
    assert client.post("/v1/predict", json=body, headers=user_headers).json()["model_id"] == v1

    # Archived latest: `name` falls back to the latest ready version.
    client.post(f"/v1/models/{v2}/archive", headers=user_headers)
    assert predict_by(client, user_headers, "shapes").json()["model_id"] == v1

    for ref, want in [
        ("shapes:9", (404, "model_not_found")),
        ("shapes@staging", (404, "model_not_found")),
        ("nope", (404, "model_not_found")),
        ("12", (422, "invalid_model_name")),
        ("bad name", (422, "invalid_model_name")),
        ("shapes:x", (422, "invalid_model_name")),
    ]:
        assert error_of(predict_by(client, user_headers, ref))[:2] == want, ref
    both = client.post(
        "/v1/predict",
        files=uploads(1),
        data={"model": "shapes", "model_id": str(v1)},
        headers=user_headers,
    )
    assert error_of(both)[:2] == (422, "invalid_request")


def test_names_are_per_tenant(
    client: TestClient, settings: Settings, user_headers, other_tenant_headers, template: Path
):
    register_model(settings, template, name="shapes")
    status, code, _ = error_of(predict_by(client, other_tenant_headers, "shapes"))
    assert (status, code) == (404, "model_not_found")
    assert move(client, other_tenant_headers, "shapes", "production", 1).status_code == 404
    named = client.get("/v1/models/by-name/shapes", headers=other_tenant_headers)
    assert named.status_code == 404


def test_moving_an_alias_takes_effect_at_once_and_is_audited(
    warm_client: TestClient, settings: Settings, user_headers, template: Path
):
    v1 = register_model(settings, template)
    v2 = register_model(settings, template)
    assert move(warm_client, user_headers, "shapes", "production", 1).status_code == 200
    assert predict_by(warm_client, user_headers, "shapes@production").json()["model_id"] == v1

    # Warm: the name is remembered, so a predict by name reads nothing from the database.
    statements: list[str] = []
    engine = get_engine(settings.database_url)

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        assert predict_by(warm_client, user_headers, "shapes@production").status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert not [s for s in statements if "models" in s or "model_aliases" in s], statements

    assert move(warm_client, user_headers, "shapes", "production", 2).status_code == 200
    assert predict_by(warm_client, user_headers, "shapes@production").json()["model_id"] == v2

    named = warm_client.get("/v1/models/by-name/shapes", headers=user_headers).json()
    assert [v["version_number"] for v in named["versions"]] == [2, 1]
    assert [(a["alias"], a["version"]) for a in named["aliases"]] == [("production", 2)]

    production = "/v1/models/by-name/shapes/aliases/production"
    assert warm_client.delete(production, headers=user_headers).status_code == 204
    status, code, _ = error_of(predict_by(warm_client, user_headers, "shapes@production"))
    assert (status, code) == (404, "model_not_found")
    again = warm_client.delete(production, headers=user_headers)
    assert error_of(again)[:2] == (404, "alias_not_found")

    with session_scope(settings.database_url) as session:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "alias.move").order_by(AuditEvent.id)
        ).all()
        moves = [(r.target, r.tenant, (r.detail or {}).get("model_id")) for r in rows]
    assert moves == [
        ("shapes@production", "acme", v1),
        ("shapes@production", "acme", v2),
        ("shapes@production", "acme", None),
    ]
    assert error_of(move(warm_client, user_headers, "shapes", "production", 7))[:2] == (
        404,
        "model_not_found",
    )


def test_an_alias_moved_under_load_fails_no_request(
    warm_client: TestClient, settings: Settings, user_headers, template: Path
):
    v1 = register_model(settings, template)
    v2 = register_model(settings, template)
    assert move(warm_client, user_headers, "shapes", "production", 1).status_code == 200

    def one(_: int) -> tuple[int, int | None]:
        answer = predict_by(warm_client, user_headers, "shapes@production")
        return answer.status_code, answer.json().get("model_id")

    answers: list[tuple[int, int | None]] = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        pending = [pool.submit(one, i) for i in range(60)]
        for flip in range(10):
            moved = move(warm_client, user_headers, "shapes", "production", 2 - flip % 2)
            assert moved.status_code == 200
        answers = [future.result() for future in pending]
    assert all(status == 200 for status, _ in answers), answers
    assert {model_id for _, model_id in answers} <= {v1, v2}
    # After the last move (to version 1), the next predict uses it.
    assert predict_by(warm_client, user_headers, "shapes@production").json()["model_id"] == v1


def test_unarchive_serves_the_model_again(
    client: TestClient, settings: Settings, user_headers, template: Path
):
    model_id = register_model(settings, template)
    assert client.post(f"/v1/models/{model_id}/archive", headers=user_headers).status_code == 200
    assert error_of(predict_by(client, user_headers, "shapes:1"))[:2] == (409, "model_archived")
    back = client.post(f"/v1/models/{model_id}/unarchive", headers=user_headers)
    assert back.status_code == 200 and back.json()["status"] == "ready"
    assert predict_by(client, user_headers, "shapes:1").status_code == 200
    assert predict_by(client, user_headers, "shapes").json()["model_id"] == model_id
    again = client.post(f"/v1/models/{model_id}/unarchive", headers=user_headers)
    assert again.status_code == 200  # idempotent
    with session_scope(settings.database_url) as session:
        actions = session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all()
    assert actions.count("model.unarchive") == 1


def test_a_fine_tune_takes_a_model_name(client: TestClient, settings: Settings, user_headers):
    dataset_id = dataset_rows(settings)
    for bad in ("12", "bad name", "x" * 65, ""):
        answer = finetune(client, user_headers, dataset_id, model_name=bad)
        assert error_of(answer)[:2] == (422, "invalid_request"), bad
    answer = finetune(client, user_headers, dataset_id, model_name="pets-v")
    assert answer.status_code == 202, answer.text
    unnamed = finetune(client, user_headers, dataset_id)
    with session_scope(settings.database_url) as session:
        named_job = session.get(Job, answer.json()["id"])
        other_job = session.get(Job, unnamed.json()["id"])
        assert named_job is not None and other_job is not None
        assert named_job.params["model_name"] == "pets-v"
        # What the worker registers: the job's name, else the default "model".
        assert model_row(INFO, job=named_job, uri="a", size_bytes=1).name == "pets-v"
        assert model_row(INFO, job=other_job, uri="b", size_bytes=1).name == "model"


def test_the_upload_form_takes_a_model_name(client: TestClient, settings: Settings, user_headers):
    images = [
        (f"{label}{i}.png", png_bytes(i, seed), label)
        for seed, label in enumerate(("a", "b"))
        for i in range(3)
    ]
    common = {"base_model": "R14x0.5", "overrides": json.dumps(SMALL)}
    bad = upload(client, user_headers, images, url="/v1/finetune/upload", model_name="12", **common)
    assert error_of(bad)[:2] == (422, "invalid_model_name")
    good = upload(
        client, user_headers, images, url="/v1/finetune/upload", model_name="parts", **common
    )
    assert good.status_code == 202, good.text
    with session_scope(settings.database_url) as session:
        job = session.get(Job, good.json()["id"])
        assert job is not None and job.params["model_name"] == "parts"


def test_deleting_a_version_removes_its_aliases(
    client: TestClient, settings: Settings, user_headers, template: Path
):
    v1 = register_model(settings, template)
    register_model(settings, template)
    assert move(client, user_headers, "shapes", "production", 1).status_code == 200
    assert client.delete(f"/v1/models/{v1}", headers=user_headers).status_code == 204
    named = client.get("/v1/models/by-name/shapes", headers=user_headers).json()
    assert [v["version_number"] for v in named["versions"]] == [2] and named["aliases"] == []
    status, code, _ = error_of(predict_by(client, user_headers, "shapes@production"))
    assert (status, code) == (404, "model_not_found")
