"""Prediction through the service: a live API, an async HTTP load, beside the model alone.

Two uvicorn API processes are started the way tests/e2e/live.py starts one (embedded
default, configured only through the environment, each in its own temporary BIT_HOME):
one with dynamic batching on (the default), one with it off. An R50x1 with random
weights is saved with `bit_core.checkpoint.save_model` and registered in each database
the way the worker registers a trained model. This process then sends one-image
multipart predicts (encoded once by httpx, replayed by replay_client.py, whose own CPU cost
is a small part of httpx's) at concurrency 1, 8, 32 and 64 (bounded request counts,
127.0.0.1 only), and in the same rounds the very same model directory is timed alone
(`Predictor.probabilities` on preprocessed batches of 1, 8, 32, 64), and so are the
endpoints of minimal_api.py at concurrency 1: an empty route, and the smallest predict
endpoint on the same model, its forward inline or on a thread of its own (what any Python
predict endpoint pays, whatever else it does). Rounds are interleaved and rotated, as in
engine_speed.py.

Ratios reported against the issue's targets:
* service images/s at c=64 (batching on) ÷ model-only images/s at batch 64 (≥ 70%);
* service overhead on one predict at c=1: (service p50 − model-only batch-1 median) ÷
  model-only batch-1 median (≤ 15%).

Usage:
    python benchmarks/service_speed.py                      # ~5 min on 2 CPU cores
    python benchmarks/service_speed.py --quick              # one round, fewer requests
    python benchmarks/service_speed.py --out BENCHMARKS.md
    python benchmarks/service_speed.py --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import httpx
import torch
from common import (
    RoundPolicy,
    RunInfo,
    _num,
    log,
    percentile,
    photo_jpeg,
    pick_device,
    process_cpu_s,
    publish,
    quiet_gate,
    script_parser,
    section_key,
)
from engine_speed import NUM_CLASSES, make_model
from predict_speed import measure_model
from replay_client import ReplayConnection, ReplayError, encode

from bit_core.checkpoint import ModelInfo, save_model
from bit_core.predict import Predictor
from service.db.artifacts import store_for
from service.db.models import Model
from service.db.session import session_scope
from service.settings import Settings
from tests.e2e.live import LiveService, answers_ok
from tests.polling import free_port, wait_for

TAG = "service_speed"
CONCURRENCY = (1, 8, 32, 64)  # 32: the batcher's default max batch
MODEL_BATCHES = (1, 8, 32, 64)
MODEL_KEY = "models/bench"
TENANT = "e2e"  # the tenant of the key LiveService creates
TARGET_THROUGHPUT = 0.70
TARGET_OVERHEAD = 0.15


class Reference(NamedTuple):
    """One of minimal_api.py's endpoints: in which of its processes, at which path, and its
    row in the table."""

    on_thread: bool  # in the process whose forwards run on a thread of their own
    path: str
    row: str


REFERENCES = {
    "empty": Reference(
        False, "/empty", "empty route: the same request parsed and answered, nothing computed"
    ),
    "minimal": Reference(
        False,
        "/v1/predict",
        "minimal endpoint: form → decode → forward → top-k inline, nothing else",
    ),
    "threaded": Reference(
        True, "/v1/predict", "minimal endpoint, decode + forward on a thread of their own"
    ),
}


# --- the service under test -------------------------------------------------------------------


def register_model(home: Path, model: torch.nn.Module, crop: int) -> int:
    """Save `model` to the artifact store under `home` and add its row, as the worker does
    after a fine-tuning run; returns the model id."""
    settings = Settings(home=home)
    store = store_for(settings)
    classes = [f"class{index}" for index in range(NUM_CLASSES)]
    info = save_model(
        store.local_dir(MODEL_KEY),
        model,  # type: ignore[arg-type]
        ModelInfo(arch="R50x1", classes=classes, crop=crop, base_model="random weights"),
    )
    weights = store.local_dir(MODEL_KEY) / "weights.safetensors"
    with session_scope(settings.database_url) as session:
        row = Model(
            tenant=TENANT, name="bench", arch=info.arch, classes=info.classes, crop=crop,
            base_model=info.base_model, plan={}, metrics={}, uri=MODEL_KEY,
            sha256=info.sha256, size_bytes=weights.stat().st_size,
        )  # fmt: skip
        session.add(row)
        session.flush()
        return int(row.id)


@dataclass
class Api:
    """One live API process and the model registered in it."""

    name: str
    service: LiveService
    model_id: int = 0

    @property
    def pid(self) -> int:
        return self.service.api.pid if self.service.api is not None else 0

    @property
    def target(self) -> Target:
        return Target(self.service.url, "/v1/predict", self.pid, self.model_id, self.service.key)


@dataclass
class Target:
    """Where a burst's predicts go: a server's URL and path, its process, the model id and
    the API key."""

    url: str
    path: str
    pid: int
    model_id: int = 1
    key: str = ""


@dataclass
class Endpoint:
    """One of minimal_api.py's endpoints (REFERENCES)."""

    name: str
    target: Target


@dataclass
class References:
    """minimal_api.py in two uvicorn processes, run as the API is run: (process, URL) by
    whether its forwards run on a thread of their own."""

    servers: dict[bool, tuple[subprocess.Popen[bytes], str]]

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _ in self.servers.values()]

    @property
    def endpoints(self) -> list[Endpoint]:
        endpoints = []
        for name, reference in REFERENCES.items():
            process, url = self.servers[reference.on_thread]
            endpoints.append(Endpoint(name, Target(url, reference.path, process.pid)))
        return endpoints

    def stop(self) -> None:
        for process, _ in self.servers.values():
            process.terminate()
        for process, _ in self.servers.values():
            process.wait(timeout=30)


def start_api(name: str, root: Path, env: dict[str, str], model: torch.nn.Module, crop: int) -> Api:
    home = root / name
    service = LiveService(home, {"BIT_HOME": str(home), **env}).start()
    api = Api(name, service)
    api.model_id = register_model(home, model, crop)
    return api


def model_directory(api: Api) -> str:
    """The directory of the model registered in `api`."""
    return Settings(home=api.service.home).artifacts_url + "/" + MODEL_KEY


def _start_reference(
    root: Path, model_dir: str, device: torch.device, on_thread: bool
) -> tuple[subprocess.Popen[bytes], str]:
    url = f"http://127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "MINIMAL_API_MODEL": model_dir,
        "MINIMAL_API_DEVICE": device.type,
        "MINIMAL_API_FORWARD_THREAD": "1" if on_thread else "0",
    }
    log_path = root / f"minimal_api_{'thread' if on_thread else 'inline'}.log"
    with open(log_path, "ab") as log_file:  # the child keeps its own copy
        process = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "minimal_api:app",
                "--app-dir", str(Path(__file__).parent),
                "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
            ],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    return process, url


def start_references(root: Path, model_dir: str, device: torch.device) -> References:
    """Start minimal_api.py twice on the same model directory, with uvicorn's defaults, as
    tests/e2e/live.py starts the API."""
    references = References({})
    try:
        for on_thread in (False, True):
            references.servers[on_thread] = _start_reference(root, model_dir, device, on_thread)
        for _, url in references.servers.values():
            wait_for(partial(answers_ok, f"{url}/openapi.json"), 60, "minimal_api.py to be ready")
    except BaseException:
        references.stop()
        raise
    return references


# --- the load generator -----------------------------------------------------------------------


@dataclass
class Load:
    """One burst of `requests` predicts with `concurrency` in flight."""

    latencies: list[float]
    server_ms: list[float]  # the answer's own `time_ms` (inside the route)
    stages: list[dict[str, float]]  # the answer's Server-Timing: decode, wait, forward, total
    errors: list[str]  # non-200 answers: status and when
    wall_s: float
    client_cores: float  # this process's CPU (HTTP client) / wall
    server_cores: float
    batches: tuple[float, float]  # forwards run, images in them (from /metrics)


_METRIC = re.compile(r"^bit_predict_batch_size_(sum|count) ([0-9.e+]+)$", re.M)


def _batch_counters(client: httpx.Client) -> tuple[float, float]:
    try:
        text = client.get("/metrics").text
    except httpx.HTTPError:
        return 0.0, 0.0
    found = dict(_METRIC.findall(text))
    return float(found.get("count", 0)), float(found.get("sum", 0))


def server_timing(header: str) -> dict[str, float]:
    """`decode;dur=1.20, forward;dur=22.10` -> {"decode": 1.2, "forward": 22.1} (ms)."""
    stages = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        if name and duration:
            stages[name] = float(duration)
    return stages


async def _burst(target: Target, image: bytes, concurrency: int, requests: int) -> Load:
    latencies: list[float] = []
    server_ms: list[float] = []
    stages: list[dict[str, float]] = []
    errors: list[str] = []
    todo = iter(range(requests))
    raw = encode(
        httpx.Request(
            "POST",
            f"{target.url}{target.path}",
            headers={"Authorization": f"Bearer {target.key}"},
            files=[("files", ("image.jpg", image, "image/jpeg"))],
            data={"model_id": str(target.model_id), "top_k": "1"},
        )
    )
    connections = [ReplayConnection(target.url) for _ in range(concurrency)]

    async def one_client(connection: ReplayConnection) -> None:
        for _ in todo:  # shared: `requests` predicts in all
            began = time.perf_counter()
            try:
                answer = await connection.send(raw)
            except ReplayError as exc:  # e.g. the server dropped the connection
                errors.append(f"{exc} after {time.perf_counter() - began:.0f} s")
                continue
            if answer.status != 200:  # counted and reported, not timed
                errors.append(f"{answer.status} after {time.perf_counter() - began:.0f} s")
                continue
            latencies.append(time.perf_counter() - began)
            server_ms.append(float(json.loads(answer.body)["time_ms"]))
            stages.append(server_timing(answer.headers.get("server-timing", "")))

    own = resource.getrusage(resource.RUSAGE_SELF)
    server0, began = process_cpu_s(target.pid), time.perf_counter()
    try:
        await asyncio.gather(*(one_client(c) for c in connections))
    finally:
        wall = time.perf_counter() - began
        own_after = resource.getrusage(resource.RUSAGE_SELF)
        server = process_cpu_s(target.pid) - server0
        await asyncio.gather(*(c.close() for c in connections))
    client_s = own_after.ru_utime + own_after.ru_stime - own.ru_utime - own.ru_stime
    cores = (client_s / wall, server / wall)
    return Load(latencies, server_ms, stages, errors, wall, *cores, (0.0, 0.0))


def burst(api: Api | Endpoint, image: bytes, concurrency: int, requests: int) -> Load:
    if isinstance(api, Endpoint):  # no batcher, no forwards to count
        return asyncio.run(_burst(api.target, image, concurrency, requests))
    with api.service.client() as client:
        before = _batch_counters(client)
        load = asyncio.run(_burst(api.target, image, concurrency, requests))
        after = _batch_counters(client)
    load.batches = (after[0] - before[0], after[1] - before[1])
    return load


@dataclass
class ServiceResult:
    """All kept bursts of one (API, concurrency)."""

    loads: list[Load] = field(default_factory=list)

    @property
    def latencies(self) -> list[float]:
        return [t for load in self.loads for t in load.latencies]

    def p_ms(self, q: float) -> float | None:
        return 1000 * percentile(self.latencies, q) if self.latencies else None

    @property
    def images_per_s(self) -> float | None:
        """Median over rounds of answered requests / wall time (one image per request)."""
        rates = [len(load.latencies) / load.wall_s for load in self.loads]
        return statistics.median(rates) if rates else None

    @property
    def mean_batch(self) -> float | None:
        forwards = sum(load.batches[0] for load in self.loads)
        return sum(load.batches[1] for load in self.loads) / forwards if forwards else None

    @property
    def server_ms(self) -> float | None:
        values = [t for load in self.loads for t in load.server_ms]
        return statistics.median(values) if values else None

    def per_request_ms(self, stage: str | None = None) -> list[float]:
        """Each answered request's latency less its own forward (stage None), or one
        Server-Timing stage of it; ms."""
        values = []
        for load in self.loads:
            for latency, stages in zip(load.latencies, load.stages, strict=True):
                if "forward" in stages:
                    values.append(stages[stage] if stage else 1000 * latency - stages["forward"])
        return values

    @property
    def errors(self) -> list[str]:
        return [e for load in self.loads for e in load.errors]

    def cores(self) -> tuple[float, float]:
        return (
            statistics.mean(load.client_cores for load in self.loads),
            statistics.mean(load.server_cores for load in self.loads),
        )


# --- report ---------------------------------------------------------------------------------


def _ratio(value: float | None, reference: float | None) -> str:
    return "—" if not value or not reference else f"{value / reference:.0%}"


def report(
    results: dict[tuple[str, int], ServiceResult],
    model: dict[int, tuple[float, float]],
    decode_ms: float,
) -> tuple[str, str]:
    """(the table, the target lines); `decode_ms`: the test image's decode + resize alone."""
    lines = [
        "| path | concurrency / batch | p50 ms | p99 ms | images/s | mean forward batch "
        "| server time_ms p50 | client / server cores | images/s ÷ model-only at that batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    failures: list[str] = []
    for size in MODEL_BATCHES:
        median_ms, rate = model.get(size, (None, None))
        lines.append(
            f"| model only: Predictor.probabilities | batch {size} | {_num(median_ms)} | — "
            f"| {_num(rate, 2)} | {size} | — | — | 100% |"
        )
    for (name, concurrency), result in results.items():
        client, server = result.cores()
        reference = model.get(concurrency, (None, None))[1]
        is_api = name not in REFERENCES
        lines.append(
            f"| {f'service, dynamic batching {name}' if is_api else REFERENCES[name].row} "
            f"| c={concurrency} ({len(result.latencies)} requests) | {_num(result.p_ms(50))} "
            f"| {_num(result.p_ms(99))} | {_num(result.images_per_s, 2)} "
            f"| {_num(result.mean_batch) if is_api else '—'} | {_num(result.server_ms)} "
            f"| {client:.2f} / {server:.2f} "
            f"| {_ratio(result.images_per_s, reference) if is_api else '—'} |"
        )
        if result.errors:
            failures.append(
                f"- batching {name}, c={concurrency}: {len(result.errors)} of "
                f"{len(result.errors) + len(result.latencies)} requests failed "
                f"({', '.join(sorted(set(result.errors))[:4])}); images/s counts answered "
                "requests only."
            )
    on64 = results.get(("on", 64))
    on1, off1 = results.get(("on", 1)), results.get(("off", 1))
    b64, b1 = model.get(64, (None, None))[1], model.get(1, (None, None))[0]
    targets = []
    if on64 is not None and on64.images_per_s and b64:
        share = on64.images_per_s / b64
        met = "met" if share >= TARGET_THROUGHPUT else "NOT met"
        targets.append(
            f"- Throughput at c=64, batching on: {on64.images_per_s:.2f} images/s = "
            f"{share:.0%} of model-only batch 64 ({b64:.2f} images/s); target ≥ "
            f"{TARGET_THROUGHPUT:.0%}: **{met}**."
        )
    for name, at_c1 in (("on", on1), ("off", off1)):
        p50 = at_c1.p_ms(50) if at_c1 is not None else None
        if p50 is None or not b1:
            continue
        overhead = (p50 - b1) / b1
        met = "met" if overhead <= TARGET_OVERHEAD else "NOT met"
        targets.append(
            f"- Overhead on one predict at c=1, batching {name}: p50 {p50:.1f} ms vs "
            f"model-only batch 1 {b1:.1f} ms → +{p50 - b1:.1f} ms = {overhead:.1%} of model "
            f"time; target ≤ {TARGET_OVERHEAD:.0%}: **{met}**."
        )
        if at_c1 is not None and at_c1.server_ms is not None:
            inside = at_c1.server_ms - b1
            targets.append(
                f"  Of the +{p50 - b1:.1f} ms, +{inside:.1f} ms is inside the route (its "
                f"time_ms p50 {at_c1.server_ms:.1f} ms: form parsing, model lookup, the "
                f"image's decode + resize — {decode_ms:.1f} ms alone — and the hand-offs to "
                f"the decode and forward threads); +{p50 - at_c1.server_ms:.1f} ms is "
                "HTTP, middleware and the API-key check, outside it."
            )
        if at_c1 is not None and at_c1.per_request_ms():
            beside = [results.get((name, 1)) for name in ("empty", "minimal", "threaded")]
            targets.append(per_request_line(at_c1, b1, *beside))
    return "\n".join(lines), "\n".join(failures + targets)


def per_request_line(
    result: ServiceResult,
    model_ms: float,
    empty: ServiceResult | None,
    minimal: ServiceResult | None,
    threaded: ServiceResult | None,
) -> str:
    """The overhead request by request, from each answer's Server-Timing: free of the
    difference between two processes' forwards that the side-by-side figure includes;
    set beside minimal_api.py's endpoints."""
    rest = statistics.median(result.per_request_ms())
    forward = statistics.median(result.per_request_ms("forward"))
    decode = statistics.median(result.per_request_ms("decode"))
    met = "met" if rest / forward <= TARGET_OVERHEAD else "NOT met"
    line = (
        f"  Request by request (Server-Timing): latency less the request's own forward, p50 "
        f"+{rest:.1f} ms = {rest / forward:.1%} of its forward (p50 {forward:.1f} ms; the "
        f"image's decode + resize is {decode:.1f} ms of it): **{met}**. The forward in the "
        f"API process took {forward / model_ms:.0%} of the model-only time."
    )
    if empty is None or minimal is None or threaded is None or not empty.latencies:
        return line
    bare = statistics.median(minimal.per_request_ms())
    bare_forward = statistics.median(minimal.per_request_ms("forward"))
    handed = statistics.median(threaded.per_request_ms())
    handed_forward = statistics.median(threaded.per_request_ms("forward"))
    return line + (
        f" The least a predict endpoint pays here: the minimal endpoint's latency less its "
        f"forward is +{bare:.1f} ms ({bare / bare_forward:.1%} of its forward: decode, HTTP "
        f"and top-k right after a forward; the empty route answers the same request in "
        f"{empty.p_ms(50):.1f} ms), and +{handed:.1f} ms ({handed / handed_forward:.1%}) "
        f"with decode and forward on a thread of their own, as the service runs a lone call "
        f"and as any endpoint must that keeps serving during a forward. The service's own "
        f"machinery (API key, lookups, middleware, the batcher) adds +{rest - handed:.1f} ms "
        "to that."
    )


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--crop", type=int, default=128, help="the model's input side (128)")
    parser.add_argument("--quick", action="store_true", help="one round, fewer requests")
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args(argv)


def measure(
    args: argparse.Namespace,
    device: torch.device,
    apis: list[Api],
    references: References,
    image: bytes,
    rounds: int,
) -> tuple[dict[tuple[str, int], ServiceResult], dict[int, tuple[float, float]], float, str]:
    """Interleaved rounds: the model alone, then every (API, concurrency) and minimal_api's
    endpoints at c=1, order rotated. Returns the results by (API or endpoint name,
    concurrency), model-only (median ms, images/s) by batch, the image's decode ms, the
    load note."""
    requests = {1: 10, 8: 32, 32: 64, 64: 64} if args.quick else {1: 40, 8: 96, 32: 160, 64: 192}
    if device.type == "cuda":
        requests = {c: 4 * n for c, n in requests.items()}
    for api in apis:  # loads the model, sees every batch shape once
        log(f"warm-up: batching {api.name}")
        for concurrency in CONCURRENCY:
            burst(api, image, concurrency, max(4, concurrency))
    for endpoint in references.endpoints:
        burst(endpoint, image, 1, 4)
    # The model alone: the very files the API serves.
    predictor = Predictor.load(model_directory(apis[0]), device=str(device))

    def service_round(index: int) -> dict[tuple[str, int], Load]:
        configs: list[tuple[Api | Endpoint, int]] = [(api, c) for c in CONCURRENCY for api in apis]
        configs += [(endpoint, 1) for endpoint in references.endpoints]
        shift = index % len(configs)
        loads = {}
        for api, concurrency in configs[shift:] + configs[:shift]:
            log(f"  {api.name}, c={concurrency}: {requests[concurrency]} requests")
            loads[api.name, concurrency] = burst(api, image, concurrency, requests[concurrency])
        return loads

    gate = quiet_gate("service", args.max_others, args.block_waits, 30.0)
    pids = [api.pid for api in apis] + references.pids
    policy = RoundPolicy(
        args.max_others, args.max_redo, exclude=lambda: sum(map(process_cpu_s, pids))
    )
    runs = {1: 10, 8: 3, 32: 1, 64: 1} if device.type == "cpu" else {1: 20, 8: 10, 32: 5, 64: 5}
    timings = measure_model(
        {"fast": predictor.probabilities}, args.crop, runs, rounds, policy, extra=service_round
    )
    results = {(api.name, c): ServiceResult() for c in CONCURRENCY for api in apis}
    results |= {(name, 1): ServiceResult() for name in REFERENCES}
    for loads in timings.extras:
        for config, load in loads.items():
            results[config].loads.append(load)
    model = {
        size: (timings.median_ms("fast", size) or 0.0, timings.images_per_s("fast", size) or 0.0)
        for size in runs
    }
    decode_s = timeit.repeat(lambda: predictor.preprocess([image]), number=1, repeat=50)
    return results, model, 1000 * statistics.median(decode_s), policy.note("all rounds", gate)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    if device is None:
        return 0
    rounds = 1 if args.quick else args.rounds
    run = RunInfo.start(device, args)
    root = Path(tempfile.mkdtemp(prefix="service_speed_"))
    # Raw capacity: the per-key rate limit and the tenant's predictions quota would cap it.
    env = {
        "BIT_DEVICE": device.type,
        "BIT_RATE_LIMIT_PER_MINUTE": "0",
        "BIT_QUOTA_PREDICTIONS_PER_MINUTE": "0",
    }
    model = make_model("R50x1")
    image = photo_jpeg(320, 240)
    apis: list[Api] = []
    references: References | None = None
    try:
        log("starting the API processes (batching on, off) and minimal_api.py")
        apis = [
            start_api("on", root, env, model, args.crop),
            start_api("off", root, {**env, "BIT_DYNAMIC_BATCHING": "false"}, model, args.crop),
        ]
        references = start_references(root, model_directory(apis[0]), device)
        results, model_figures, decode_ms, load_note = measure(
            args, device, apis, references, image, rounds
        )
    except BaseException:
        for api in apis:
            print(api.service.logs(), file=sys.stderr)
        raise
    finally:
        for api in apis:
            api.service.stop()
        if references is not None:
            references.stop()
        shutil.rmtree(root, ignore_errors=True)
    table, targets = report(results, model_figures, decode_ms)
    defaults = Settings()
    body = "\n".join(
        [
            run.header(
                "Prediction through the service · R50x1", args, [load_note],
                threads="API processes: torch's default threads; client in the benchmark process",
            ),
            "- Two API processes (uvicorn, embedded SQLite, rate limit off, "
            "`BIT_DYNAMIC_BATCHING` on / off, "
            f"`BIT_BATCH_MAX_SIZE` {defaults.batch_max_size}, `BIT_BATCH_MAX_WAIT_MS` "
            f"{defaults.batch_max_wait_ms:g}), one R50x1 with random weights at {args.crop} px "
            f"registered in each. Requests: multipart, one {len(image) // 1024} KB 320×240 "
            "JPEG each, top_k 1, encoded once and replayed over keep-alive connections by "
            "benchmarks/replay_client.py in the benchmark process (it shares "
            "the cores: its CPU use is the 'client' column). Model-only rows time the same "
            "model directory on preprocessed batches, in the same rounds. Rounds rotated; "
            f"{rounds} kept round(s); latency percentiles over all kept requests. "
            "Beside them, in the same rounds at c=1: benchmarks/minimal_api.py, two more "
            "uvicorn processes on the same model directory, with an empty route and the "
            "smallest predict endpoint (decode, forward and top-k; no authentication, "
            "middleware or batching), its forward inline on the event loop in one and on a "
            "thread of its own in the other.",
            "",
            table,
            "",
            targets,
        ]
    )  # fmt: skip
    return publish(
        body,
        args.out,
        TAG,
        section_key(device, f"crop-{args.crop}", "quick" if args.quick else "full"),
    )


if __name__ == "__main__":
    sys.exit(main())
