"""Many linear models of one base behind one API: stored whole (before) or as heads that
share the base (after), beside a single model under the same load.

A random base is written as an official-format `.npz` and read back, as a linear
fine-tune reads its base; every model is that backbone with a random head of its own,
registered in a live API's database the way the worker registers a finished linear job
(a succeeded job row, `model_row`, `add_model`). Uvicorn APIs, each in its own temporary
BIT_HOME, configured only through the environment (model cache budget and inference
backend left at their defaults, as a user runs them):

* **single**: one model; every request goes to it (the reference);
* **after**: N models stored as head + shared base (`save_shared_linear`, `ArtifactBaseStore`);
* **before**: whole models (`save_model`: a full copy of the backbone each), as linear
  models were stored before bases were shared; as many as the model cache holds, the best
  case for them;
* **before-all**: all N models stored whole, more than the cache holds; measured last, with
  the other APIs stopped, in one burst (see below).

The load: concurrency 64, one-image multipart predicts (encoded once per model and replayed
by replay_client.py), the requests of a burst spread round-robin over the API's models,
bounded counts, 127.0.0.1 only. Rounds rotate the APIs and run again when other processes
disturbed them (RoundPolicy). Reported per API: images/s, p50/p99, the API process's
resident memory (VmRSS after warm-up and at the end, VmHWM), and, for before and after, the
time from a fresh model's registration (its job committed as succeeded) to its first
answer, with the base already loaded.

Whole models, with the ONNX Runtime backend: every whole model's backbone would be exported
to ONNX on its first load (seconds each); its graph is the base's, so the benchmark links
the base's exported graph under every model's sha256 in the API's ONNX cache: the steady
state after each model's first load. The fresh models timed to their first answer are not
linked: their export is part of that time, as it is for a user.

More whole models than the cache holds, under concurrency, cost memory without bound:
every request in flight loads a whole model of its own. An API whose resident memory
passes `--rss-cap-gib` is killed (the machine is shared) and reported as such, with what it
served until then.

Usage:
    python benchmarks/many_models.py                      # 200 models, ~5 min on 2 cores
    python benchmarks/many_models.py --quick              # 8 models, a minute or two
    python benchmarks/many_models.py --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from common import (
    RoundPolicy,
    RunInfo,
    _num,
    log,
    photo_jpeg,
    pick_device,
    process_cpu_s,
    publish,
    quiet_gate,
    script_parser,
    section_key,
)
from engine_speed import NUM_CLASSES
from replay_client import ReplayConnection, ReplayError, encode
from service_speed import Load, ServiceResult, _batch_counters, server_timing

from bit_core import create_model, load_bit_npz
from bit_core.backends import (
    cached_features_onnx,
    make_features,
    onnx_cache_path,
    resolve_backend,
)
from bit_core.checkpoint import ModelInfo, save_model, save_shared_linear, weights_file_of
from bit_core.predict import head_of
from bit_core.resnetv2 import ResNetV2
from service.db.artifacts import store_for
from service.db.models import Job
from service.db.session import session_scope
from service.jobs.status import JobStatus
from service.models.bases import ArtifactBaseStore
from service.models.service import add_model, model_row
from service.settings import Settings
from tests.e2e.live import LiveService
from tests.factories import make_bit_npz

TAG = "many_models"
TENANT = "e2e"  # the tenant of the key LiveService creates
BASE_NAME = "bench-base"
TARGET_THROUGHPUT = 0.80  # after images/s ÷ single-model images/s
TARGET_MEMORY = 1.2  # after resident memory ÷ one model's
VARIANTS = {
    "single": "single model (reference): every request to one model",
    "after": "after: head + shared base",
    "before": "before: whole models, as many as the cache holds",
    "before-all": "before: every model stored whole",
}
GIB = 1024**3


# --- models, registered as the worker registers a finished linear job ----------------------


def base_model(npz: Path, arch: str) -> ResNetV2:
    """The base read from its official-format file, as a linear fine-tune reads it."""
    model = create_model(arch, NUM_CLASSES)
    load_bit_npz(model, npz, load_head=False)
    return model


def set_random_head(model: ResNetV2, seed: int) -> None:
    """A head of its own (a fitted head is not zero: predictions then differ per model)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = model.head.conv.weight
        weight.copy_(0.01 * torch.randn(weight.shape, generator=generator))
        model.head.conv.bias.copy_(0.1 * torch.randn(NUM_CLASSES, generator=generator))


def register_model(
    home: Path,
    model: ResNetV2,
    *,
    arch: str,
    crop: int,
    name: str,
    shared: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Store `model` under `home` and commit a succeeded job with its model row, as the
    worker does at the end of a run; returns (model id, sha256 of its weights file). With
    `shared` ({"sha256", "name"} of a stored base) only the head is stored, else the whole
    model."""
    settings = Settings(home=home)
    store = store_for(settings)
    key = f"models/{name}"
    directory = store.local_dir(key)
    info = ModelInfo(
        arch=arch,
        classes=[f"class{index}" for index in range(NUM_CLASSES)],
        crop=crop,
        base_model=BASE_NAME,
        plan={"mode": "linear", "crop": crop},
    )
    if shared is None:
        info = save_model(directory, model, info)
    else:
        info = save_shared_linear(directory, model, info, shared)
    store.publish_dir(key, directory)
    size = (directory / weights_file_of(info)).stat().st_size
    with session_scope(settings.database_url) as session:
        job = Job(
            tenant=TENANT,
            kind="finetune",
            status=JobStatus.SUCCEEDED,
            base_model=BASE_NAME,
            mode="linear",
            params={"model_name": name},
            progress=1.0,
        )
        session.add(job)
        session.flush()
        row = add_model(session, model_row(info, job=job, uri=key, size_bytes=size))
        job.model_id = row.id
        return int(row.id), info.sha256


def stored_bytes(home: Path) -> int:
    """Bytes of the artifact store's models and bases under `home`."""
    root = Path(Settings(home=home).artifacts_url)
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def link_onnx_graphs(home: Path, model: ResNetV2, sha256s: list[str]) -> None:
    """Put one exported graph of the shared backbone under every whole model's sha256 in the
    API's ONNX cache (hard links: one file on disk), as after each model's first load."""
    cache = Settings(home=home).onnx_cache_dir
    # A copy: the export standardizes the kernels of the model it is given in place.
    first = cached_features_onnx(copy.deepcopy(model), sha256s[0], cache)
    for sha256 in sha256s[1:]:
        target = onnx_cache_path(cache, sha256)
        if not target.exists():
            os.link(first, target)


# --- the APIs and their memory ------------------------------------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (KiB) of a live process ({} once it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


@dataclass
class Variant:
    """One API process, its models and what was measured on it."""

    name: str
    service: LiveService
    model_ids: list[int] = field(default_factory=list)
    raws: list[bytes] = field(default_factory=list)  # one encoded predict per model
    cursor: int = 0  # the next model of the round-robin, across bursts
    result: ServiceResult = field(default_factory=ServiceResult)
    warm_kib: dict[str, int] = field(default_factory=dict)
    end_kib: dict[str, int] = field(default_factory=dict)
    peak_seen_kib: int = 0  # highest VmRSS sampled by the watchdog
    stopped: str = ""  # why the API was stopped, if it was
    first_answer_s: list[float] = field(default_factory=list)
    stored_bytes: int = 0

    @property
    def pid(self) -> int:
        return self.service.api.pid if self.service.api is not None else 0

    def encode_requests(self, image: bytes) -> None:
        self.raws = [predict_request(self.service, model_id, image) for model_id in self.model_ids]


def predict_request(service: LiveService, model_id: int, image: bytes) -> bytes:
    return encode(
        httpx.Request(
            "POST",
            f"{service.url}/v1/predict",
            headers={"Authorization": f"Bearer {service.key}"},
            files=[("files", ("image.jpg", image, "image/jpeg"))],
            data={"model_id": str(model_id), "top_k": "1"},
        )
    )


class MemoryWatch:
    """Samples an API's VmRSS while a burst runs; kills it when it passes the cap."""

    def __init__(self, cap_kib: int) -> None:
        self.cap_kib = cap_kib

    @contextlib.contextmanager
    def watching(self, variant: Variant) -> Iterator[None]:
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.1):  # sampling period; a load adds well under 1 GiB in it
                rss = memory_kib(variant.pid).get("VmRSS", 0)
                variant.peak_seen_kib = max(variant.peak_seen_kib, rss)
                if rss > self.cap_kib and not variant.stopped:
                    cap_gib = self.cap_kib / 1024**2
                    variant.stopped = (
                        f"killed at {rss / 1024**2:.1f} GiB resident (cap {cap_gib:.0f} GiB)"
                    )
                    log(f"{variant.name}: {variant.stopped}")
                    os.killpg(variant.pid, signal.SIGKILL)
                    return

        thread = threading.Thread(target=watch, name=f"rss-{variant.name}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


# --- the load -------------------------------------------------------------------------------


async def _burst(variant: Variant, concurrency: int, requests: int) -> Load:
    """`requests` predicts, `concurrency` in flight, request k to model (cursor + k) mod N."""
    latencies: list[float] = []
    stages: list[dict[str, float]] = []  # each answer's Server-Timing: decode, wait, forward
    errors: list[str] = []
    todo = iter(range(requests))
    start, count = variant.cursor, len(variant.raws)
    connections = [ReplayConnection(variant.service.url) for _ in range(concurrency)]

    async def one_client(connection: ReplayConnection) -> None:
        for k in todo:  # shared by the clients: `requests` predicts in all
            began = time.perf_counter()
            try:
                answer = await connection.send(variant.raws[(start + k) % count])
            except ReplayError as exc:
                errors.append(f"{exc} after {time.perf_counter() - began:.0f} s")
                if variant.stopped:
                    return
                continue
            if answer.status != 200:
                errors.append(f"{answer.status} after {time.perf_counter() - began:.0f} s")
                continue
            latencies.append(time.perf_counter() - began)
            stages.append(server_timing(answer.headers.get("server-timing", "")))

    own = resource.getrusage(resource.RUSAGE_SELF)
    server0, began = process_cpu_s(variant.pid), time.perf_counter()
    try:
        await asyncio.gather(*(one_client(c) for c in connections))
    finally:
        wall = time.perf_counter() - began
        own_after = resource.getrusage(resource.RUSAGE_SELF)
        server = process_cpu_s(variant.pid) - server0
        await asyncio.gather(*(c.close() for c in connections))
    variant.cursor = (start + requests) % count
    client_s = own_after.ru_utime + own_after.ru_stime - own.ru_utime - own.ru_stime
    return Load(latencies, [], stages, errors, wall, client_s / wall, server / wall, (0.0, 0.0))


def burst(watch: MemoryWatch, variant: Variant, concurrency: int, requests: int) -> Load:
    """One burst, its memory watched; with the forwards it took and their images."""
    with variant.service.client() as client, watch.watching(variant):
        before = _batch_counters(client)
        load = asyncio.run(_burst(variant, concurrency, requests))
        after = _batch_counters(client)
    load.batches = (after[0] - before[0], after[1] - before[1])
    return load


def time_first_answer(variant: Variant, setup: Setup, image: bytes) -> float:
    """Register a fresh model, then time from its commit to its first answer (c=1)."""
    model_id, _ = setup.register(variant.name)  # returns once its job row is committed
    committed = time.perf_counter()
    raw = predict_request(variant.service, model_id, image)

    async def ask() -> int:
        connection = ReplayConnection(variant.service.url)
        try:
            return (await connection.send(raw)).status
        finally:
            await connection.close()

    status = asyncio.run(ask())
    if status != 200:
        raise RuntimeError(
            f"{variant.name}: the first predict of fresh model {model_id} answered {status}; "
            f"the API log is under {variant.service.home}"
        )
    return time.perf_counter() - committed


# --- setting up the APIs -------------------------------------------------------------------


def cached_bytes(model: ResNetV2, backend: str, device: torch.device, scratch: Path) -> int:
    """What the API's model cache counts for one whole model on `backend`: the loaded
    backbone's `nbytes` and the head's, from the very objects the cache builds."""
    # A copy: the backbone is prepared in place (kernels standardized).
    features = make_features(
        copy.deepcopy(model), "0" * 64, backend=backend, device=device, onnx_cache_dir=scratch
    )
    weight, bias = head_of(model)
    return features.nbytes + weight.nbytes + bias.nbytes


@dataclass
class Plan:
    """How much of everything one run does."""

    models: int
    before_models: int  # whole models in the before API: as many as the cache holds
    before_all: bool  # also every model stored whole, in an API of its own, at the end
    concurrency: int
    requests: dict[str, int]  # per burst, by variant
    rounds: int
    fresh: int  # fresh models timed to their first answer, per variant


def plan_for(args: argparse.Namespace, cache_fits: int) -> Plan:
    """`cache_fits`: how many whole models the default model cache budget holds."""
    if args.quick:
        models = args.models or 8
        requests = {"single": 64, "after": 64, "before": 64, "before-all": 32}
        rounds, fresh = 1, 2
    else:
        models = args.models or 200
        requests = {"single": 384, "after": 384, "before": 384, "before-all": 128}
        rounds, fresh = args.rounds, 5
    before = min(models, args.before_models or cache_fits)
    before_all = not args.skip_before and not args.skip_before_all and before < models
    return Plan(models, before, before_all, args.concurrency, requests, rounds, fresh)


@dataclass
class Setup:
    """The base and the APIs' homes: what fresh models are registered with."""

    root: Path
    arch: str
    crop: int
    model: ResNetV2  # the base; its head is set anew for every model
    env: dict[str, str]
    shared: dict[str, dict[str, str]] = field(default_factory=dict)  # base ref per variant
    serial: int = 0

    def home(self, name: str) -> Path:
        return self.root / name

    def register(self, name: str) -> tuple[int, str]:
        """A new model with a head of its own in variant `name`'s API."""
        self.serial += 1
        set_random_head(self.model, self.serial)
        return register_model(
            self.home(name),
            self.model,
            arch=self.arch,
            crop=self.crop,
            name=f"{name}-{self.serial}",
            shared=self.shared.get(name),
        )

    def start(self, name: str, count: int, backend: str) -> Variant:
        home = self.home(name)
        service = LiveService(home, {"BIT_HOME": str(home), **self.env}).start()
        variant = Variant(name, service)
        whole = name.startswith("before")
        if not whole:  # the base stored once, as the worker's first linear job does
            store = store_for(Settings(home=home))
            self.shared[name] = ArtifactBaseStore(store).put(
                self.model, arch=self.arch, name=BASE_NAME
            )
        log(f"{name}: registering {count} model(s)")
        registered = [self.register(name) for _ in range(count)]
        variant.model_ids = [model_id for model_id, _ in registered]
        if whole and backend == "onnxruntime":
            link_onnx_graphs(home, self.model, [sha256 for _, sha256 in registered])
        variant.stored_bytes = stored_bytes(home)
        return variant


# --- measuring ------------------------------------------------------------------------------


def warm_up(watch: MemoryWatch, variant: Variant, plan: Plan) -> None:
    """Every model once (the single model: every batch shape), then memory after warm-up."""
    log(f"warm-up: {variant.name}")
    if variant.name == "single":
        for concurrency in (1, 8, plan.concurrency):
            burst(watch, variant, concurrency, max(4, concurrency))
    else:
        burst(watch, variant, plan.concurrency, max(len(variant.model_ids), plan.concurrency))
    variant.warm_kib = memory_kib(variant.pid)


def measure(
    args: argparse.Namespace, setup: Setup, variants: list[Variant], plan: Plan, image: bytes
) -> str:
    """Interleaved rounds of the load, then the fresh models' first answers; returns the
    load note."""
    watch = MemoryWatch(int(args.rss_cap_gib * 1024**2))
    for variant in variants:
        variant.encode_requests(image)
        warm_up(watch, variant, plan)
    gate = quiet_gate("many models", args.max_others, args.block_waits, 30.0)
    pids = [variant.pid for variant in variants]
    policy = RoundPolicy(
        args.max_others, args.max_redo, exclude=lambda: sum(map(process_cpu_s, pids))
    )

    def one_round(index: int) -> dict[str, Load]:
        live = [variant for variant in variants if not variant.stopped]
        shift = index % len(live)
        loads = {}
        for variant in live[shift:] + live[:shift]:
            count = plan.requests[variant.name]
            log(f"  {variant.name}: {count} requests at c={plan.concurrency}")
            loads[variant.name] = burst(watch, variant, plan.concurrency, count)
        return loads

    by_name = {variant.name: variant for variant in variants}
    for loads in policy.run(plan.rounds, one_round):
        for name, load in loads.items():
            by_name[name].result.loads.append(load)
    for variant in variants:
        variant.end_kib = memory_kib(variant.pid)

    # Time to a fresh model's first answer: the base (after) already loaded, the API idle.
    timed = [v for v in variants if v.name in ("after", "before") and not v.stopped]

    def fresh_round(index: int) -> dict[str, float]:
        seconds = {}
        shift = index % len(timed)
        for variant in timed[shift:] + timed[:shift]:
            seconds[variant.name] = time_first_answer(variant, setup, image)
            log(f"  {variant.name}: fresh model answered {seconds[variant.name]:.2f} s after")
        return seconds

    # The APIs' own work (the load, an export) is what these rounds time, not a disturbance.
    fresh_policy = RoundPolicy(
        args.max_others, args.max_redo, exclude=lambda: sum(map(process_cpu_s, pids))
    )
    for seconds in fresh_policy.run(plan.fresh, fresh_round):
        for name, value in seconds.items():
            by_name[name].first_answer_s.append(value)
    return "; ".join([policy.note("load rounds", gate), fresh_policy.note("first answers")])


def measure_before_all(
    args: argparse.Namespace, setup: Setup, plan: Plan, backend: str, image: bytes
) -> tuple[Variant, str]:
    """Every model stored whole, more than the cache holds: one burst, the API alone on
    the machine (the others stopped), its memory watched; and the load note."""
    variant = setup.start("before-all", plan.models, backend)
    try:
        variant.encode_requests(image)
        watch = MemoryWatch(int(args.rss_cap_gib * 1024**2))
        count = plan.requests["before-all"]
        gate = quiet_gate("before-all", args.max_others, args.block_waits, 30.0)
        policy = RoundPolicy(args.max_others, 0, exclude=lambda: process_cpu_s(variant.pid))
        log(f"  before-all: {count} requests at c={plan.concurrency}")
        (load,) = policy.run(1, lambda _: burst(watch, variant, plan.concurrency, count))
        variant.result.loads.append(load)
        variant.end_kib = memory_kib(variant.pid)
    finally:
        variant.service.stop()
    return variant, policy.note("before-all burst", gate)


# --- report ---------------------------------------------------------------------------------


def _mib(kib: int | None) -> str:
    return "—" if not kib else f"{kib / 1024:.0f}"


def _seconds(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def _stage_ms(result: ServiceResult, stage: str) -> str:
    """Median over answered requests of one Server-Timing stage (ms)."""
    values = result.per_request_ms(stage)
    return _num(statistics.median(values)) if values else "—"


def peak_kib(variant: Variant) -> int:
    """VmHWM at the end, or the highest VmRSS sampled (a killed process has no VmHWM)."""
    return variant.end_kib.get("VmHWM") or variant.peak_seen_kib


def table(variants: list[Variant]) -> str:
    lines = [
        "| API | models | stored MB | answered / sent | images/s | p50 ms | p99 ms "
        "| VmRSS after warm-up MB | VmRSS at end MB | VmHWM MB | first answer after "
        "registration, s: median (min–max) | mean forward batch | request's forward / wait "
        "ms p50 | images/s by round | client / server cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in variants:
        result = variant.result
        sent = len(result.latencies) + len(result.errors)
        cores = "—"
        if result.loads and not variant.stopped:  # a killed process's CPU time is gone
            client, server = result.cores()
            cores = f"{client:.2f} / {server:.2f}"
        end = _mib(variant.end_kib.get("VmRSS")) if not variant.stopped else "killed"
        lines.append(
            f"| {VARIANTS[variant.name]} | {len(variant.model_ids)} "
            f"| {variant.stored_bytes / 1024**2:.0f} | {len(result.latencies)} / {sent} "
            f"| {_num(result.images_per_s, 2)} | {_num(result.p_ms(50))} | {_num(result.p_ms(99))} "
            f"| {_mib(variant.warm_kib.get('VmRSS'))} | {end} | {_mib(peak_kib(variant))} "
            f"| {_seconds(variant.first_answer_s)} | {_num(result.mean_batch)} "
            f"| {_stage_ms(result, 'forward')} / {_stage_ms(result, 'wait')} "
            f"| {', '.join(f'{len(load.latencies) / load.wall_s:.1f}' for load in result.loads)} "
            f"| {cores} |"
        )
    return "\n".join(lines)


def _times(value: float | None, reference: float | None) -> float | None:
    return value / reference if value and reference else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratios(variants: list[Variant], whole_mb: float) -> str:
    """The issue's targets and before vs after, as lines; `whole_mb`: what the model cache
    counts for one whole model."""
    by_name = {variant.name: variant for variant in variants}
    single, after = by_name["single"], by_name["after"]
    lines = []
    share = _times(after.result.images_per_s, single.result.images_per_s)
    if share is not None:
        met = "met" if share >= TARGET_THROUGHPUT else "NOT met"
        lines.append(
            f"- Throughput, after ÷ single model: {after.result.images_per_s:.2f} ÷ "
            f"{single.result.images_per_s:.2f} images/s = **{share:.0%}** "
            f"(target ≥ {TARGET_THROUGHPUT:.0%}: **{met}**)."
        )
    for label, name in (("at the end", "VmRSS"), ("peak (VmHWM)", "VmHWM")):
        memory = _times(after.end_kib.get(name), single.end_kib.get(name))
        if memory is not None:
            met = "met" if memory < TARGET_MEMORY else "NOT met"
            lines.append(
                f"- Resident memory {label}, after ({len(after.model_ids)} models) ÷ one "
                f"model: {_mib(after.end_kib.get(name))} ÷ {_mib(single.end_kib.get(name))} MB "
                f"= **{memory:.2f}×** (target < {TARGET_MEMORY}×: **{met}**)."
            )
    before = by_name.get("before")
    if before is not None:
        speed = _times(after.result.images_per_s, before.result.images_per_s)
        p99 = _times(before.result.p_ms(99), after.result.p_ms(99))
        memory = _times(peak_kib(before), peak_kib(after))
        first = _times(_median(before.first_answer_s), _median(after.first_answer_s))
        disk = _times(
            before.stored_bytes / len(before.model_ids), after.stored_bytes / len(after.model_ids)
        )
        lines.append(
            f"- Before ({len(before.model_ids)} whole models) → after ({len(after.model_ids)} "
            f"models): images/s **{_num(speed, 2)}×**; p99 before ÷ after **{_num(p99, 2)}×**; "
            f"peak resident memory before ÷ after **{_num(memory, 2)}×**; a fresh model's "
            f"first answer before ÷ after **{_num(first, 0)}×**; stored bytes per model "
            f"before ÷ after **{_num(disk, 0)}×**."
        )
        held = before.end_kib.get("VmRSS", 0) - single.end_kib.get("VmRSS", 0)
        if held > 0 and len(before.model_ids) > 1:
            per_model = held / 1024 / (len(before.model_ids) - 1)
            lines.append(
                f"- Before, each whole model cached beyond the first held {per_model:.0f} MB "
                f"resident (VmRSS at the end, before − single, ÷ {len(before.model_ids) - 1}); "
                f"the model cache counts {whole_mb:.0f} MB for it."
            )
    before_all = by_name.get("before-all")
    if before_all is not None:
        outcome = (
            f"the API was {before_all.stopped}, having answered "
            f"{len(before_all.result.latencies)} of the requests"
            if before_all.stopped
            else f"{_num(before_all.result.images_per_s, 2)} images/s, p99 "
            f"{_num(before_all.result.p_ms(99))} ms"
        )
        wall = before_all.result.loads[0].wall_s if before_all.result.loads else 0.0
        lines.append(
            f"- Before, all {len(before_all.model_ids)} models stored whole (more than the "
            f"cache budget holds: every request in flight loads a whole model): {outcome} "
            f"within {wall:.0f} s; peak resident memory {_mib(peak_kib(before_all))} MB."
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--arch", default="R50x1", help="the base's architecture (R50x1)")
    parser.add_argument("--crop", type=int, default=128, help="the models' input side (128)")
    parser.add_argument("--models", type=int, default=0, help="models of the base (200; 8 quick)")
    parser.add_argument(
        "--before-models",
        type=int,
        default=0,
        help="whole models in the before API (default: as many as the model cache holds)",
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--backend", default="auto", help="BIT_INFERENCE_BACKEND of every API (auto)"
    )
    parser.add_argument(
        "--rss-cap-gib",
        type=float,
        default=8.0,
        help="kill an API whose resident memory passes this (the machine is shared)",
    )
    parser.add_argument("--skip-before", action="store_true", help="no before APIs")
    parser.add_argument(
        "--skip-before-all", action="store_true", help="no API with every model stored whole"
    )
    parser.add_argument("--quick", action="store_true", help="few models, few requests")
    return parser.parse_args(argv)


def describe(
    args: argparse.Namespace, plan: Plan, backend: str, image: bytes, whole_bytes: int
) -> str:
    """The section's paragraph on what ran."""
    defaults = Settings()
    bursts = ", ".join(f"{plan.requests[name]} ({name})" for name in ("single", "after", "before"))
    text = (
        f"- API processes: uvicorn, embedded SQLite, rate limit off, inference backend "
        f"`{args.backend}` → {backend}, model cache budget "
        f"{defaults.model_cache_bytes / GIB:.0f} GiB (the defaults). {plan.models} linear "
        f"models of one random {args.arch} base (an official-format .npz) at {args.crop} px, "
        f"each with a random {NUM_CLASSES}-class head, registered as the worker registers a "
        f"succeeded linear job. Before holds {plan.before_models} whole models: as many as "
        f"the cache budget holds at the {whole_bytes / 1024**2:.0f} MB it counts for each, the "
        "best case for whole models. Load: concurrency "
        f"{plan.concurrency}, one {len(image) // 1024} KB 320×240 JPEG per request, the "
        f"requests of a burst round-robin over the API's models; bursts of {bursts}; "
        f"{plan.rounds} kept round(s), the APIs rotated; latency percentiles over all kept "
        "requests, images/s the median over rounds. Memory: the API process's VmRSS after "
        "warm-up (every model served once) and at the end, and its VmHWM. First answer: "
        f"{plan.fresh} fresh models per API, each registered while the API was idle (after: "
        "its base already loaded), timed from the commit of its succeeded job to its first "
        "answer at c=1."
    )
    if plan.before_all:
        text += (
            f" Then, with the other APIs stopped, an API with all {plan.models} models stored "
            f"whole takes one burst of {plan.requests['before-all']} requests; an API over "
            f"{args.rss_cap_gib:g} GiB resident is killed (the machine is shared)."
        )
    if backend == "onnxruntime":
        text += (
            " Whole models' ONNX graphs: each is the base's graph, linked under the model's "
            "sha256 in the API's ONNX cache before the load (as after each model's first "
            "load); a fresh model's export is part of its first-answer time."
        )
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    if device is None:
        return 0
    backend = resolve_backend(args.backend, device)
    run = RunInfo.start(device, args)
    root = Path(tempfile.mkdtemp(prefix="many_models_"))
    env = {
        "BIT_DEVICE": device.type,
        "BIT_INFERENCE_BACKEND": args.backend,
        "BIT_RATE_LIMIT_PER_MINUTE": "0",
        "BIT_QUOTA_PREDICTIONS_PER_MINUTE": "0",
    }
    npz = make_bit_npz(root / "base.npz", args.arch, NUM_CLASSES)
    setup = Setup(root, args.arch, args.crop, base_model(npz, args.arch), env)
    whole_bytes = cached_bytes(setup.model, backend, device, root / "scratch")
    plan = plan_for(args, Settings().model_cache_bytes // whole_bytes)
    image = photo_jpeg(320, 240)
    names = ["single", "after"] + ([] if args.skip_before else ["before"])
    counts = {"single": 1, "after": plan.models, "before": plan.before_models}
    variants: list[Variant] = []
    try:
        for name in names:
            variants.append(setup.start(name, counts[name], backend))
        notes = [measure(args, setup, variants, plan, image)]
        if plan.before_all:
            for variant in variants:  # alone on the machine: its memory is all it has
                variant.service.stop()
            before_all, note = measure_before_all(args, setup, plan, backend, image)
            variants.append(before_all)
            notes.append(note)
    except BaseException:
        for variant in variants:
            print(variant.service.logs(), file=sys.stderr)
        raise
    finally:
        for variant in variants:
            variant.service.stop()
        shutil.rmtree(root, ignore_errors=True)
    body = "\n".join(
        [
            run.header(
                f"Many linear models of one base · {args.arch}", args, notes,
                threads="API processes: torch's default threads; client in the benchmark process",
            ),
            describe(args, plan, backend, image, whole_bytes),
            "",
            table(variants),
            "",
            ratios(variants, whole_bytes / 1024**2),
        ]
    )  # fmt: skip
    return publish(
        body,
        args.out,
        TAG,
        section_key(
            device,
            args.arch,
            f"crop-{args.crop}",
            f"models-{plan.models}",
            backend,
            "quick" if args.quick else "full",
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
