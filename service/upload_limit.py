"""ASGI middleware refusing request bodies over `settings.max_upload_bytes` with a 413.

A declared Content-Length over the limit is refused before a byte of the body is read.
A body without one (chunked) or with a false one is counted as it streams in through
`receive`, and cut off the moment it passes the limit: nothing ever buffers a whole
request, so the limit bounds what an upload can cost in disk and time.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body


class BodyTooLarge(Exception):
    """Raised from `receive` when the body passes the limit (the app sees it mid-read)."""


def _declared_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # a malformed header is the server's to refuse; the body is still counted


class UploadLimitMiddleware:
    """Answer 413 `upload_too_large` for any HTTP request whose body exceeds `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _refusal(self) -> JSONResponse:
        mib = self.max_bytes / 1024**2
        return JSONResponse(
            error_body(
                "upload_too_large",
                f"the request body is over the limit of {self.max_bytes} bytes ({mib:.1f} MiB); "
                "send fewer or smaller images per request and append the rest with "
                "POST /v1/datasets/{id}/images",
                limit_bytes=self.max_bytes,
            ),
            status_code=413,
            # The rest of the body is not read; the connection cannot be reused.
            headers={"Connection": "close"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refusal()(scope, receive, send)
            return

        received = 0
        exceeded = False  # the body passed the limit
        started = False  # the app began its answer before that
        answered = False  # our 413 went out

        async def counted_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started, answered
            if exceeded and not started:
                # The app is answering for the error it saw mid-read (FastAPI turns it into
                # a 400 "error parsing the body"): the client gets our 413 instead.
                if not answered:
                    answered = True
                    await self._refusal()(scope, receive, send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not exceeded or started:
                raise
            if not answered:
                answered = True
                await self._refusal()(scope, receive, send)
