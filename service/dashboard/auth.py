"""Dashboard sessions: an admin API key, pasted once, becomes a signed session cookie.

The cookie holds the key's id and a per-session CSRF token, signed with itsdangerous and
timestamped (never the key itself). Every request re-reads the key row, so revoking the key,
its expiry, or demoting it ends its sessions at once. Forms carry the CSRF token; a POST
without it is refused with 403 before anything runs.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy.orm import Session
from starlette.responses import Response

from service.auth import Principal, principal_of
from service.db.models import ApiKey
from service.deps import SessionDep, SettingsDep
from service.settings import Settings

COOKIE = "bit_admin"
LOGIN_COOKIE = "bit_admin_login"  # the login form's own CSRF token, before any session
FLASH_COOKIE = "bit_admin_flash"
COOKIE_PATH = "/admin"
SESSION_S = 8 * 3600  # an operator's working day; then the key is asked for again
LOGIN_FORM_S = 3600
SECRET_FILE = "session_secret"


class LoginRequired(Exception):
    """No valid session: pages redirect to the login page, the JSON API answers 401."""

    def __init__(self, next_path: str, *, api: bool = False) -> None:
        super().__init__(next_path)
        self.next_path = next_path
        self.api = api


class CsrfError(Exception):
    """A POST without the session's CSRF token (answered 403)."""


@dataclass(frozen=True)
class AdminSession:
    """A signed-in operator: the admin principal and the session's CSRF token."""

    principal: Principal
    csrf: str


# --- the signing secret ---------------------------------------------------------------------


def _stored_secret(home: Path) -> str:
    """Read `$BIT_HOME/session_secret`, creating it (0600) on first use.

    Published with an exclusive link, so API processes starting together agree on one
    secret and none reads a half-written file.
    """
    path = home / SECRET_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=home, prefix=".session_secret.")
        try:
            os.fchmod(handle, 0o600)
            os.write(handle, secrets.token_urlsafe(48).encode())
            os.fsync(handle)
            os.close(handle)
            # Another process may have won the race: then its secret is the one used.
            with contextlib.suppress(FileExistsError):
                os.link(temp, path)
        finally:
            os.unlink(temp)
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise RuntimeError(
            f"{path} holds a secret shorter than 32 characters; delete the file (a new one is "
            "made, signing everyone out) or set BIT_SESSION_SECRET"
        )
    return secret


@lru_cache(maxsize=8)
def _secret_for(configured: str, home: str) -> str:
    return configured or _stored_secret(Path(home))


def signing_secret(settings: Settings) -> str:
    """BIT_SESSION_SECRET, or the one kept under $BIT_HOME (so restarts keep sessions)."""
    return _secret_for(settings.session_secret, str(settings.home.resolve()))


def _serializer(settings: Settings, purpose: str) -> URLSafeTimedSerializer:
    # One salt per purpose: a login-form token can never pass as a session, or the reverse.
    return URLSafeTimedSerializer(signing_secret(settings), salt=f"bit-admin-{purpose}")


# --- cookies ---------------------------------------------------------------------------------


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def _delete_cookie(response: Response, name: str) -> None:
    response.delete_cookie(name, path=COOKIE_PATH, httponly=True, samesite="strict")


def start_session(
    request: Request, response: Response, settings: Settings, principal: Principal
) -> None:
    """Sign the key's id and a fresh CSRF token into the session cookie."""
    token = _serializer(settings, "session").dumps(
        {"key_id": principal.key_id, "csrf": secrets.token_urlsafe(32)}
    )
    _set_cookie(request, response, COOKIE, token, SESSION_S)
    _delete_cookie(response, LOGIN_COOKIE)


def end_session(response: Response) -> None:
    """Drop the cookie. The signed value stays valid until it expires should someone have
    copied it; revoking or demoting the key (its api_keys row) ends all its sessions at once."""
    _delete_cookie(response, COOKIE)


def read_session(request: Request, session: Session, settings: Settings) -> AdminSession | None:
    """The session of this request if its cookie is valid and its key is still an admin's."""
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        return None
    try:
        data = _serializer(settings, "session").loads(cookie, max_age=SESSION_S)
        key_id, csrf = int(data["key_id"]), str(data["csrf"])
    except (BadSignature, KeyError, TypeError, ValueError):
        return None
    row = session.get(ApiKey, key_id)
    if row is None or row.revoked or not opens_dashboard(principal_of(row)):
        return None
    # With this request's address: the actions the operator takes are audited with it.
    return AdminSession(replace(principal_of(row), address=client_address(request)), csrf)


def opens_dashboard(principal: Principal) -> bool:
    """Whether a key may open the dashboard: an admin's (the `admin` scope), not expired."""
    return principal.is_admin and not principal.expired()


def client_address(request: Request) -> str | None:
    """The address the request came from (as the server saw it), for the audit log."""
    return request.client.host if request.client else None


def login_token(request: Request, settings: Settings) -> tuple[str, bool]:
    """The login form's CSRF token (double submit: the same value in a cookie and the form),
    and whether it is new and must be set as the login cookie."""
    serializer = _serializer(settings, "login")
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    try:
        serializer.loads(cookie, max_age=LOGIN_FORM_S)
    except BadSignature:
        return serializer.dumps(secrets.token_urlsafe(32)), True
    return cookie, False


def set_login_cookie(request: Request, response: Response, token: str) -> None:
    _set_cookie(request, response, LOGIN_COOKIE, token, LOGIN_FORM_S)


def check_login_token(request: Request, settings: Settings, submitted: str) -> None:
    """The submitted login token must be the signed one in the login cookie."""
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    try:
        _serializer(settings, "login").loads(cookie, max_age=LOGIN_FORM_S)
    except BadSignature as exc:
        raise CsrfError("the login form expired; reload the page and sign in again") from exc
    if not hmac.compare_digest(cookie.encode(), submitted.encode()):
        raise CsrfError("the login form expired; reload the page and sign in again")


def check_csrf(admin: AdminSession, submitted: str | None) -> None:
    """403 unless the form carries this session's CSRF token."""
    if not submitted or not hmac.compare_digest(admin.csrf.encode(), submitted.encode()):
        raise CsrfError("the form is missing its security token; reload the page and try again")


def set_flash(request: Request, response: Response, settings: Settings, message: str) -> None:
    """A one-time notice for the next page (signed, so no one can put words in our mouth)."""
    _set_cookie(request, response, FLASH_COOKIE, _serializer(settings, "flash").dumps(message), 60)


def read_flash(request: Request, settings: Settings) -> str | None:
    """The notice left for this page, if any (the caller clears it with `clear_flash`)."""
    cookie = request.cookies.get(FLASH_COOKIE)
    if not cookie:
        return None
    try:
        return str(_serializer(settings, "flash").loads(cookie, max_age=60))
    except BadSignature:
        return None


def clear_flash(response: Response) -> None:
    _delete_cookie(response, FLASH_COOKIE)


# --- dependencies ----------------------------------------------------------------------------


def safe_next(path: str | None) -> str:
    """Only a dashboard path is a valid place to return to (no open redirect)."""
    if (
        path
        and (path == "/admin" or path.startswith(("/admin/", "/admin?")))
        and not path.startswith("/admin/login")
        and "//" not in path
        and "\\" not in path
    ):
        return path
    return "/admin"


def login_url(next_path: str) -> str:
    return f"/admin/login?next={quote(safe_next(next_path), safe='/')}"


def _requested_path(request: Request) -> str:
    query = f"?{request.url.query}" if request.url.query else ""
    return request.url.path + query if request.method == "GET" else request.url.path


def page_session(request: Request, session: SessionDep, settings: SettingsDep) -> AdminSession:
    """The operator's session; otherwise a redirect to the login page."""
    admin = read_session(request, session, settings)
    if admin is None:
        raise LoginRequired(_requested_path(request))
    return admin


def api_session(request: Request, session: SessionDep, settings: SettingsDep) -> AdminSession:
    """The operator's session for the dashboard's JSON endpoints; otherwise 401."""
    admin = read_session(request, session, settings)
    if admin is None:
        raise LoginRequired(_requested_path(request), api=True)
    return admin


AdminPage = Annotated[AdminSession, Depends(page_session)]
AdminApi = Annotated[AdminSession, Depends(api_session)]
