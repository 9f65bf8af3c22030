"""The operators' dashboard at /admin: server-rendered pages over the same service functions.

`install(app)` adds the router, the static files (vendored CSS/JS: it works offline), the
security headers of every /admin response and the handlers that turn a missing session
into a redirect to the login page.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.dashboard.auth import CsrfError, LoginRequired, login_url
from service.dashboard.rendering import PageNotFound
from service.dashboard.templating import STATIC_DIR, STATIC_PREFIX, page
from service.dashboard.views import router
from service.errors import error_body

__all__ = ["SECURITY_HEADERS", "install", "router"]

# No inline script or style anywhere (heat-map colours are SVG attributes), so the policy
# can be strict (data for scripts rides in data- attributes and JSON blocks, which
# are not run); data: images are only the try-it preview, a JPEG we encoded.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def is_dashboard(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/")


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every /admin response (pages, JSON, static, errors)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_dashboard(scope["path"]):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _error_page(request: Request, status: int, title: str, message: str) -> Response:
    return page(
        request,
        "error.html",
        {"admin": None, "nav": "", "title": title, "message": message},
        status_code=status,
    )


def install(app: FastAPI) -> None:
    """Serve the dashboard from `app` under /admin."""
    app.include_router(router)
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="admin-static")
    app.add_middleware(SecurityHeaders)

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired) -> Response:
        if exc.api:
            return JSONResponse(
                error_body("unauthenticated", "sign in to the dashboard again"), status_code=401
            )
        return RedirectResponse(login_url(exc.next_path), status_code=303)

    @app.exception_handler(CsrfError)
    async def _csrf(request: Request, exc: CsrfError) -> Response:
        return _error_page(request, 403, "Refused", str(exc))

    @app.exception_handler(PageNotFound)
    async def _not_found(request: Request, exc: PageNotFound) -> Response:
        return _error_page(request, 404, "Not found", str(exc))
