"""The full `bit` program: the engine's commands plus serve, api, worker, migrate, admin."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from bit_core.cli import build_parser, run
from service.settings import JOB_QUEUES, QUEUES, WEBHOOK_QUEUE, get_settings

if TYPE_CHECKING:
    import uvicorn

# What signal.signal takes and returns.
SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


# Webhook deliveries wait on the network, not the CPU: a few at once in threads.
WEBHOOK_CONCURRENCY = 4


def worker_command(queues: Sequence[str], loglevel: str = "INFO") -> list[str]:
    """A Celery worker on the given queues. Job queues: solo pool, one job at a time, no
    forking (CUDA must not be initialised in a parent that forks). The webhooks queue: a
    threads pool, so a slow receiver does not hold up the others."""
    webhooks = list(queues) == [WEBHOOK_QUEUE]
    pool = ["threads", str(WEBHOOK_CONCURRENCY)] if webhooks else ["solo", "1"]
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        ",".join(queues),
        "--pool",
        pool[0],
        "--concurrency",
        pool[1],
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        loglevel,
    ]


def _check_queues(queues: list[str]) -> list[str]:
    unknown = sorted(set(queues) - set(QUEUES))
    if unknown:
        raise ValueError(f"unknown queue(s) {unknown}; the queues are {', '.join(QUEUES)}")
    if WEBHOOK_QUEUE in queues and len(queues) > 1:
        raise ValueError(
            f"the {WEBHOOK_QUEUE} queue needs a worker of its own (a job worker is busy for "
            f"minutes at a time): run `bit worker --queues {WEBHOOK_QUEUE}` beside "
            f"`bit worker --queues {','.join(q for q in queues if q != WEBHOOK_QUEUE)}`"
        )
    return queues


def _check_webhooks() -> None:
    """Exit with the reason when the webhook settings would stop the process anyway."""
    from service.webhooks import WebhookSettingsError, check_webhook_settings

    try:
        check_webhook_settings(get_settings())
    except WebhookSettingsError as exc:
        raise SystemExit(f"error: {exc}") from None


def _check_inference() -> None:
    """Exit with the reason when the configured inference backend cannot run here."""
    from bit_core.backends import BackendUnavailable
    from service.inference import check_inference_settings

    try:
        check_inference_settings(get_settings())
    except (BackendUnavailable, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None


def _cmd_migrate(_: argparse.Namespace) -> int:
    from service.db.migrate import upgrade

    settings = get_settings()
    upgrade(settings.database_url)
    print(f"database is up to date: {settings.database_url}")
    return 0


DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> int:
    """Seconds in a duration such as 90s, 15m, 12h or 30d (argparse's `type`)."""
    number, unit = text.strip()[:-1], text.strip()[-1:].lower()
    if not number.isdigit() or unit not in DURATION_UNITS_S:
        raise argparse.ArgumentTypeError(
            f"a duration is a whole number and a unit s, m, h or d (e.g. 30d), got {text!r}"
        )
    return int(number) * DURATION_UNITS_S[unit]


def scope_list(text: str) -> list[str]:
    """Comma-separated scopes (argparse's `type`); the key rules check them."""
    return [scope.strip() for scope in text.split(",") if scope.strip()]


def _cmd_create_key(args: argparse.Namespace) -> int:
    from service.auth import KeyRuleError, issue_key, key_expiry
    from service.db.migrate import upgrade
    from service.db.session import session_scope

    settings = get_settings()
    upgrade(settings.database_url)
    try:
        with session_scope(settings.database_url) as session:
            key, row = issue_key(
                session,
                role=args.role,
                tenant=args.tenant,
                name=args.name,
                scopes=args.scopes,
                expires_at=key_expiry(expires_in_s=args.expires_in),
            )
            scopes, expires = row.scopes.replace(" ", ","), row.expires_at
    except KeyRuleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    until = expires.isoformat(timespec="seconds") if expires else "never"
    print(key)
    print(
        f"(role {args.role}, tenant {args.tenant}, scopes {scopes}, expires {until}; "
        "shown once, store it now)",
        file=sys.stderr,
    )
    return 0


def _cmd_revoke_key(args: argparse.Namespace) -> int:
    from service.auth import revoke_key
    from service.db.session import session_scope

    settings = get_settings()
    try:
        with session_scope(settings.database_url) as session:
            revoked = revoke_key(session, args.prefix)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not revoked:
        print(f"error: no unrevoked key starts with {args.prefix[:12]!r}", file=sys.stderr)
        return 1
    print(
        f"revoked {revoked} key(s); API processes refuse it within "
        f"{settings.lookup_cache_s:g} s (BIT_LOOKUP_CACHE_S)"
    )
    return 0


def _cmd_list_keys(_: argparse.Namespace) -> int:
    from service.auth import list_keys, principal_of
    from service.db.session import session_scope

    settings = get_settings()
    with session_scope(settings.database_url) as session:
        for key in list_keys(session):
            principal = principal_of(key)
            used = key.last_used_at.isoformat(timespec="seconds") if key.last_used_at else "never"
            until = (
                principal.expires_at.isoformat(timespec="seconds")
                if principal.expires_at
                else "never"
            )
            state = "revoked" if key.revoked else "expired" if principal.expired() else "active"
            print(
                f"{key.prefix}  {key.role:5s}  {key.tenant}  {state}  "
                f"scopes {key.scopes.replace(' ', ',')}  expires {until}  last used {used}",
                key.name,
            )
    return 0


def _serve_api(host: str, port: int) -> None:
    import uvicorn

    uvicorn.run("service.app:create_app", factory=True, host=host, port=port, log_level="info")


def _cmd_api(args: argparse.Namespace) -> int:
    _check_webhooks()
    _check_inference()
    settings = get_settings()
    _serve_api(args.host or settings.host, args.port or settings.port)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    queues = _check_queues(args.queues.split(","))
    _check_webhooks()
    os.execv(sys.executable, worker_command(queues, args.loglevel))
    return 0  # not reached


def _cmd_serve(args: argparse.Namespace) -> int:
    from service.auth import has_admin_key
    from service.db.migrate import upgrade
    from service.db.session import session_scope
    from service.metrics import show_local_workers
    from service.supervisor import WorkerSupervisor

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _check_webhooks()
    _check_inference()
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    host, port = args.host or settings.host, args.port or settings.port
    with session_scope(settings.database_url) as session:
        needs_key = not has_admin_key(session)
    print(f"BiT service: state in {settings.home.resolve()}", file=sys.stderr)
    print(f"  API        http://{host}:{port}/v1   (docs at /docs)", file=sys.stderr)
    print(f"  dashboard  http://{host}:{port}/admin", file=sys.stderr)
    if needs_key:
        print(
            "  no API key yet: in another terminal run  bit admin create-key --role admin\n"
            "  and send it as 'Authorization: Bearer <key>'",
            file=sys.stderr,
        )
    # The API's /metrics shows the workers' too; each worker gets a port of its own.
    worker_env = show_local_workers(settings, ["jobs", "webhooks"])
    supervisors = [
        WorkerSupervisor(
            settings, worker_command(list(JOB_QUEUES), "WARNING"), env=worker_env["jobs"]
        ),
        WorkerSupervisor(
            settings, worker_command([WEBHOOK_QUEUE], "WARNING"), env=worker_env["webhooks"]
        ),
    ]
    server = _api_server(host, port)
    stop_handlers = _stop_on_signals(server)
    for supervisor in supervisors:
        supervisor.start()
    try:
        server.run()
    finally:
        # Both at once: each may take its stop bound.
        stopping = [threading.Thread(target=s.stop) for s in supervisors]
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join()
        for sig, handler in stop_handlers.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1  # not started: e.g. the port is taken (logged)


def _api_server(host: str, port: int) -> uvicorn.Server:
    import uvicorn

    config = uvicorn.Config(
        "service.app:create_app", factory=True, host=host, port=port, log_level="info"
    )
    return uvicorn.Server(config)


def _stop_on_signals(server: uvicorn.Server) -> dict[int, SignalHandler]:
    """SIGTERM and SIGINT stop the API; `bit serve` then stops its worker and exits 0.

    Why our own handlers: uvicorn's `Server.run` captures these signals and, after its
    shutdown, raises them again with the handlers it found. With the defaults SIGTERM would
    kill the process there, before the worker is stopped, leaving it orphaned. These
    handlers make that re-raise harmless (and stop a server that is still starting).
    Returns the handlers they replace.
    """

    def stop(signum: int, _: FrameType | None) -> None:
        server.should_exit = True

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}


def build_service_parser() -> argparse.ArgumentParser:
    parser, sub = build_parser()
    p = sub.add_parser("serve", help="run the API and a worker together (embedded default)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(handler=_cmd_serve)

    p = sub.add_parser("api", help="run the HTTP API only")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.set_defaults(handler=_cmd_api)

    p = sub.add_parser("worker", help="run a worker: of jobs, or of webhook deliveries")
    p.add_argument(
        "--queues",
        default=",".join(JOB_QUEUES),
        help=f"comma-separated job queues ({','.join(JOB_QUEUES)}), or {WEBHOOK_QUEUE} alone",
    )
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(handler=_cmd_worker)

    p = sub.add_parser("migrate", help="bring the database schema up to date")
    p.set_defaults(handler=_cmd_migrate)

    p = sub.add_parser("admin", help="administration")
    admin = p.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    k = admin.add_parser("create-key", help="create an API key and print it")
    k.add_argument("--role", choices=("admin", "user"), default="user")
    k.add_argument("--tenant", default="default")
    k.add_argument("--name", default="", help="what the key is for, e.g. 'mobile app'")
    k.add_argument(
        "--scopes",
        type=scope_list,
        help="comma-separated, e.g. predict,jobs:read (default: every scope of the role; "
        "the scopes: predict, datasets:read, datasets:write, jobs:read, jobs:write, "
        "models:read, models:write, admin)",
    )
    k.add_argument("--expires-in", type=duration_s, help="e.g. 90s, 15m, 12h, 30d (default: never)")
    k.set_defaults(handler=_cmd_create_key)
    k = admin.add_parser("revoke-key", help="revoke an API key by its first 12 characters")
    k.add_argument("prefix", help="the key's first 12 characters (bit admin list-keys), or the key")
    k.set_defaults(handler=_cmd_revoke_key)
    k = admin.add_parser(
        "list-keys", help="list API keys: prefix, role, tenant, state, scopes, expiry, last use"
    )
    k.set_defaults(handler=_cmd_list_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_service_parser(), argv)
