"""API keys as a product: POST/GET/DELETE /v1/keys and `bit admin` share one set of rules;
scopes limit what a key may do, an expiry ends it, revoking takes effect at once here, and
each create and revoke is audited."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Iterator
from typing import Any, get_args

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from service import cli
from service.app import create_app
from service.auth import DEFAULT_SCOPES, SCOPES, USER_SCOPES, create_key, hash_key
from service.db.models import ApiKey, AuditEvent, Dataset
from service.db.session import session_scope
from service.key_schemas import ScopeName
from service.settings import Settings, get_settings
from tests.dashboard.conftest import sign_in
from tests.polling import wait_for
from tests.service.conftest import error_of, new_key

KEY_FIELDS = {
    "prefix",
    "tenant",
    "role",
    "scopes",
    "name",
    "created_at",
    "expires_at",
    "expired",
    "last_used_at",
    "revoked",
}


@pytest.fixture
def remembering(settings: Settings) -> Settings:
    """A lookup cache far longer than any test: what works at once cannot be the cache
    expiring."""
    return settings.model_copy(update={"lookup_cache_s": 600.0})


@pytest.fixture
def api(remembering: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(remembering)) as test_client:
        yield test_client


@pytest.fixture
def admin(remembering: Settings) -> dict[str, str]:
    return bearer(new_key(remembering, "admin", "ops"))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def audit_rows(settings: Settings, action: str) -> list[dict[str, Any]]:
    with session_scope(settings.database_url) as session:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)
        ).all()
        return [
            {
                "tenant": row.tenant,
                "actor_tenant": row.actor_tenant,
                "actor_key_prefix": row.actor_key_prefix,
                "address": row.address,
                "target": row.target,
                "detail": row.detail,
            }
            for row in rows
        ]


def key_count(settings: Settings) -> int:
    with session_scope(settings.database_url) as session:
        return session.scalar(select(func.count()).select_from(ApiKey)) or 0


def expire_now(settings: Settings, prefix: str) -> None:
    """Move a key's expiry into the past, as time passing would."""
    with session_scope(settings.database_url) as session:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        session.execute(update(ApiKey).where(ApiKey.prefix == prefix).values(expires_at=past))


def test_the_schemas_scopes_are_the_services() -> None:
    assert get_args(ScopeName) == SCOPES
    assert DEFAULT_SCOPES == {"user": USER_SCOPES, "admin": SCOPES}


# --- create ----------------------------------------------------------------------------------


def test_a_new_key_is_shown_once_holds_its_scopes_and_works_only_for_them(
    api: TestClient, admin: dict[str, str], remembering: Settings
) -> None:
    before = dt.datetime.now(dt.UTC)
    response = api.post(
        "/v1/keys",
        json={
            "tenant": "acme",
            "scopes": ["jobs:read", "predict", "jobs:read"],
            "name": "mobile app",
            "expires_in_s": 3600,
        },
        headers=admin,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    key = body.pop("key")
    assert key.startswith("bit_") and len(key) > 40
    assert set(body) == KEY_FIELDS
    assert body["prefix"] == key[:12]
    assert (body["tenant"], body["role"], body["name"]) == ("acme", "user", "mobile app")
    assert body["scopes"] == ["predict", "jobs:read"]  # deduplicated, in SCOPES order
    expires = dt.datetime.fromisoformat(body["expires_at"])
    assert dt.timedelta(seconds=3599) <= expires - before <= dt.timedelta(seconds=3660)
    assert (body["expired"], body["revoked"], body["last_used_at"]) == (False, False, None)
    with session_scope(remembering.database_url) as session:
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == key[:12]))
        assert row is not None and row.key_hash == hash_key(key)  # stored hashed only
        assert key not in json.dumps([row.prefix, row.key_hash, row.name, row.scopes])
    # Its scopes open their routes; every other route answers 403 naming the missing scope.
    headers = bearer(key)
    assert api.get("/v1/jobs", headers=headers).status_code == 200
    assert error_of(api.post("/v1/predict", json={}, headers=headers))[0] != 403
    for method, path, scope in (
        ("GET", "/v1/datasets", "datasets:read"),
        ("POST", "/v1/jobs/1/cancel", "jobs:write"),
        ("GET", "/v1/models", "models:read"),
        ("GET", "/v1/keys", "admin"),
    ):
        response = api.request(method, path, headers=headers)
        expected = "admin_required" if scope == "admin" else "insufficient_scope"
        assert error_of(response)[:2] == (403, expected), path
        if scope != "admin":
            assert response.json()["error"]["scope"] == scope
            assert "POST /v1/keys" in response.json()["error"]["message"]


def test_a_key_without_scopes_gets_its_roles(api: TestClient, admin: dict[str, str]) -> None:
    for role, scopes in (("user", USER_SCOPES), ("admin", SCOPES)):
        body = api.post("/v1/keys", json={"tenant": "acme", "role": role}, headers=admin).json()
        assert (body["role"], body["scopes"], body["expires_at"]) == (role, list(scopes), None)


def test_the_finetune_upload_needs_both_job_and_dataset_writes(
    api: TestClient, admin: dict[str, str]
) -> None:
    def key_with(*scopes: str) -> dict[str, str]:
        body = {"tenant": "acme", "scopes": list(scopes)}
        return bearer(api.post("/v1/keys", json=body, headers=admin).json()["key"])

    for scopes, missing in ((["jobs:write"], "datasets:write"), (["datasets:write"], "jobs:write")):
        response = api.post("/v1/finetune/upload", headers=key_with(*scopes))
        assert error_of(response)[:2] == (403, "insufficient_scope"), scopes
        assert response.json()["error"]["scope"] == missing
    both = api.post("/v1/finetune/upload", headers=key_with("jobs:write", "datasets:write"))
    assert error_of(both)[:2] == (422, "invalid_request")  # past the scopes, to the form


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"tenant": "acme", "role": "root"}, "invalid_request"),
        ({"tenant": ""}, "invalid_request"),
        ({"tenant": "a" * 65}, "invalid_request"),
        ({"tenant": "ac\nme"}, "invalid_request"),
        ({"tenant": "ac\u2028me"}, "invalid_tenant"),  # printable to the pattern, not to the rule
        ({"tenant": "acme", "scopes": []}, "invalid_request"),
        ({"tenant": "acme", "scopes": ["predict", "everything"]}, "invalid_request"),
        ({"tenant": "acme", "scopes": ["predict", "admin"]}, "invalid_scopes"),
        ({"tenant": "acme", "role": "admin", "scopes": ["predict"]}, "invalid_scopes"),
        ({"tenant": "acme", "name": "n" * 129}, "invalid_request"),
        ({"tenant": "acme", "expires_in_s": 0}, "invalid_request"),
        ({"tenant": "acme", "expires_in_s": 10**12}, "invalid_request"),
        ({"tenant": "acme", "expires_at": "2020-01-01T00:00:00Z"}, "invalid_expiry"),
        ({"tenant": "acme", "expires_at": "2999-01-01T00:00:00"}, "invalid_request"),  # no zone
        (
            {"tenant": "acme", "expires_in_s": 60, "expires_at": "2999-01-01T00:00:00Z"},
            "invalid_expiry",
        ),
        ({"tenant": "acme", "expires_in": 60}, "invalid_request"),  # misspelt: not ignored
    ],
)
def test_a_key_that_breaks_a_rule_is_refused_and_nothing_is_kept(
    api: TestClient, admin: dict[str, str], remembering: Settings, body: dict, code: str
) -> None:
    keys, audited = key_count(remembering), len(audit_rows(remembering, "key.create"))
    response = api.post("/v1/keys", json=body, headers=admin)
    assert error_of(response)[:2] == (422, code), response.text
    assert key_count(remembering) == keys
    assert len(audit_rows(remembering, "key.create")) == audited


# --- expiry and last use ---------------------------------------------------------------------


def test_an_expired_key_is_refused_on_every_request_though_it_is_remembered(
    api: TestClient, admin: dict[str, str]
) -> None:
    created = api.post("/v1/keys", json={"tenant": "acme", "expires_in_s": 2}, headers=admin)
    headers = bearer(created.json()["key"])
    # Its principal is remembered from the first request (BIT_LOOKUP_CACHE_S is long here):
    # the expiry is checked on each request all the same.
    assert api.get("/v1/datasets", headers=headers).status_code == 200
    wait_for(lambda: api.get("/v1/datasets", headers=headers).status_code == 401, 10, "expiry")
    status, code, message = error_of(api.get("/v1/datasets", headers=headers))
    assert (status, code) == (401, "expired_api_key")
    assert "create a new key" in message
    listed = api.get("/v1/keys", params={"tenant": "acme"}, headers=admin).json()["items"]
    assert listed[0]["prefix"] == created.json()["prefix"] and listed[0]["expired"] is True


def test_an_expired_admin_key_cannot_open_the_dashboard_nor_keep_its_session(
    api: TestClient, remembering: Settings
) -> None:
    key = new_key(remembering, "admin", "ops")
    assert sign_in(api, key).status_code == 303
    assert api.get("/admin", follow_redirects=False).status_code == 200
    expire_now(remembering, key[:12])
    assert api.get("/admin", follow_redirects=False).status_code == 303  # back to login
    assert sign_in(api, key).status_code == 401  # the form again, with its error
    assert api.get("/admin", follow_redirects=False).status_code == 303


def test_admin_needs_the_role_and_the_scope_together(
    api: TestClient, remembering: Settings
) -> None:
    with session_scope(remembering.database_url) as session:
        user = create_key(session, role="user", tenant="ops")
        # Rows edited by hand: the admin role without the scope, the scope without the role.
        no_scope = create_key(session, role="admin", tenant="ops")
        no_role = create_key(session, role="user", tenant="ops")
        for key, scopes in ((no_scope, "predict datasets:read"), (no_role, "admin datasets:read")):
            session.execute(update(ApiKey).where(ApiKey.prefix == key[:12]).values(scopes=scopes))
        session.add(Dataset(tenant="globex", name="theirs"))
    for refused in (user, no_scope, no_role):
        assert sign_in(api, refused).status_code == 401  # the login form, with its error
        assert api.get("/admin", follow_redirects=False).status_code == 303
        response = api.get("/v1/keys", headers=bearer(refused))
        assert error_of(response)[:2] == (403, "admin_required")
    # Neither reaches another tenant's data: both are held to their own tenant.
    admin = bearer(new_key(remembering, "admin", "ops"))
    assert api.get("/v1/datasets", headers=admin).json()["total"] == 1
    for key in (no_scope, no_role):
        response = api.get("/v1/datasets", headers=bearer(key))
        assert response.status_code == 200 and response.json()["total"] == 0


def test_last_use_is_shown(api: TestClient, admin: dict[str, str]) -> None:
    key = api.post("/v1/keys", json={"tenant": "acme"}, headers=admin).json()["key"]

    def listed() -> dict:
        items = api.get("/v1/keys", params={"tenant": "acme"}, headers=admin).json()["items"]
        return next(item for item in items if item["prefix"] == key[:12])

    assert listed()["last_used_at"] is None
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    assert api.get("/v1/models", headers=bearer(key)).status_code == 200
    used = dt.datetime.fromisoformat(listed()["last_used_at"])
    assert before <= used <= dt.datetime.now(dt.UTC)


# --- list --------------------------------------------------------------------------------------


def test_the_list_is_newest_first_paged_filtered_and_never_shows_a_secret(
    api: TestClient, admin: dict[str, str], remembering: Settings
) -> None:
    made = [
        api.post("/v1/keys", json={"tenant": tenant, "name": f"k{i}"}, headers=admin).json()
        for i, tenant in enumerate(["acme", "acme", "globex", "acme"])
    ]
    page = api.get("/v1/keys", params={"tenant": "acme", "limit": 2}, headers=admin).json()
    assert (page["total"], page["limit"], page["offset"]) == (3, 2, 0)
    assert [item["name"] for item in page["items"]] == ["k3", "k1"]
    rest = api.get("/v1/keys", params={"tenant": "acme", "offset": 2}, headers=admin).json()
    assert [item["name"] for item in rest["items"]] == ["k0"]
    everything = api.get("/v1/keys", params={"limit": 200}, headers=admin)
    assert everything.json()["total"] == 5  # the admin's own key too
    assert all(set(item) == KEY_FIELDS for item in everything.json()["items"])
    with session_scope(remembering.database_url) as session:
        hashes = list(session.scalars(select(ApiKey.key_hash)))
    for secret in [item["key"][4:] for item in made] + hashes:
        assert secret not in everything.text


# --- revoke ----------------------------------------------------------------------------------


def test_revoking_takes_effect_at_once_in_this_process(
    api: TestClient, admin: dict[str, str], remembering: Settings
) -> None:
    key = api.post("/v1/keys", json={"tenant": "acme"}, headers=admin).json()["key"]
    assert api.get("/v1/datasets", headers=bearer(key)).status_code == 200  # now remembered
    assert api.delete(f"/v1/keys/{key[:12]}", headers=admin).status_code == 204
    assert error_of(api.get("/v1/datasets", headers=bearer(key)))[:2] == (401, "invalid_api_key")
    again = api.delete(f"/v1/keys/{key[:12]}", headers=admin)
    assert error_of(again)[:2] == (404, "key_not_found")
    assert "GET /v1/keys" in error_of(again)[2]
    for wrong in (key[:11], key):  # a short prefix, and a whole key (never in a URL)
        assert error_of(api.delete(f"/v1/keys/{wrong}", headers=admin))[:2] == (
            422,
            "invalid_request",
        )
    listed = api.get("/v1/keys", params={"tenant": "acme"}, headers=admin).json()["items"]
    assert [item["revoked"] for item in listed] == [True]


def test_user_keys_cannot_manage_keys(api: TestClient, remembering: Settings) -> None:
    user = bearer(new_key(remembering, "user", "acme"))
    keys = key_count(remembering)
    for method, path in (
        ("POST", "/v1/keys"),
        ("GET", "/v1/keys"),
        ("DELETE", "/v1/keys/bit_abcdefgh"),
    ):
        response = api.request(method, path, headers=user)
        assert error_of(response)[:2] == (403, "admin_required"), path
    body = {"tenant": "acme", "role": "admin"}
    assert api.post("/v1/keys", json=body, headers=user).status_code == 403
    assert key_count(remembering) == keys


# --- audit -----------------------------------------------------------------------------------


def test_each_create_and_revoke_is_audited_without_a_secret(
    api: TestClient, admin: dict[str, str], remembering: Settings
) -> None:
    cli_made = len(audit_rows(remembering, "key.create"))  # the admin key's own, by new_key
    created = api.post(
        "/v1/keys",
        json={"tenant": "acme", "scopes": ["predict"], "name": "kiosk", "expires_in_s": 600},
        headers=admin,
    ).json()
    assert api.delete(f"/v1/keys/{created['prefix']}", headers=admin).status_code == 204
    admin_prefix = admin["Authorization"].split()[1][:12]
    detail = {
        "role": "user",
        "scopes": ["predict"],
        "name": "kiosk",
        "expires_at": dt.datetime.fromisoformat(created["expires_at"]).isoformat(),
    }
    expected = {
        "tenant": "acme",
        "actor_tenant": "ops",
        "actor_key_prefix": admin_prefix,
        "address": "testclient",
        "target": f"key {created['prefix']}",
        "detail": detail,
    }
    assert audit_rows(remembering, "key.create")[cli_made:] == [expected]
    assert audit_rows(remembering, "key.revoke") == [expected]
    # A refused request writes nothing.
    api.post("/v1/keys", json={"tenant": "acme", "scopes": ["admin"]}, headers=admin)
    api.delete("/v1/keys/bit_00000000", headers=admin)
    assert len(audit_rows(remembering, "key.create")) == cli_made + 1
    assert len(audit_rows(remembering, "key.revoke")) == 1
    everything = json.dumps(
        audit_rows(remembering, "key.create") + audit_rows(remembering, "key.revoke")
    )
    assert created["key"][4:] not in everything


# --- the CLI: the same rules -----------------------------------------------------------------


@pytest.fixture
def cli_settings(sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    monkeypatch.setenv("BIT_HOME", str(sqlite_settings.home))
    monkeypatch.setenv("BIT_DATABASE_URL", sqlite_settings.database_url)
    get_settings.cache_clear()
    yield sqlite_settings
    get_settings.cache_clear()


def test_the_cli_creates_scoped_expiring_keys_and_lists_them(
    cli_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["admin", "create-key", "--tenant", "acme", "--scopes", "predict, jobs:read"]
    assert cli.main([*argv, "--expires-in", "30d", "--name", "phone"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert "scopes predict,jobs:read" in err and "shown once" in err
    with TestClient(create_app(cli_settings)) as client:
        assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200
        denied = client.get("/v1/datasets", headers=bearer(key))
        assert error_of(denied)[:2] == (403, "insufficient_scope")
    assert cli.main(["admin", "list-keys"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.split()[:6] == [key[:12], "user", "acme", "active", "scopes", "predict,jobs:read"]
    until = dt.datetime.fromisoformat(line.split()[7])
    assert abs(until - dt.datetime.now(dt.UTC) - dt.timedelta(days=30)) < dt.timedelta(minutes=1)
    assert line.endswith("phone") and key[12:] not in line
    expire_now(cli_settings, key[:12])
    assert cli.main(["admin", "list-keys"]) == 0
    assert capsys.readouterr().out.split()[3] == "expired"
    assert audit_rows(cli_settings, "key.create")[0]["actor_key_prefix"] is None  # the CLI


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scopes", "predict,admin"], "may not hold the 'admin' scope"),
        (["--role", "admin", "--scopes", "predict"], "must hold the 'admin' scope"),
        (["--scopes", "predict,everything"], "unknown scope(s) ['everything']"),
        (["--scopes", ","], "at least one scope"),
        (["--expires-in", "0s"], "from 1 second to"),
        (["--tenant", "a" * 65], "1 to 64 printable characters"),
    ],
)
def test_the_cli_refuses_what_the_api_refuses(
    cli_settings: Settings, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert cli.main(["admin", "create-key", *args]) == 2
    assert message in capsys.readouterr().err
    assert key_count(cli_settings) == 0


def test_the_cli_reads_durations(cli_settings: Settings) -> None:
    assert [cli.duration_s(text) for text in ("90s", "15m", "12h", "30d", "2D")] == [
        90,
        900,
        43200,
        2592000,
        172800,
    ]
    for bad in ("30", "d", "-1d", "1.5h", "30 days", "1w"):
        with pytest.raises(argparse.ArgumentTypeError, match="a duration is a whole number"):
            cli.duration_s(bad)
    with pytest.raises(SystemExit):
        cli.main(["admin", "create-key", "--expires-in", "soon"])
    assert key_count(cli_settings) == 0
