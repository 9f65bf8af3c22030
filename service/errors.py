"""API errors: a stable machine-readable code, a message that says what to do, a status."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError


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

    @app.exception_handler(OperationalError)
    async def _database_down(_: Request, exc: OperationalError) -> JSONResponse:
        return JSONResponse(
            error_body(
                "database_unavailable",
                "the database is not reachable right now; retry in a few seconds",
            ),
            status_code=503,
            headers={"Retry-After": "5"},
        )
