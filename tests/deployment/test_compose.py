"""docker-compose.yml's production layout, run without a Docker engine: each of its services
that runs our image becomes a local process of the installed venv (tests/deployment/
installed.py), with that service's command and environment from the file, started in
compose's dependency order, and a fine-tune and a predict go through them.

Only what a local run cannot do as a container does is changed, each change a row of
LOCAL_RUN with its reason; everything else is the file's, verbatim. PostgreSQL and Redis are
this machine's servers (LOCAL_SERVERS)."""

from __future__ import annotations

import graphlib
import re
import shlex
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import sqlalchemy as sa
import yaml

from service.settings import QUEUES, Settings
from tests.deployment.conftest import ROOT, finetune_and_predict
from tests.deployment.installed import Installed, Process, tails, wait_while_running
from tests.polling import free_port, wait_for
from tests.service.conftest import REDIS_URL

pytestmark = pytest.mark.deployment

# What an operator sets in the shell before `docker compose up` (README): compose reads
# these, and only these, from the environment here, so the runner's own cannot leak in.
OPERATOR = {
    "BIT_WEBHOOK_SECRET": "deployment-test-secret-of-32-chars+",
    "POSTGRES_PASSWORD": "operator-pw",
}


# --- the file, as compose reads it ---------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<named>[_a-zA-Z]\w*)"
    r"|\{(?P<braced>[_a-zA-Z]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\})"
)


def interpolate(value: str, variables: dict[str, str], where: str) -> str:
    """Compose's `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`,
    `${VAR?message}`, `${VAR:+other}`, `${VAR+other}` and `$$`."""

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["named"] or match["braced"]
        op, arg = match["op"] or "", match["arg"] or ""
        is_set = name in variables
        has_value = is_set and variables[name] != ""
        present = has_value if op.startswith(":") else is_set
        if op.endswith("?") and not present:
            raise ValueError(
                f"error while interpolating {where}: required variable {name} is missing a "
                f"value: {arg}"
            )
        if op.endswith("-"):
            return variables[name] if present else arg
        if op.endswith("+"):
            return arg if present else ""
        return variables.get(name, "")

    return _VARIABLE.sub(substitute, value)


def interpolated(tree: Any, variables: dict[str, str], where: str) -> Any:
    if isinstance(tree, str):
        return interpolate(tree, variables, where)
    if isinstance(tree, dict):
        return {k: interpolated(v, variables, f"{where}.{k}") for k, v in tree.items()}
    if isinstance(tree, list):
        return [interpolated(v, variables, f"{where}[{i}]") for i, v in enumerate(tree)]
    return tree


def load_services(variables: dict[str, str]) -> dict[str, dict[str, Any]]:
    """docker-compose.yml's services, `<<` merges resolved (yaml), variables interpolated."""
    config = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services: dict[str, dict[str, Any]] = interpolated(config["services"], variables, "services")
    return services


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment`, in either of compose's forms (mapping or KEY=value list)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """{dependency: condition}; the short (list) form means service_started."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def command(service: dict[str, Any]) -> list[str]:
    raw = service.get("command") or ["bit", "api", "--host", "0.0.0.0", "--port", "8000"]
    return shlex.split(raw) if isinstance(raw, str) else [str(word) for word in raw]


# --- what the layout must hold, checked before anything runs --------------------------------

LOCAL_SERVERS = ("postgres", "redis")  # this machine runs them; the test checks they answer

# What each role must wait for (directly): the schema exists before anything but the migrate
# step touches the database; the broker answers before the API sends or a worker consumes.
REQUIRED_DEPENDENCIES = {
    "migrate": {"postgres": "service_healthy"},
    "api": {"migrate": "service_completed_successfully", "redis": "service_healthy"},
    "worker": {"migrate": "service_completed_successfully", "redis": "service_healthy"},
}


def role(service: dict[str, Any]) -> str:
    return command(service)[1]


def check_layout(services: dict[str, dict[str, Any]]) -> None:
    """Every role present, each queue served, settings known, dependencies complete."""
    ours = {name: s for name, s in services.items() if name not in LOCAL_SERVERS}
    for name, service in ours.items():
        assert service.get("build") == ".", f"{name}: not built from this folder's Dockerfile"
        assert command(service)[0] == "bit", f"{name}: its command is not `bit ...`"
    roles = sorted(role(s) for s in ours.values())
    assert set(roles) == set(REQUIRED_DEPENDENCIES), f"roles {roles}"
    served = [
        queue
        for words in map(command, ours.values())
        if "--queues" in words
        for queue in words[words.index("--queues") + 1].split(",")
    ]
    assert sorted(served) == sorted(QUEUES), f"queues served {served}, the queues {QUEUES}"

    known = {f"BIT_{name.upper()}" for name in Settings.model_fields}
    for name, service in ours.items():
        for variable in environment(service):
            if variable.startswith("BIT_"):
                assert variable in known, f"{name}: {variable} is not a setting (service.settings)"
        for dependency, condition in REQUIRED_DEPENDENCIES[role(service)].items():
            names = [
                n
                for n, s in services.items()
                if n == dependency or (n not in LOCAL_SERVERS and role(s) == dependency)
            ]
            assert names, f"{name} depends on a {dependency} the file does not have"
            got = {n: depends_on(service).get(n) for n in names}
            assert condition in got.values(), (
                f"{name}: depends_on {got}, needs {dependency} with condition {condition}"
            )
    gpu = services["worker-gpu"]
    assert command(gpu)[-1] == "finetune", command(gpu)
    assert environment(gpu).get("BIT_DEVICE") == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"], devices


def test_the_layout_is_complete():
    check_layout(load_services(OPERATOR))


def test_a_missing_required_variable_is_reported_as_compose_does():
    with pytest.raises(ValueError) as error:
        load_services({"POSTGRES_PASSWORD": "x"})
    assert str(error.value).startswith("error while interpolating services.")
    assert "required variable BIT_WEBHOOK_SECRET is missing a value: set BIT_WEBHOOK_SECRET" in (
        str(error.value)
    )


def test_interpolation_follows_compose():
    variables = {"SET": "v", "EMPTY": ""}
    cases = {
        "${SET:-d}": "v", "${EMPTY:-d}": "d", "${EMPTY-d}": "", "${UNSET-d}": "d",
        "$SET/$$x": "v/$x", "${SET:+alt}": "alt", "${EMPTY:+alt}": "", "${EMPTY+alt}": "alt",
    }  # fmt: skip
    for text, expected in cases.items():
        assert interpolate(text, variables, "t") == expected, text
    with pytest.raises(ValueError, match="required variable EMPTY"):
        interpolate("${EMPTY:?why}", variables, "t")
    assert interpolate("${EMPTY?why}", variables, "t") == ""


# --- what a local run changes, and why --------------------------------------------------------


@dataclass
class Local:
    """This machine's stand-ins for the containers' world."""

    database_url: str  # a fresh database on the local PostgreSQL (trust auth)
    redis_url: str  # the local Redis
    volumes: dict[str, Path]  # named volume -> a temp folder
    port: int  # a free loopback port for the API's published one
    key_prefix: str = field(default_factory=lambda: f"bit-compose-{uuid.uuid4().hex[:8]}:")


@dataclass(frozen=True)
class Rewrite:
    """One change to a service's environment value, command word or healthcheck word."""

    what: str
    why: str
    # (where: "environment.KEY" | "command" | "healthcheck", value, the service, the postgres
    # service, local) -> the new value, or None where the rule does not apply
    apply: Callable[[str, str, dict[str, Any], dict[str, Any], Local], str | None]


def _postgres_url(where: str, value: str, _: dict, postgres: dict, local: Local) -> str | None:
    parts = urlsplit(value)
    if "://" not in value or parts.hostname != "postgres":
        return None
    # Trust auth here accepts any password, so check what the container's server would.
    server = environment(postgres)
    expected = (server["POSTGRES_USER"], server["POSTGRES_PASSWORD"], server["POSTGRES_DB"])
    got = (parts.username, parts.password, parts.path.lstrip("/"))
    assert got == expected, f"{where}: user, password, database {got}; the server has {expected}"
    assert (parts.port or 5432) == 5432, f"{where}: postgres:16 listens on 5432, not {parts.port}"
    return sa.make_url(local.database_url).set(drivername=parts.scheme).render_as_string(False)


def _redis_url(where: str, value: str, _: dict, __: dict, local: Local) -> str | None:
    parts = urlsplit(value)
    if "://" not in value or parts.hostname != "redis":
        return None
    assert (parts.port or 6379) == 6379, f"{where}: redis:7 listens on 6379, not {parts.port}"
    return parts._replace(netloc=urlsplit(local.redis_url).netloc).geturl()  # db number kept


def _volume_path(where: str, value: str, service: dict, _: dict, local: Local) -> str | None:
    for mount in service.get("volumes") or []:
        volume, target = str(mount).split(":")[:2]
        if value == target or value.startswith(target.rstrip("/") + "/"):
            return str(local.volumes[volume]) + value[len(target.rstrip("/")) :]
    return None


def _device(where: str, value: str, *_: Any) -> str | None:
    return "cpu" if where == "environment.BIT_DEVICE" and value == "cuda" else None


def _bind_host(where: str, value: str, *_: Any) -> str | None:
    return "127.0.0.1" if where == "command" and value == "0.0.0.0" else None


def _published_port(where: str, value: str, service: dict, _: dict, local: Local) -> str | None:
    published = [str(p).rsplit(":", 1)[-1] for p in service.get("ports") or []]
    for port in published:
        if where == "command" and value == port:
            return str(local.port)
        if where == "healthcheck" and f":{port}/" in value:
            return value.replace(f":{port}/", f":{local.port}/")
    return None


LOCAL_RUN = [
    Rewrite(
        "postgresql://<user>:<password>@postgres:5432/<db>",
        "no container network: the local server, a fresh database of this test, its trust-auth "
        "role (user, password and database are checked against the postgres service first)",
        _postgres_url,
    ),
    Rewrite(
        "redis://redis:6379/<n>",
        "no container network: the local Redis (BIT_BROKER_KEY_PREFIX, below, keeps the "
        "broker's keys apart from other tests on it)",
        _redis_url,
    ),
    Rewrite(
        "/data... of the bit-data volume",
        "no volumes: one temp folder shared by all services, as the named volume is",
        _volume_path,
    ),
    Rewrite("BIT_DEVICE=cuda", "no GPU on this machine: the GPU worker runs on the CPU", _device),
    Rewrite("--host 0.0.0.0", "traffic stays on loopback", _bind_host),
    Rewrite(
        "published port 8000 (command, healthcheck URL)",
        "other tests and services listen here too: a free port",
        _published_port,
    ),
]

# Added to every service's environment; nothing the file sets is overridden by these.
LOCAL_ENV: dict[str, Callable[[Local], str]] = {
    # The local Redis is shared: this run's broker keys get a namespace of their own.
    "BIT_BROKER_KEY_PREFIX": lambda local: local.key_prefix,
    # Three processes share this machine's cores, where each container would have its own.
    "OMP_NUM_THREADS": lambda local: "1",
}


@dataclass
class LocalService:
    name: str
    command: list[str]
    environment: dict[str, str]
    healthcheck: list[str] | None


def localized(services: dict[str, dict[str, Any]], local: Local) -> dict[str, LocalService]:
    """Each service of ours with LOCAL_RUN applied; fails on a rule that matched nothing
    (the table must describe the file, not an older one)."""
    used: set[str] = set()

    def rewrite(where: str, value: str, service: dict[str, Any]) -> str:
        for rule in LOCAL_RUN:
            changed = rule.apply(where, value, service, services["postgres"], local)
            if changed is not None:
                used.add(rule.what)
                value = changed
        return value

    result = {}
    for name, service in services.items():
        if name in LOCAL_SERVERS:
            continue
        env = {k: rewrite(f"environment.{k}", v, service) for k, v in environment(service).items()}
        for key, value in LOCAL_ENV.items():
            assert key not in env, f"{name} sets {key}: LOCAL_ENV would override the file"
            env[key] = value(local)
        check = (service.get("healthcheck") or {}).get("test")
        result[name] = LocalService(
            name,
            [rewrite("command", word, service) for word in command(service)],
            env,
            [rewrite("healthcheck", str(w), service) for w in check] if check else None,
        )
    unused = [rule.what for rule in LOCAL_RUN if rule.what not in used]
    assert not unused, f"LOCAL_RUN rows that match nothing in docker-compose.yml: {unused}"
    return result


# --- running it ---------------------------------------------------------------------------------


def healthy(check: list[str], installed: Installed, cwd: Path, env: dict[str, str]) -> bool:
    """One run of a compose healthcheck: CMD (exec form) or CMD-SHELL, exit 0 is healthy."""
    kind, *rest = check
    assert kind in ("CMD", "CMD-SHELL"), f"healthcheck form {kind} (NONE or a bare string?)"
    words = ["sh", "-c", rest[0]] if kind == "CMD-SHELL" else rest
    done = subprocess.run(
        installed.command(words), cwd=cwd, env=env, capture_output=True, timeout=30
    )
    return done.returncode == 0


def local_server_answers(name: str, local: Local) -> bool:
    """The local stand-in for postgres's pg_isready and redis's redis-cli ping."""
    try:
        if name == "postgres":
            engine = sa.create_engine(local.database_url)
            try:
                with engine.connect() as connection:
                    connection.execute(sa.text("SELECT 1"))
            finally:
                engine.dispose()
            return True
        return bool(redis.Redis.from_url(local.redis_url, socket_timeout=2).ping())
    except (sa.exc.OperationalError, redis.RedisError):
        return False


@dataclass
class Compose:
    """The layout's processes, started by `up` in dependency order."""

    installed: Installed
    services: dict[str, dict[str, Any]]
    local: Local
    data: Path  # the volume's folder: also the working folder (the image's WORKDIR /data)
    logs: Path
    processes: dict[str, Process] = field(default_factory=dict)

    def env(self, service: LocalService) -> dict[str, str]:
        return self.installed.env(self.data, **service.environment)

    def up(self) -> None:
        """Check the layout, then start each service once its dependencies are met."""
        check_layout(self.services)
        ours = localized(self.services, self.local)
        graph = {name: set(depends_on(s)) for name, s in self.services.items()}
        for name in graphlib.TopologicalSorter(graph).static_order():
            for dependency, condition in depends_on(self.services[name]).items():
                self.wait(dependency, condition, ours)
            if name in LOCAL_SERVERS:
                continue
            service = ours[name]
            self.processes[name] = self.installed.spawn(
                name, service.command, cwd=self.data, env=self.env(service), log_dir=self.logs
            )

    def wait(self, name: str, condition: str, ours: dict[str, LocalService]) -> None:
        running = list(self.processes.values())
        if name in LOCAL_SERVERS:
            assert condition in ("service_started", "service_healthy"), (name, condition)
            wait_for(lambda: local_server_answers(name, self.local), 30, f"the local {name}")
        elif condition == "service_completed_successfully":
            process = self.processes[name]
            try:
                code = process.popen.wait(timeout=180)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} did not complete\n{tails(running)}") from None
            assert code == 0, f"{name} exited {code}\n{tails(running)}"
        elif condition == "service_healthy":
            service = ours[name]
            assert service.healthcheck, f"{name}: service_healthy, but it has no healthcheck"
            check = self.services[name]["healthcheck"]
            budget = _seconds(check.get("interval", "30s")) * int(check.get("retries", 3))
            check_words, env = service.healthcheck, self.env(service)
            wait_while_running(
                [self.processes[name]],
                lambda: healthy(check_words, self.installed, self.data, env),
                budget,
                f"{name}'s healthcheck",
            )
        else:
            assert condition == "service_started", (name, condition)

    def down(self) -> None:
        for process in reversed(self.processes.values()):
            process.stop()


def _seconds(duration: str) -> float:
    """Compose durations as the file uses them: `5s`, `1m`, `1m30s`."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts, f"duration {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.fixture
def compose(installed: Installed, fresh_database: str, tmp_path: Path) -> Iterator[Compose]:
    services = load_services(OPERATOR)
    data, logs = tmp_path / "bit-data", tmp_path / "logs"
    data.mkdir()
    logs.mkdir()
    local = Local(fresh_database, REDIS_URL, {"bit-data": data}, free_port())
    layout = Compose(installed, services, local, data, logs)
    try:
        yield layout
    finally:
        layout.down()
        assert all(not p.alive() for p in layout.processes.values())
        with redis.Redis.from_url(local.redis_url) as client:  # this run's broker keys
            keys = list(client.scan_iter(f"{local.key_prefix}*"))
            if keys:
                client.delete(*keys)


def worker_rows(database_url: str) -> dict[str, tuple[str, str]]:
    """{worker name: (queues, device)} from the workers' heartbeats."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT name, queues, device FROM workers"))
            return {name: (queues, device) for name, queues, device in rows}
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.services
def test_compose_layout_serves_a_finetune_and_a_predict(compose: Compose):
    compose.up()
    processes = list(compose.processes.values())
    assert set(compose.processes) == {
        "migrate",
        "api",
        "worker-gpu",
        "worker-cluster",
        "worker-webhooks",
    }
    assert compose.processes["migrate"].popen.returncode == 0
    running = [p for p in processes if p.name != "migrate"]

    def both_workers() -> dict[str, tuple[str, str]] | None:
        rows = worker_rows(compose.local.database_url)
        return rows if sorted(q for q, _ in rows.values()) == sorted(QUEUES) else None

    workers = wait_while_running(running, both_workers, 60, "a worker on each queue")
    by_queue = {queues: (name, device) for name, (queues, device) in workers.items()}
    host = socket.gethostname()
    for queue, service in (
        ("finetune", "worker-gpu"),
        ("pretrain", "worker-cluster"),
        ("webhooks", "worker-webhooks"),
    ):
        name, _ = by_queue[queue]
        assert name == f"{host}:{compose.processes[service].pid}", (by_queue, tails(processes))
    assert by_queue["finetune"][1] == "cpu", by_queue  # BIT_DEVICE=cuda, mapped (LOCAL_RUN)

    api = localized(compose.services, compose.local)["api"]
    key = compose.installed.run(
        ["bit", "admin", "create-key"], cwd=compose.data, env=compose.env(api)
    )  # as `docker compose exec api bit admin create-key`
    url = f"http://127.0.0.1:{compose.local.port}"
    job = finetune_and_predict(url, key.strip().splitlines()[-1], running)
    ran_it = {event["worker"] for event in job["events"] if event["worker"]}
    assert ran_it == {by_queue["finetune"][0]}, (job["events"], tails(processes))
    assert all(p.alive() for p in running), tails(processes)
    assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    # The shared volume holds what the services wrote: the model the worker stored.
    assert any((compose.data / "artifacts").rglob("*")), tails(processes)
