"""Inference backends side by side: torch and onnxruntime (every backend installed), model
only and through the service, in the same rounds.

One model (random weights, `engine_speed.make_model`) at 128 px. Model only: a
`Predictor` per backend on that model (`Predictor.from_model(..., backend=...)`; the
kernels folded once, fp32 on a CPU), timed on preprocessed batches: batch-1 latency p50/p99
and images/s at batch 8 and 64. Through the service: one uvicorn API per backend, started
the way tests/e2e/live.py starts one (embedded default, its own temporary BIT_HOME,
`BIT_INFERENCE_BACKEND` set to the backend), the same model registered in each as the
worker registers a finished job; one-image multipart predicts (encoded once, replayed by
replay_client.py) at concurrency 1, 8 and 64, bounded counts, 127.0.0.1 only. The c=1
service overhead of each backend is (service p50 − model-only batch-1 p50) ÷ model-only
batch-1 p50, and request by request from each answer's Server-Timing.

Every round times every backend's model-only calls, then every (API, concurrency) burst,
in an order rotated round by round (predict_speed.measure_model), so all backends see the
same conditions; a round that other processes disturbed runs again (RoundPolicy).

Usage:
    python benchmarks/backend_speed.py                      # ~5 min on 2 CPU cores
    python benchmarks/backend_speed.py --quick              # one round, fewer requests
    python benchmarks/backend_speed.py --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
from many_models import register_model
from predict_speed import Timings, measure_model
from service_speed import Api, Load, ServiceResult, burst

from bit_core.backends import available_backends, onnxruntime_installed, resolve_backend
from bit_core.predict import Predictor
from service.settings import Settings
from tests.e2e.live import LiveService

TAG = "backend_speed"
MODEL_BATCHES = (1, 8, 64)
CONCURRENCY = (1, 8, 64)
REFERENCE = "torch"  # ratios are each backend's figure against this one's


def installed_backends(device: torch.device) -> list[str]:
    """Every backend this machine can run on `device`, the reference first."""
    return available_backends(device)


def model_only(
    arch: str, backends: list[str], crop: int, device: torch.device, cache_dir: Path
) -> dict[str, Predictor]:
    """A predictor per backend, each on its own copy of the seeded model (a predictor
    prepares its model in place)."""
    classes = [f"class{index}" for index in range(NUM_CLASSES)]
    return {
        backend: Predictor.from_model(
            make_model(arch),
            classes,
            crop,
            device=str(device),
            backend=backend,
            onnx_cache_dir=cache_dir,
        )
        for backend in backends
    }


def start_api(backend: str, root: Path, env: dict[str, str], args: argparse.Namespace) -> Api:
    """A live API running `backend`, with the seeded model registered in it."""
    home = root / backend
    service = LiveService(
        home, {"BIT_HOME": str(home), **env, "BIT_INFERENCE_BACKEND": backend}
    ).start()
    api = Api(backend, service)
    api.model_id, _ = register_model(
        home, make_model(args.arch), arch=args.arch, crop=args.crop, name=f"bench-{backend}"
    )
    return api


@dataclass
class Figures:
    """What one backend measured."""

    backend: str
    b1_ms: list[float]  # model-only batch-1 calls
    model_rates: dict[int, float | None]  # model-only images/s by batch
    service: dict[int, ServiceResult]  # by concurrency

    @property
    def b1_p50(self) -> float | None:
        return percentile(self.b1_ms, 50) if self.b1_ms else None

    @property
    def b1_p99(self) -> float | None:
        return percentile(self.b1_ms, 99) if self.b1_ms else None

    def overhead(self) -> float | None:
        """(service c=1 p50 − model-only batch-1 p50) ÷ model-only batch-1 p50."""
        p50, model = self.service[1].p_ms(50), self.b1_p50
        return (p50 - model) / model if p50 is not None and model else None

    def per_request(self) -> tuple[float, float] | None:
        """Latency less the request's own forward, and that forward (p50 ms, c=1)."""
        rest = self.service[1].per_request_ms()
        forward = self.service[1].per_request_ms("forward")
        return (statistics.median(rest), statistics.median(forward)) if rest else None


def counts(args: argparse.Namespace) -> tuple[dict[int, int], dict[int, int], int]:
    """Per round: model-only calls by batch, requests by concurrency; and the rounds."""
    if args.quick:
        return {1: 10, 8: 2, 64: 1}, {1: 10, 8: 32, 64: 64}, 1
    return {1: 30, 8: 5, 64: 2}, {1: 40, 8: 96, 64: 192}, args.rounds


def measure(
    args: argparse.Namespace,
    predictors: dict[str, Predictor],
    apis: list[Api],
    image: bytes,
) -> tuple[dict[str, Figures], str]:
    """Warm-up, then interleaved rounds; the figures by backend and the load note."""
    runs, requests, rounds = counts(args)
    for api in apis:  # loads the model, exports its graph, sees every batch shape once
        log(f"warm-up: API {api.name}")
        for concurrency in CONCURRENCY:
            burst(api, image, concurrency, max(4, concurrency))

    def service_round(index: int) -> dict[tuple[str, int], Load]:
        configs = [(api, c) for c in CONCURRENCY for api in apis]
        shift = index % len(configs)
        loads = {}
        for api, concurrency in configs[shift:] + configs[:shift]:
            log(f"  API {api.name}, c={concurrency}: {requests[concurrency]} requests")
            loads[api.name, concurrency] = burst(api, image, concurrency, requests[concurrency])
        return loads

    gate = quiet_gate("backends", args.max_others, args.block_waits, 30.0)
    pids = [api.pid for api in apis]
    policy = RoundPolicy(
        args.max_others, args.max_redo, exclude=lambda: sum(map(process_cpu_s, pids))
    )
    timings: Timings = measure_model(
        {name: predictor.probabilities for name, predictor in predictors.items()},
        args.crop,
        runs,
        rounds,
        policy,
        extra=service_round,
    )
    figures = {}
    for name in predictors:
        service = {c: ServiceResult() for c in CONCURRENCY}
        for loads in timings.extras:
            for c in CONCURRENCY:
                service[c].loads.append(loads[name, c])
        figures[name] = Figures(
            name,
            [1000 * s for s in timings.calls.get((name, 1), [])],
            {size: timings.images_per_s(name, size) for size in MODEL_BATCHES},
            service,
        )
    return figures, policy.note("all rounds", gate)


# --- report ---------------------------------------------------------------------------------


def _x(value: float | None, reference: float | None) -> str:
    return "—" if not value or not reference else f"{value / reference:.2f}×"


def table(figures: dict[str, Figures]) -> str:
    lines = [
        "| backend | model b1 p50 ms | model b1 p99 ms | model b8 images/s | model b64 images/s "
        "| service c=1 p50 ms | service c=1 p99 ms | c=1 overhead | service c=8 images/s "
        "| service c=64 images/s | failed requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, f in figures.items():
        overhead = f.overhead()
        failed = sum(len(result.errors) for result in f.service.values())
        lines.append(
            f"| {name} | {_num(f.b1_p50)} | {_num(f.b1_p99)} | {_num(f.model_rates[8], 2)} "
            f"| {_num(f.model_rates[64], 2)} | {_num(f.service[1].p_ms(50))} "
            f"| {_num(f.service[1].p_ms(99))} "
            f"| {'—' if overhead is None else f'{overhead:+.1%}'} "
            f"| {_num(f.service[8].images_per_s, 2)} | {_num(f.service[64].images_per_s, 2)} "
            f"| {failed} |"
        )
    reference = figures.get(REFERENCE)
    for name, f in figures.items():
        if reference is None or name == REFERENCE:
            continue
        r = reference
        # Latency: reference ÷ backend (> 1: the backend is faster); throughput: backend ÷ ref.
        lines.append(
            f"| **{name} ÷ {REFERENCE}** (speed-up) | **{_x(r.b1_p50, f.b1_p50)}** "
            f"| {_x(r.b1_p99, f.b1_p99)} | **{_x(f.model_rates[8], r.model_rates[8])}** "
            f"| **{_x(f.model_rates[64], r.model_rates[64])}** "
            f"| **{_x(r.service[1].p_ms(50), f.service[1].p_ms(50))}** "
            f"| {_x(r.service[1].p_ms(99), f.service[1].p_ms(99))} | — "
            f"| **{_x(f.service[8].images_per_s, r.service[8].images_per_s)}** "
            f"| **{_x(f.service[64].images_per_s, r.service[64].images_per_s)}** | — |"
        )
    return "\n".join(lines)


def findings(figures: dict[str, Figures], device: torch.device) -> str:
    """Which backend was faster, each backend's c=1 overhead, and what `auto` picks."""
    lines = []

    def fastest(what: str, value: dict[str, float | None], lower: bool) -> None:
        known = {name: v for name, v in value.items() if v}
        if len(known) < 2:
            return
        best = (min if lower else max)(known, key=lambda name: known[name])
        margins = ", ".join(
            f"{(v / known[best] if lower else known[best] / v):.2f}× {name}"
            for name, v in known.items()
            if name != best
        )
        lines.append(f"- Faster {what}: **{best}** ({margins}).")

    measures: list[tuple[str, Callable[[Figures], float | None], bool]] = [
        ("at batch 1 (model-only p50)", lambda f: f.b1_p50, True),
        ("at batch 8 (model-only images/s)", lambda f: f.model_rates[8], False),
        ("at batch 64 (model-only images/s)", lambda f: f.model_rates[64], False),
        ("through the service at c=1 (p50)", lambda f: f.service[1].p_ms(50), True),
        ("through the service at c=8 (images/s)", lambda f: f.service[8].images_per_s, False),
        ("through the service at c=64 (images/s)", lambda f: f.service[64].images_per_s, False),
    ]
    for what, value, lower in measures:
        fastest(what, {name: value(f) for name, f in figures.items()}, lower)
    for name, f in figures.items():
        split = f.per_request()
        overhead = f.overhead()
        if overhead is None or split is None:
            continue
        rest, forward = split
        lines.append(
            f"- c=1 service overhead, {name}: p50 {f.service[1].p_ms(50):.1f} ms vs model-only "
            f"batch 1 {f.b1_p50:.1f} ms → {overhead:+.1%}; request by request (Server-Timing), "
            f"latency less its own forward +{rest:.1f} ms = {rest / forward:.1%} of that "
            f"forward ({forward:.1f} ms)."
        )
    lines.append(
        f"- `BIT_INFERENCE_BACKEND=auto` resolves to **{resolve_backend('auto', device)}** on "
        f"this {device.type.upper()} (bit_core/backends.py `resolve_backend`)."
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--arch", default="R50x1")
    parser.add_argument("--crop", type=int, default=128, help="the model's input side (128)")
    parser.add_argument("--quick", action="store_true", help="one round, fewer requests")
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    if device is None:
        return 0
    backends = installed_backends(device)
    run = RunInfo.start(device, args)
    root = Path(tempfile.mkdtemp(prefix="backend_speed_"))
    env = {
        "BIT_DEVICE": device.type,
        "BIT_RATE_LIMIT_PER_MINUTE": "0",
        "BIT_QUOTA_PREDICTIONS_PER_MINUTE": "0",
    }
    image = photo_jpeg(320, 240)
    apis: list[Api] = []
    try:
        log(f"starting an API per backend: {', '.join(backends)}")
        for backend in backends:
            apis.append(start_api(backend, root, env, args))
        predictors = model_only(args.arch, backends, args.crop, device, root / "onnx")
        figures, load_note = measure(args, predictors, apis, image)
    except BaseException:
        for api in apis:
            print(api.service.logs(), file=sys.stderr)
        raise
    finally:
        for api in apis:
            api.service.stop()
        shutil.rmtree(root, ignore_errors=True)
    defaults = Settings()
    mode = "quick" if args.quick else "full"
    runs, requests, rounds = counts(args)
    body = "\n".join(
        [
            run.header(
                f"Inference backends · {args.arch} · {mode} run", args, [load_note],
                threads=(
                    f"torch threads {torch.get_num_threads()} in every process, ONNX Runtime "
                    "as many per session; client in the benchmark process"
                ),
            ),
            f"- Backends: {', '.join(backends)} (every one that runs on this device; onnxruntime "
            f"{_ort_version()}). Random weights (seed 0), {NUM_CLASSES}-class head, "
            f"{args.crop} px, fp32, kernels standardized once. Model only: `Predictor."
            "probabilities` on preprocessed random batches; images/s = batch ÷ median call. "
            f"Service: one API per backend (uvicorn, embedded SQLite, rate limit off, "
            f"`BIT_BATCH_MAX_SIZE` {defaults.batch_max_size}, dynamic batching on), "
            f"one {len(image) // 1024} KB 320×240 JPEG per request, top_k 1. Per round and "
            "backend: model-only calls "
            + ", ".join(f"{n} × batch {b}" for b, n in runs.items())
            + "; requests "
            + ", ".join(f"{n} at c={c}" for c, n in requests.items())
            + f". Rounds rotated; {rounds} kept round(s); percentiles over all kept calls. "
            "Ratios: latency as reference ÷ backend, throughput as backend ÷ reference "
            "(> 1: the backend is faster).",
            "",
            table(figures),
            "",
            findings(figures, device),
        ]
    )  # fmt: skip
    return publish(body, args.out, TAG, section_key(device, args.arch, f"crop-{args.crop}", mode))


def _ort_version() -> str:
    if not onnxruntime_installed():
        return "not installed"
    import onnxruntime

    return str(onnxruntime.__version__)


if __name__ == "__main__":
    sys.exit(main())
