"""Dashboard sign-in: admin keys only, signed cookies, CSRF on every POST, security headers."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest
from fastapi.testclient import TestClient
from itsdangerous import TimestampSigner
from sqlalchemy import update

from service.app import create_app
from service.dashboard import SECURITY_HEADERS
from service.dashboard.auth import COOKIE, _secret_for, signing_secret
from service.db.models import ApiKey, Job
from service.db.session import session_scope
from service.settings import Settings
from tests.dashboard.conftest import csrf_of, login_token, sign_in
from tests.service.conftest import make_settings, new_key

PAGES = [
    "/admin",
    "/admin/jobs",
    "/admin/jobs/1",
    "/admin/models",
    "/admin/models/1",
    "/admin/datasets",
    "/admin/datasets/1",
    "/admin/base-models",
    "/admin/audit",
    "/admin/thumbnails/1.jpg",
]


def set_cookie_headers(response) -> list[str]:
    return response.headers.get_list("set-cookie")


def session_cookie_header(response) -> str:
    found = [h for h in set_cookie_headers(response) if h.startswith(f"{COOKIE}=")]
    assert len(found) == 1, set_cookie_headers(response)
    return found[0]


def queued_job(settings: Settings) -> int:
    with session_scope(settings.database_url) as session:
        job = Job(tenant="acme", kind="finetune", status="queued", base_model="R14x0.5")
        session.add(job)
        session.flush()
        return job.id


@pytest.mark.parametrize("path", PAGES)
def test_pages_redirect_to_login_without_a_session(client: TestClient, path: str):
    response = client.get(path, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/admin/login?next=")


def test_the_redirect_remembers_the_page_and_login_returns_to_it(
    client: TestClient, sqlite_settings: Settings
):
    response = client.get("/admin/jobs?status=failed", follow_redirects=False)
    assert response.headers["location"] == "/admin/login?next=/admin/jobs%3Fstatus%3Dfailed"
    page = client.get(response.headers["location"])
    assert 'name="next" value="/admin/jobs?status=failed"' in page.text
    signed_in = sign_in(client, new_key(sqlite_settings, "admin"), "/admin/jobs?status=failed")
    assert signed_in.status_code == 303
    assert signed_in.headers["location"] == "/admin/jobs?status=failed"


def test_the_json_endpoint_answers_401_without_a_session(client: TestClient):
    response = client.get("/admin/api/jobs/1")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"


def test_login_sets_a_signed_httponly_strict_expiring_cookie_holding_the_key_id(
    client: TestClient, sqlite_settings: Settings
):
    key = new_key(sqlite_settings, "admin")
    response = sign_in(client, key)
    assert response.status_code == 303 and response.headers["location"] == "/admin"
    header = session_cookie_header(response)
    flags = [part.strip().lower() for part in header.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/admin" in flags
    assert "max-age=28800" in flags  # 8 hours
    assert "secure" not in flags  # plain http (a local install); https below
    value = header.split(";")[0].split("=", 1)[1]
    assert key not in header and key[:12] not in header
    payload = json.loads(base64.urlsafe_b64decode(value.split(".")[0] + "=="))
    assert set(payload) == {"key_id", "csrf"}
    assert client.get("/admin").status_code == 200


def test_the_cookie_is_secure_over_https(sqlite_settings: Settings):
    with TestClient(create_app(sqlite_settings), base_url="https://testserver") as client:
        response = sign_in(client, new_key(sqlite_settings, "admin"))
        flags = [p.strip().lower() for p in session_cookie_header(response).split(";")]
        assert "secure" in flags


def test_non_admin_and_unknown_keys_are_refused_alike(
    client: TestClient, sqlite_settings: Settings
):
    queued_job(sqlite_settings)
    user = sign_in(client, new_key(sqlite_settings, "user"))
    unknown = sign_in(client, "bit_" + "x" * 43)
    assert user.status_code == unknown.status_code == 401
    assert not [h for h in set_cookie_headers(user) if h.startswith(f"{COOKIE}=")]
    assert "That key cannot open the dashboard" in user.text
    # Nothing tells a user key apart from a wrong one, and nothing about any job shows.
    strip = lambda html: html.replace(login_token(client), "")  # noqa: E731
    assert strip(user.text).count("job") == strip(unknown.text).count("job") == 0
    assert client.get("/admin", follow_redirects=False).status_code == 303


def test_a_revoked_admin_key_is_refused(client: TestClient, sqlite_settings: Settings):
    key = new_key(sqlite_settings, "admin")
    with session_scope(sqlite_settings.database_url) as session:
        session.execute(update(ApiKey).values(revoked=True))
    assert sign_in(client, key).status_code == 401


def test_login_without_its_form_token_is_refused(client: TestClient, sqlite_settings: Settings):
    key = new_key(sqlite_settings, "admin")
    response = client.post("/admin/login", data={"api_key": key}, follow_redirects=False)
    assert response.status_code == 403
    forged = client.post(
        "/admin/login", data={"api_key": key, "login_token": "forged"}, follow_redirects=False
    )
    assert forged.status_code == 403


def test_revoking_or_demoting_the_key_ends_its_sessions(
    client: TestClient, sqlite_settings: Settings
):
    sign_in(client, new_key(sqlite_settings, "admin"))
    assert client.get("/admin").status_code == 200
    with session_scope(sqlite_settings.database_url) as session:
        session.execute(update(ApiKey).values(role="user"))
    assert client.get("/admin", follow_redirects=False).status_code == 303


def test_a_tampered_or_expired_cookie_is_refused(
    client: TestClient, sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch
):
    value = session_cookie_header(sign_in(client, new_key(sqlite_settings, "admin")))
    value = value.split(";")[0].split("=", 1)[1]
    client.cookies.clear()
    _, rest = value.split(".", 1)  # keep the signature, change what it signs
    forged = base64.urlsafe_b64encode(b'{"key_id":2,"csrf":"x"}').decode().rstrip("=")
    client.cookies.set(COOKIE, f"{forged}.{rest}", path="/admin")
    assert client.get("/admin", follow_redirects=False).status_code == 303

    client.cookies.clear()
    real = TimestampSigner.get_timestamp
    with monkeypatch.context() as patched:  # a cookie signed 8 h + 1 s ago
        patched.setattr(TimestampSigner, "get_timestamp", lambda self: real(self) - 8 * 3600 - 1)
        sign_in(client, new_key(sqlite_settings, "admin"))
    assert client.get("/admin", follow_redirects=False).status_code == 303


def test_posts_need_the_session_csrf_token(client: TestClient, sqlite_settings: Settings):
    job_id = queued_job(sqlite_settings)
    anonymous = client.post(f"/admin/jobs/{job_id}/cancel", follow_redirects=False)
    assert anonymous.status_code == 303  # no session: to the login page, nothing done
    sign_in(client, new_key(sqlite_settings, "admin"))
    token = csrf_of(client.get(f"/admin/jobs/{job_id}").text)
    for data in ({}, {"csrf_token": "forged"}):
        refused = client.post(f"/admin/jobs/{job_id}/cancel", data=data, follow_redirects=False)
        assert refused.status_code == 403 and "security token" in refused.text
    with session_scope(sqlite_settings.database_url) as session:
        assert session.get(Job, job_id).status == "queued"  # type: ignore[union-attr]
    done = client.post(
        f"/admin/jobs/{job_id}/cancel", data={"csrf_token": token}, follow_redirects=False
    )
    assert done.status_code == 303
    with session_scope(sqlite_settings.database_url) as session:
        assert session.get(Job, job_id).status == "cancelled"  # type: ignore[union-attr]


def test_logout_needs_the_token_and_ends_the_session(client: TestClient, sqlite_settings: Settings):
    sign_in(client, new_key(sqlite_settings, "admin"))
    token = csrf_of(client.get("/admin").text)
    assert client.post("/admin/logout", follow_redirects=False).status_code == 403
    response = client.post("/admin/logout", data={"csrf_token": token}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/admin/login"
    assert any(h.startswith(f'{COOKIE}=""') for h in set_cookie_headers(response))
    assert client.get("/admin", follow_redirects=False).status_code == 303


@pytest.mark.parametrize(
    "target", ["https://evil.example/", "//evil.example/admin", "/v1/jobs", "/admin/login"]
)
def test_login_never_redirects_off_the_dashboard(
    client: TestClient, sqlite_settings: Settings, target: str
):
    response = sign_in(client, new_key(sqlite_settings, "admin"), target)
    assert response.headers["location"] == "/admin"


def test_the_session_secret_is_made_once_private_and_kept(tmp_path):
    _secret_for.cache_clear()
    settings = make_settings(tmp_path)
    secret = signing_secret(settings)
    path = tmp_path / "session_secret"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(secret) >= 32 and path.read_text() == secret
    _secret_for.cache_clear()  # as a restarted API process
    assert signing_secret(make_settings(tmp_path)) == secret
    configured = make_settings(tmp_path / "other", session_secret="s" * 40)
    assert signing_secret(configured) == "s" * 40
    assert not (tmp_path / "other" / "session_secret").exists()


def test_sessions_survive_an_api_restart(sqlite_settings: Settings):
    with TestClient(create_app(sqlite_settings)) as first:
        sign_in(first, new_key(sqlite_settings, "admin"))
        cookies = dict(first.cookies)
    _secret_for.cache_clear()
    with TestClient(create_app(sqlite_settings), cookies=cookies) as second:
        assert second.get("/admin", follow_redirects=False).status_code == 200


def test_every_dashboard_response_carries_the_security_headers(
    client: TestClient, sqlite_settings: Settings
):
    responses = [
        client.get("/admin/login"),
        client.get("/admin", follow_redirects=False),
        client.get("/admin/static/dashboard.css"),
        client.get("/admin/api/jobs/1"),
    ]
    sign_in(client, new_key(sqlite_settings, "admin"))
    responses += [client.get("/admin"), client.get("/admin/jobs/999")]
    assert [r.status_code for r in responses] == [200, 303, 200, 401, 200, 404]
    for response in responses:
        for name, value in SECURITY_HEADERS.items():
            assert response.headers.get(name) == value, (response.url, name)
    csp = SECURITY_HEADERS["Content-Security-Policy"]
    assert "unsafe-inline" not in csp and "script-src 'self'" in csp
    page = client.get("/admin").text
    assert "<script>" not in page and " style=" not in page  # nothing inline to allow
    assert "Content-Security-Policy" not in client.get("/healthz").headers
