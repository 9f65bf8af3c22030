"""The audit log: one row for every audited action, through the API and the dashboard, with
who (key prefix, tenant, address), whose data and what; no row for a failed request, nor for
a change whose commit fails; never a key or secret in any row; `GET /v1/audit` filters,
pages and is for admins only."""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from service.app import create_app
from service.audit import record
from service.auth import Principal
from service.dashboard.auth import signing_secret
from service.db.models import AuditEvent, Dataset, Job, Model
from service.db.session import session_scope
from service.settings import Settings
from tests.dashboard.conftest import csrf_of, sign_in
from tests.factories import save_tiny_model, two_classes
from tests.reliability import figures
from tests.service.conftest import new_key, register_model, upload

ADDRESS = "testclient"  # the client address Starlette's TestClient reports
COVERED: set[str] = set()  # the actions verified in this session (counted once each)


def covered(action: str) -> None:
    if action not in COVERED:
        COVERED.add(action)
        figures.add("audit actions covered")


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Known secrets, so that every row can be searched for them.
    return settings.model_copy(
        update={
            "rate_limit_per_minute": 0,
            "session_secret": secrets.token_urlsafe(48),
            "webhook_secret": secrets.token_urlsafe(32),
            "webhook_secret_previous": secrets.token_urlsafe(32),
        }
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One saved tiny model, copied into each test's store by `register_model`."""
    directory = tmp_path_factory.mktemp("model") / "model"
    save_tiny_model(directory, seed=1)
    return directory


@dataclass
class Keys:
    """The keys a test makes, all remembered so that every audit row can be searched."""

    settings: Settings
    made: list[str] = field(default_factory=list)

    def new(self, role: str = "user", tenant: str = "acme") -> str:
        key = new_key(self.settings, role, tenant)
        self.made.append(key)
        return key


@pytest.fixture
def keys(settings: Settings) -> Iterator[Keys]:
    """The test's keys; afterwards, no audit row may hold any of them or any secret."""
    made = Keys(settings)
    yield made
    assert_no_secrets(settings, made.made)


def assert_no_secrets(settings: Settings, keys: list[str]) -> None:
    """Every column of every row, searched for each key, its secret part, the session
    secret and the webhook secrets."""
    forbidden = [signing_secret(settings), settings.webhook_secret]
    forbidden += [settings.webhook_secret_previous]
    for key in keys:
        # The whole key; what follows "bit_"; what follows the prefix (never shown anywhere),
        # and a piece of it, in case a row held it cut short.
        forbidden += [key, key[4:], key[12:], key[12:24]]
    with session_scope(settings.database_url) as session:
        rows = session.execute(sa.select(*AuditEvent.__table__.columns)).all()
    for row in rows:
        text = " ".join(json.dumps(v) if isinstance(v, dict) else str(v) for v in row)
        for secret in forbidden:
            assert secret and secret not in text, f"audit row {row.id} holds a secret"


def test_the_secret_scan_finds_a_planted_secret(settings: Settings, keys: Keys):
    key = keys.new("admin", "ops")
    for planted in (key, key[12:], signing_secret(settings), settings.webhook_secret):
        with session_scope(settings.database_url) as session:
            record(session, None, "key.create", tenant="ops", detail={"oops": f"x{planted}x"})
        with pytest.raises(AssertionError, match="holds a secret"):
            assert_no_secrets(settings, keys.made)
        with session_scope(settings.database_url) as session:
            session.execute(sa.delete(AuditEvent))
    assert_no_secrets(settings, keys.made)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def audit_rows(settings: Settings, action: str | None = None) -> list[AuditEvent]:
    """The rows of the test's actions: the keys a test makes on the server (`new_key`, as
    the CLI does) are audited too, and those rows, being setup, are left out."""
    setup = (AuditEvent.action == "key.create") & AuditEvent.actor_key_prefix.is_(None)
    with session_scope(settings.database_url) as session:
        query = select(AuditEvent).where(~setup).order_by(AuditEvent.id)
        if action is not None:
            query = query.where(AuditEvent.action == action)
        rows = list(session.scalars(query))
        session.expunge_all()
        return rows


def only_row(
    settings: Settings, action: str, *, key: str, tenant: str, target: str | None = None
) -> AuditEvent:
    """The one row of `action` (there must be exactly one), done by `key` on `tenant`'s
    `target` (any target if None) from the test client's address."""
    rows = audit_rows(settings, action)
    assert len(rows) == 1, [(r.action, r.target) for r in rows]
    row = rows[0]
    assert row.tenant == tenant and target in (None, row.target), (row.tenant, row.target)
    assert row.actor_key_prefix == key[:12]
    assert row.address == ADDRESS
    assert row.at is not None
    covered(action)
    return row


def job_row(settings: Settings, status: str, tenant: str = "acme") -> int:
    with session_scope(settings.database_url) as session:
        job = Job(tenant=tenant, kind="finetune", status=status, base_model="R14x0.5")
        session.add(job)
        session.flush()
        return job.id


def dataset_of(client: TestClient, key: str) -> int:
    response = upload(client, bearer(key), two_classes(), name="pets")
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


# --- every action, once, through the API ------------------------------------------------------


def test_dataset_delete_is_recorded_with_who_and_whose(
    client: TestClient, settings: Settings, keys: Keys
):
    user, admin = keys.new("user", "acme"), keys.new("admin", "ops")
    mine, theirs = dataset_of(client, user), dataset_of(client, keys.new("user", "globex"))
    assert client.delete(f"/v1/datasets/{mine}", headers=bearer(user)).status_code == 204
    row = only_row(settings, "dataset.delete", key=user, tenant="acme", target=f"dataset {mine}")
    assert row.actor_tenant == "acme" and row.detail == {"name": "pets", "images": 4}

    # An admin deleting another tenant's dataset: the row names the tenant whose data it was.
    assert client.delete(f"/v1/datasets/{theirs}", headers=bearer(admin)).status_code == 204
    rows = audit_rows(settings, "dataset.delete")
    assert [(r.tenant, r.actor_tenant, r.actor_key_prefix) for r in rows][1:] == [
        ("globex", "ops", admin[:12])
    ]


def test_model_archive_and_delete_are_recorded(
    client: TestClient, settings: Settings, keys: Keys, model_dir: Path
):
    user, admin = keys.new("user", "acme"), keys.new("admin", "ops")
    mine = register_model(settings, model_dir, tenant="acme")
    theirs = register_model(settings, model_dir, tenant="globex", name="other")
    assert client.post(f"/v1/models/{mine}/archive", headers=bearer(user)).status_code == 200
    # Archiving an archived model changes nothing, so it adds no row.
    assert client.post(f"/v1/models/{mine}/archive", headers=bearer(user)).status_code == 200
    row = only_row(settings, "model.archive", key=user, tenant="acme", target=f"model {mine}")
    assert row.detail == {"name": "shapes"}

    assert client.delete(f"/v1/models/{theirs}", headers=bearer(admin)).status_code == 204
    row = only_row(settings, "model.delete", key=admin, tenant="globex", target=f"model {theirs}")
    assert row.actor_tenant == "ops" and row.detail["name"] == "other"


def test_job_cancel_and_retry_are_recorded(client: TestClient, settings: Settings, keys: Keys):
    user = keys.new("user", "acme")
    job_id = job_row(settings, "queued")
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(user))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    row = only_row(settings, "job.cancel", key=user, tenant="acme", target=f"job {job_id}")
    assert row.detail == {"from": "queued", "to": "cancelled"}

    retried = client.post(f"/v1/jobs/{job_id}/retry", headers=bearer(user))
    assert retried.status_code == 200 and retried.json()["status"] == "queued"
    row = only_row(settings, "job.retry", key=user, tenant="acme", target=f"job {job_id}")
    assert row.detail == {"from": "cancelled"}


def test_failed_requests_write_no_row(
    client: TestClient, settings: Settings, keys: Keys, model_dir: Path
):
    user, other = keys.new("user", "acme"), keys.new("user", "globex")
    model_id = register_model(settings, model_dir, tenant="acme")
    dataset_id = dataset_of(client, user)
    busy = dataset_of(client, user)
    with session_scope(settings.database_url) as session:
        session.add(
            Job(
                tenant="acme",
                kind="finetune",
                status="running",
                dataset_id=busy,
                base_model="R14x0.5",
            )
        )
    finished, queued = job_row(settings, "succeeded"), job_row(settings, "queued")
    attempts = [
        # (method, path, key, the answer): another tenant's rows answer like missing ones
        ("DELETE", f"/v1/models/{model_id}", other, 404),
        ("POST", f"/v1/models/{model_id}/archive", other, 404),
        ("DELETE", f"/v1/datasets/{dataset_id}", other, 404),
        ("DELETE", f"/v1/datasets/{busy}", user, 409),  # used by a running job
        ("POST", f"/v1/jobs/{finished}/cancel", user, 409),
        ("POST", f"/v1/jobs/{finished}/retry", user, 409),
        ("POST", f"/v1/jobs/{queued}/retry", user, 409),
        ("POST", f"/v1/jobs/{queued}/cancel", other, 404),
        ("DELETE", "/v1/models/999999", user, 404),
    ]
    for method, path, key, status in attempts:
        response = client.request(method, path, headers=bearer(key))
        assert response.status_code == status, (method, path, response.text)
    assert audit_rows(settings) == []


# The audited changes through the API: (method, a setup that makes the row and returns the
# path). A setup takes (settings, model_dir, client, key).
Setup = Callable[[Settings, Path, TestClient, str], str]


def _model_path(settings: Settings, model_dir: Path, suffix: str) -> str:
    return f"/v1/models/{register_model(settings, model_dir)}{suffix}"


CHANGES: dict[str, tuple[str, Setup]] = {
    "dataset.delete": (
        "DELETE",
        lambda s, m, client, key: f"/v1/datasets/{dataset_of(client, key)}",
    ),
    "model.archive": ("POST", lambda s, m, client, key: _model_path(s, m, "/archive")),
    "model.delete": ("DELETE", lambda s, m, client, key: _model_path(s, m, "")),
    "job.cancel": ("POST", lambda s, m, client, key: f"/v1/jobs/{job_row(s, 'queued')}/cancel"),
    "job.retry": ("POST", lambda s, m, client, key: f"/v1/jobs/{job_row(s, 'failed')}/retry"),
}


def state(settings: Settings) -> list[tuple[str, int, str | None]]:
    """Every dataset, model and job: (table, id, status)."""
    with session_scope(settings.database_url) as session:
        return [
            (table.__name__, row.id, getattr(row, "status", None))
            for table in (Dataset, Model, Job)
            for row in session.scalars(select(table).order_by(table.id))
        ]


@pytest.fixture
def failing_audited_commits() -> Iterator[None]:
    """Every commit that carries an audit row fails, as a database error at commit would."""

    def attached(session: Session, instance: object) -> None:
        if isinstance(instance, AuditEvent):  # noted here: a flush may send it before commit
            session.info["audited"] = True

    def commit(session: Session) -> None:
        if session.info.pop("audited", False):
            raise sa.exc.OperationalError("COMMIT", {}, Exception("injected commit failure"))

    event.listen(Session, "after_attach", attached)
    event.listen(Session, "before_commit", commit)
    yield
    event.remove(Session, "before_commit", commit)
    event.remove(Session, "after_attach", attached)


@pytest.mark.parametrize("action", sorted(CHANGES))
def test_a_change_whose_commit_fails_leaves_neither_change_nor_row(
    action: str, settings: Settings, keys: Keys, model_dir: Path, request: pytest.FixtureRequest
):
    user = keys.new("user", "acme")
    method, setup = CHANGES[action]
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        path = setup(settings, model_dir, client, user)
        before = state(settings)
        request.getfixturevalue("failing_audited_commits")
        response = client.request(method, path, headers=bearer(user))
    assert response.status_code == 503, response.text  # the database error's answer
    assert state(settings) == before  # the change rolled back with its row
    assert audit_rows(settings) == []


# --- the dashboard: sign-in, cancel and retry ---------------------------------------------


@pytest.fixture
def dashboard(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def test_dashboard_login_is_recorded_and_a_wrong_one_is_not(
    dashboard: TestClient, settings: Settings, keys: Keys
):
    admin, user = keys.new("admin", "ops"), keys.new("user", "acme")
    for wrong in (user, admin[:-2] + "xx", "bit_" + "A" * 43, ""):
        assert sign_in(dashboard, wrong).status_code == 401
    assert audit_rows(settings) == []

    assert sign_in(dashboard, admin).status_code == 303
    row = only_row(settings, "admin.login", key=admin, tenant="ops", target="dashboard")
    assert row.actor_tenant == "ops" and row.detail == {}


def test_a_sign_in_whose_commit_fails_opens_no_session_and_leaves_no_row(
    settings: Settings, keys: Keys, request: pytest.FixtureRequest
):
    admin = keys.new("admin", "ops")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        request.getfixturevalue("failing_audited_commits")
        response = sign_in(client, admin)
        assert response.status_code == 503, response.text
        assert "bit_admin=" not in response.headers.get("set-cookie", "")
        assert client.get("/admin", follow_redirects=False).status_code == 303  # to sign in
    assert audit_rows(settings) == []


def test_dashboard_cancel_and_retry_are_recorded_like_the_api(
    dashboard: TestClient, settings: Settings, keys: Keys
):
    admin = keys.new("admin", "ops")
    assert sign_in(dashboard, admin).status_code == 303
    job_id = job_row(settings, "queued", tenant="globex")
    csrf = csrf_of(dashboard.get(f"/admin/jobs/{job_id}").text)
    for action, path in (("job.cancel", "cancel"), ("job.retry", "retry")):
        done = dashboard.post(
            f"/admin/jobs/{job_id}/{path}", data={"csrf_token": csrf}, follow_redirects=False
        )
        assert done.status_code == 303
        row = only_row(settings, action, key=admin, tenant="globex", target=f"job {job_id}")
        assert row.actor_tenant == "ops"

    # A refused action (the job is queued again, so not retryable) writes nothing.
    refused = dashboard.post(
        f"/admin/jobs/{job_id}/retry", data={"csrf_token": csrf}, follow_redirects=False
    )
    assert refused.status_code == 303
    assert len(audit_rows(settings, "job.retry")) == 1


# --- keys (the keys API) ----------------------------------------------------------------


def keys_api(client: TestClient) -> None:
    app = client.app
    assert isinstance(app, FastAPI)
    routes = {(m, r.path) for r in iter_route_contexts(app.routes) for m in r.methods or ()}
    if not {("POST", "/v1/keys"), ("DELETE", "/v1/keys/{prefix}")} <= routes:
        pytest.skip("the keys API (POST/DELETE /v1/keys) is not there yet")


def test_key_create_and_revoke_are_recorded(client: TestClient, settings: Settings, keys: Keys):
    keys_api(client)
    admin = keys.new("admin", "ops")
    created = client.post(
        "/v1/keys",
        json={"tenant": "acme", "role": "user", "scopes": ["predict"]},
        headers=bearer(admin),
    )
    assert created.status_code == 201, created.text
    new, prefix = created.json()["key"], created.json()["prefix"]
    keys.made.append(new)
    row = only_row(settings, "key.create", key=admin, tenant="acme")
    assert prefix in row.target and row.actor_tenant == "ops"

    assert client.delete(f"/v1/keys/{prefix}", headers=bearer(admin)).status_code in (200, 204)
    row = only_row(settings, "key.revoke", key=admin, tenant="acme")
    assert prefix in row.target

    # A key that never was: refused, and no row.
    missing = client.delete("/v1/keys/bit_NOSUCHKE", headers=bearer(admin))
    assert missing.status_code == 404, missing.text
    assert len(audit_rows(settings, "key.revoke")) == 1


# --- reading it: GET /v1/audit ----------------------------------------------------------------


def seed_events(settings: Settings) -> tuple[list[int], dt.datetime]:
    """Six events an hour apart: tenants acme and globex, two keys and the CLI, oldest first."""
    start = dt.datetime(2025, 1, 31, 12, 0, tzinfo=dt.UTC)
    alice = Principal(1, "acme", "user", prefix="bit_aliceAAA", address="10.0.0.1")
    root = Principal(2, "ops", "admin", prefix="bit_rootBBBB", address="10.0.0.2")
    plan = [
        (alice, "dataset.delete", "acme"),
        (alice, "model.delete", "acme"),
        (root, "model.delete", "globex"),
        (root, "job.cancel", "acme"),
        (None, "key.revoke", "globex"),  # the CLI, on the server
        (root, "model.archive", "globex"),
    ]
    ids = []
    with session_scope(settings.database_url) as session:
        for hour, (actor, action, tenant) in enumerate(plan):
            row = record(session, actor, action, tenant=tenant, target=f"thing {hour}")
            row.at = start + dt.timedelta(hours=hour)
            session.flush()
            ids.append(row.id)
    return ids, start


def test_audit_api_filters_and_pages(client: TestClient, settings: Settings, keys: Keys):
    admin = bearer(keys.new("admin", "ops"))
    with session_scope(settings.database_url) as session:
        session.execute(sa.delete(AuditEvent))  # its key's creation: a log of only the seeds
    ids, start = seed_events(settings)

    def read(**query: Any) -> dict[str, Any]:
        response = client.get("/v1/audit", params=query, headers=admin)
        assert response.status_code == 200, response.text
        return response.json()

    def item_ids(**query: Any) -> list[int]:
        return [item["id"] for item in read(**query)["items"]]

    everything = read()
    assert (everything["total"], everything["limit"], everything["offset"]) == (6, 50, 0)
    assert [i["id"] for i in everything["items"]] == ids[::-1]  # newest first
    first = everything["items"][-1]
    assert first["action"] == "dataset.delete" and first["actor_key_prefix"] == "bit_aliceAAA"
    assert first["address"] == "10.0.0.1" and first["at"].startswith("2025-01-31T12:00:00")
    assert everything["next_before"] is None

    assert item_ids(tenant="globex") == [ids[5], ids[4], ids[2]]
    assert item_ids(action="model.delete") == [ids[2], ids[1]]
    assert item_ids(actor="bit_rootBBBB") == [ids[5], ids[3], ids[2]]
    assert item_ids(tenant="acme", actor="bit_rootBBBB") == [ids[3]]
    hour = dt.timedelta(hours=1)
    window = {"since": (start + hour).isoformat(), "until": (start + 3 * hour).isoformat()}
    assert item_ids(**window) == [ids[2], ids[1]]  # since inclusive, until exclusive
    # The same instant in another zone.
    zoned = (start + 4 * hour).astimezone(dt.timezone(dt.timedelta(hours=5))).isoformat()
    assert item_ids(since=zoned) == [ids[5], ids[4]]
    assert item_ids(tenant="nobody") == []

    # Pages by offset, and by cursor.
    page = read(limit=4, offset=4)
    assert [i["id"] for i in page["items"]] == [ids[1], ids[0]] and page["total"] == 6
    page = read(limit=2)
    assert page["next_before"] == ids[4]
    page = read(limit=2, before=page["next_before"])
    assert [i["id"] for i in page["items"]] == [ids[3], ids[2]]
    page = read(limit=2, before=page["next_before"])
    assert [i["id"] for i in page["items"]] == [ids[1], ids[0]] and page["next_before"] is None


def test_audit_api_refuses_bad_filters_and_user_keys(
    client: TestClient, settings: Settings, keys: Keys
):
    admin, user = bearer(keys.new("admin", "ops")), bearer(keys.new("user", "acme"))
    refused = client.get("/v1/audit", headers=user)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_required"
    assert client.get("/v1/audit").status_code == 401
    bad = {
        "action=model.explode": "unknown_audit_action",
        "since=2025-01-31T12:00:00": "invalid_request",  # no zone: not RFC 3339
        "since=yesterday": "invalid_request",
        "until=-6.4e-275": "invalid_request",  # a number is not a date-time, though pydantic
        "since=1733300000": "invalid_request",  # would read it as a Unix time
        "since=2025-01-31": "invalid_request",  # a date alone
        "since=2025-02-01T00:00:00Z&until=2025-01-31T00:00:00Z": "invalid_time_range",
        "until=0001-01-01T00:00:00%2B05:00": "invalid_time_range",  # before year 1 in UTC
        "limit=201": "invalid_request",
        "limit=0": "invalid_request",
        "offset=-1": "invalid_request",
        "tenant=%00": "invalid_request",
    }
    for query, code in bad.items():
        response = client.get(f"/v1/audit?{query}", headers=admin)
        assert response.status_code == 422, (query, response.text)
        assert response.json()["error"]["code"] == code, (query, response.text)
