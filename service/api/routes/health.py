"""Liveness, readiness (database, broker, artifact store; workers reported) and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.orm import Session

from service.dashboard.queries import alive_workers
from service.deps import SessionDep, SettingsDep, StoreDep
from service.gauges import scrape_registry
from service.queueing import celery_client
from service.settings import Settings

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    """Always 200 while the process runs."""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database, broker and artifact store reachable")
def readyz(
    request: Request, session: SessionDep, settings: SettingsDep, store: StoreDep
) -> JSONResponse:
    """503 with the failing component(s) named if any dependency is down; also says how
    many workers are alive (`workers_alive` false: queued jobs wait for one) and which
    inference backend predict runs on."""
    checks: dict[str, Any] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready; report it
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        with celery_client(settings).connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    try:
        store.check_writable()
        checks["artifacts"] = "ok"
    except OSError as exc:
        checks["artifacts"] = f"not writable: {exc.strerror or exc}"
    ready = all(value == "ok" for value in checks.values())
    # Reported, not required: an API host whose workers run elsewhere (or start later)
    # still serves predictions; queued jobs wait until a worker heartbeats.
    checks["workers"], alive = _workers(session, settings, checks["database"] == "ok")
    return JSONResponse(
        {
            "ready": ready,
            "checks": checks,
            "workers_alive": alive,
            "inference_backend": getattr(request.app.state, "inference_backend", None),
        },
        status_code=200 if ready else 503,
    )


def _workers(session: Session, settings: Settings, database_ok: bool) -> tuple[str, bool]:
    """(what to report, whether any worker heartbeats) for the readiness body."""
    if not database_ok:
        return "unknown: the database is unreachable", False
    try:
        alive = alive_workers(session, settings)
    except Exception as exc:  # e.g. a schema not migrated yet: report, do not fail
        return f"unknown: {type(exc).__name__}", False
    if not alive:
        return "none alive: queued jobs wait until a worker starts", False
    return f"{alive} alive", True


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
def metrics(session: SessionDep, settings: SettingsDep) -> Response:
    """Request counters and latencies; jobs, workers and pending callbacks counted now."""
    return Response(
        generate_latest(scrape_registry(session, settings)), media_type=CONTENT_TYPE_LATEST
    )
