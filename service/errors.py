"""API errors: a stable machine-readable code, a message that says what to do, a status.

Also their OpenAPI side: `error_responses` documents the codes a route answers with.
"""

from __future__ import annotations

import errno
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

# Errors of the artifact store's disk that a retry later (or an operator) can fix.
STORAGE_ERRORS: dict[int, tuple[int, str, str]] = {
    errno.ENOSPC: (507, "storage_full", "the artifact store is full"),
    errno.EDQUOT: (507, "storage_full", "the artifact store is over its quota"),
    errno.EROFS: (503, "storage_unavailable", "the artifact store is read-only"),
}


def storage_error(exc: OSError) -> tuple[int, str, str] | None:
    """(status, code, message) when `exc` says the artifact store cannot take writes."""
    return STORAGE_ERRORS.get(exc.errno or 0)


def database_unavailable(exc: BaseException) -> bool:
    """True for errors that mean the database cannot be reached (not a bad query)."""
    return isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


class ApiError(Exception):
    """Raised by service functions; rendered as {"error": {"code", "message", ...}}."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def not_found(kind: str, ident: object) -> ApiError:
    return ApiError(404, f"{kind}_not_found", f"{kind} {ident} does not exist")


def error_body(code: str, message: str, **details: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **details}}


class ErrorDetail(BaseModel):
    """A stable machine-readable code and a message that says what to do."""

    code: str
    message: str

    model_config = ConfigDict(extra="allow")


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


def error_responses(*errors: tuple[int, str, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting (status, code, example message) error answers."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status, code, message in errors:
        entry = responses.setdefault(
            status,
            {
                "model": ErrorBody,
                "description": "error codes: ",
                "content": {"application/json": {"examples": {}}},
            },
        )
        entry["description"] += ("" if entry["description"].endswith(": ") else ", ") + code
        entry["content"]["application/json"]["examples"][code] = {
            "summary": code,
            "value": {"error": {"code": code, "message": message}},
        }
    return responses


# Starlette's own refusals (unknown path, wrong method, a body its parsers cannot read) in the
# API's error shape, with the code a client can branch on and what to do about it.
_HTTP_ERRORS = {
    400: ("invalid_body", "send a well-formed body: see the operation in the API docs at /docs"),
    404: ("not_found", "no such path; the API's paths are listed at /docs"),
    405: ("method_not_allowed", "this path does not take that method; see /docs"),
}


def http_error_body(request: Request, status: int, detail: str) -> dict[str, Any]:
    """The error body of a Starlette HTTPException (raised outside our own code)."""
    code, hint = _HTTP_ERRORS.get(status, (f"http_{status}", "see the API docs at /docs"))
    if status == 400 and request.headers.get("content-type", "").startswith("multipart/"):
        code = "invalid_multipart"
        hint = "send a well-formed multipart/form-data body (e.g. curl -F files=@cat.jpg)"
    return error_body(code, f"{detail.rstrip('.')}: {hint}")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = (
            {"Retry-After": str(exc.details["retry_after"])}
            if "retry_after" in exc.details
            else None
        )
        return JSONResponse(
            error_body(exc.code, exc.message, **exc.details),
            status_code=exc.status,
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", "")}
            for e in exc.errors()
        ]
        summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems[:5])
        return JSONResponse(
            error_body("invalid_request", f"invalid request: {summary}", problems=problems),
            status_code=422,
        )

    @app.exception_handler(DBAPIError)
    async def _database_down(_: Request, exc: DBAPIError) -> JSONResponse:
        if not database_unavailable(exc):
            raise exc  # a real bug: the server error handler answers 500
        return JSONResponse(
            error_body(
                "database_unavailable",
                "the database is not reachable right now; retry in a few seconds",
            ),
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(OSError)
    async def _storage(_: Request, exc: OSError) -> JSONResponse:
        known = storage_error(exc)
        if known is None:
            raise exc
        status, code, what = known
        return JSONResponse(
            error_body(
                code,
                f"{what}, so the request was not saved: retry later, or ask the operator "
                "to free space or make the store writable",
            ),
            status_code=status,
            headers={"Retry-After": "60"},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            http_error_body(request, exc.status_code, str(exc.detail)),
            status_code=exc.status_code,
            headers=exc.headers,
        )
