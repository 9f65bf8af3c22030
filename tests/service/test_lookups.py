"""Remembered lookups (service/lookups.py): what a predict skips, and how long a change made
elsewhere may take to be seen here; on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, update

from service import cli
from service.app import create_app
from service.auth import authenticate
from service.db.models import ApiKey, Model
from service.db.session import get_engine, session_scope
from service.lookups import Lookups, TtlCache
from service.settings import Settings, get_settings
from tests.service.conftest import error_of, new_key, predict_files, register_model, uploads


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the cache itself ------------------------------------------------------------------------


def test_entries_expire_after_the_ttl():
    clock = FakeClock()
    cache: TtlCache[str, int] = TtlCache(1.0, clock=clock)
    cache.put("a", 1)
    clock.now += 0.999
    assert cache.get("a") == 1
    clock.now += 0.001
    assert cache.get("a") is None and len(cache) == 0


def test_the_oldest_entry_makes_room_and_a_put_renews_an_entry():
    clock = FakeClock()
    cache: TtlCache[str, int] = TtlCache(10.0, max_entries=2, clock=clock)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 3)  # renewed: now the newest
    cache.put("c", 4)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (3, None, 4)
    cache.forget("a")
    assert cache.get("a") is None


def test_a_zero_ttl_remembers_nothing():
    cache: TtlCache[str, int] = TtlCache(0.0)
    cache.put("a", 1)
    assert cache.get("a") is None and len(cache) == 0


# --- through the app -------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app_client(settings: Settings, clock: FakeClock) -> Iterator[TestClient]:
    settings.device = "cpu"
    app = create_app(settings)
    app.state.lookups = Lookups(settings, clock=clock)
    with TestClient(app) as test_client:
        yield test_client


def statements_of(settings: Settings) -> list[str]:
    """Every SQL statement the app's engine runs from now on."""
    seen: list[str] = []
    event.listen(
        get_engine(settings.database_url),
        "before_cursor_execute",
        lambda _conn, _cursor, statement, *_: seen.append(statement),
    )
    return seen


def test_a_repeated_predict_asks_the_database_nothing(
    app_client: TestClient, settings: Settings, user_headers, template: Path
):
    model_id = register_model(settings, template)
    assert predict_files(app_client, user_headers, model_id, uploads(1)).status_code == 200
    seen = statements_of(settings)
    response = predict_files(app_client, user_headers, model_id, uploads(1))
    assert response.status_code == 200, response.text
    assert seen == []


def test_a_key_revoked_elsewhere_is_refused_once_its_lookup_expires(
    app_client: TestClient, settings: Settings, clock: FakeClock, template: Path
):
    key = new_key(settings)
    headers = {"Authorization": f"Bearer {key}"}
    model_id = register_model(settings, template)
    assert predict_files(app_client, headers, model_id, uploads(1)).status_code == 200
    with session_scope(settings.database_url) as session:  # as `bit admin revoke-key` does
        session.execute(update(ApiKey).values(revoked=True))

    clock.now += settings.lookup_cache_s * 0.5
    assert predict_files(app_client, headers, model_id, uploads(1)).status_code == 200
    clock.now += settings.lookup_cache_s * 0.5
    response = predict_files(app_client, headers, model_id, uploads(1))
    assert error_of(response)[:2] == (401, "invalid_api_key")
    assert error_of(app_client.get("/v1/models", headers=headers))[:2] == (401, "invalid_api_key")


def test_without_the_cache_a_revoked_key_is_refused_at_once(settings: Settings, template: Path):
    settings.lookup_cache_s = 0
    settings.device = "cpu"
    key = new_key(settings)
    headers = {"Authorization": f"Bearer {key}"}
    model_id = register_model(settings, template)
    with TestClient(create_app(settings)) as client:
        assert predict_files(client, headers, model_id, uploads(1)).status_code == 200
        with session_scope(settings.database_url) as session:
            session.execute(update(ApiKey).values(revoked=True))
        response = predict_files(client, headers, model_id, uploads(1))
        assert error_of(response)[:2] == (401, "invalid_api_key")


def test_a_model_archived_elsewhere_is_refused_once_its_lookup_expires(
    app_client: TestClient, settings: Settings, clock: FakeClock, user_headers, template: Path
):
    model_id = register_model(settings, template)
    assert predict_files(app_client, user_headers, model_id, uploads(1)).status_code == 200
    with session_scope(settings.database_url) as session:  # another API process archived it
        session.execute(update(Model).values(status="archived"))
    clock.now += settings.lookup_cache_s
    response = predict_files(app_client, user_headers, model_id, uploads(1))
    assert error_of(response)[:2] == (409, "model_archived")


def test_archiving_here_is_seen_by_the_next_predict(
    app_client: TestClient, settings: Settings, user_headers, template: Path
):
    model_id = register_model(settings, template)
    assert predict_files(app_client, user_headers, model_id, uploads(1)).status_code == 200
    assert app_client.post(f"/v1/models/{model_id}/archive", headers=user_headers).is_success
    response = predict_files(app_client, user_headers, model_id, uploads(1))
    assert error_of(response)[:2] == (409, "model_archived")  # no clock change needed


def test_a_remembered_model_is_still_hidden_from_other_tenants(
    app_client: TestClient, settings: Settings, user_headers, other_tenant_headers, template: Path
):
    model_id = register_model(settings, template, tenant="acme")
    assert predict_files(app_client, user_headers, model_id, uploads(1)).status_code == 200
    response = predict_files(app_client, other_tenant_headers, model_id, uploads(1))
    assert error_of(response)[:2] == (404, "model_not_found")


def test_a_failed_lookup_is_not_remembered(
    app_client: TestClient, settings: Settings, user_headers, template: Path
):
    response = predict_files(app_client, user_headers, 1, uploads(1))
    assert error_of(response)[:2] == (404, "model_not_found")
    assert register_model(settings, template) == 1
    assert predict_files(app_client, user_headers, 1, uploads(1)).status_code == 200
    bad = {"Authorization": "Bearer bit_not-a-key"}
    for _ in range(2):  # each time asked, never remembered
        assert error_of(app_client.get("/v1/models", headers=bad))[:2] == (401, "invalid_api_key")


# --- bit admin revoke-key / list-keys --------------------------------------------------------


@pytest.fixture
def cli_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    monkeypatch.setenv("BIT_HOME", str(settings.home))
    monkeypatch.setenv("BIT_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()


def test_revoke_key_by_prefix_and_list_keys(
    cli_settings: Settings, capsys: pytest.CaptureFixture[str]
):
    revoked, kept = new_key(cli_settings, tenant="acme"), new_key(cli_settings, tenant="globex")
    assert cli.main(["admin", "revoke-key", revoked[:12]]) == 0
    assert "revoked 1 key(s)" in capsys.readouterr().out
    with session_scope(cli_settings.database_url) as session:
        assert authenticate(session, revoked) is None
        assert authenticate(session, kept) is not None
    assert cli.main(["admin", "list-keys"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in listing] == [
        [revoked[:12], "user", "acme", "revoked"],
        [kept[:12], "user", "globex", "active"],
    ]
    assert revoked not in "".join(listing)  # prefixes only, never a whole key


def test_revoke_key_says_what_was_wrong(cli_settings: Settings, capsys: pytest.CaptureFixture[str]):
    key = new_key(cli_settings)
    assert cli.main(["admin", "revoke-key", key[:6]]) == 2
    assert "at least the first 12 characters" in capsys.readouterr().err
    assert cli.main(["admin", "revoke-key", "bit_XXXXXXXX"]) == 1
    assert "no unrevoked key starts with 'bit_XXXXXXXX'" in capsys.readouterr().err
    assert cli.main(["admin", "revoke-key", key]) == 0  # the whole key works too
    assert cli.main(["admin", "revoke-key", key]) == 1  # already revoked
