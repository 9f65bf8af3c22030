"""Prediction speed, model only: batch-1 latency and batch 8/64/256 throughput.

Two paths, interleaved round by round (order rotated) so that load from other processes
hits both alike:

* official: eval mode + `torch.no_grad()`, Weight Standardization on every forward
  (engine_speed.py's `official_infer`);
* fast: `bit_core.predict.Predictor.probabilities` (kernels standardized once,
  inference_mode, the device's layout and precision).

Inputs are preprocessed already (random images in [-1, 1]); decoding is the service's
concern (service_speed.py). `measure_model` is also what service_speed.py uses for its
model-only rows.

Usage:
    python benchmarks/predict_speed.py                      # 128 px b1/8/64/256, 480 px b1/8
    python benchmarks/predict_speed.py --quick              # fewer rounds
    python benchmarks/predict_speed.py --out BENCHMARKS.md  # write/update its section
    python benchmarks/predict_speed.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from common import (
    RoundPolicy,
    RunInfo,
    _num,
    log,
    percentile,
    pick_device,
    publish,
    quiet_gate,
    script_parser,
    section_key,
)
from engine_speed import (
    NUM_CLASSES,
    Infer,
    make_images,
    make_model,
    make_official_model,
    official_infer,
    timed,
)

from bit_core.predict import Predictor

TAG = "predict_speed"
PATHS = {
    "official": "official: eval + no_grad, WS every forward",
    "fast": "fast = Predictor: WS once, inference_mode",
}


@dataclass(frozen=True)
class Plan:
    """Batch sizes at one resolution and how many timed calls of each per round."""

    res: int
    runs: dict[int, int]  # batch size -> timed calls per path per round
    rounds: int


def plans_for(device: torch.device, quick: bool, resolutions: list[int]) -> list[Plan]:
    """CPU: batch 256 at 128 px is ~6 s (fast) and ~15 s (official) a call; 480 px is
    ~0.3 s an image, so only batches 1 and 8 there."""
    rounds = 1 if quick else 3
    plans = []
    for res in resolutions:
        if device.type == "cuda":
            runs = {1: 20, 8: 10, 64: 5, 256: 3}
        elif res <= 224:
            runs = {1: 5, 8: 2, 64: 1, 256: 1}
        else:
            runs = {1: 3, 8: 1}
        plans.append(Plan(res, runs, rounds))
    return plans


def build_path(key: str, arch: str, device: torch.device, res: int) -> Infer:
    if key == "official":
        return official_infer(make_official_model(arch), device)
    classes = [f"class{index}" for index in range(NUM_CLASSES)]
    return Predictor.from_model(
        make_model(arch), classes, res, device=str(device), backend="torch"
    ).probabilities


@dataclass
class Timings:
    """Seconds per call, by path and batch size."""

    calls: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    extras: list[Any] = field(default_factory=list)  # what `extra` returned, kept rounds

    def add(self, key: str, batch: int, seconds: list[float]) -> None:
        self.calls.setdefault((key, batch), []).extend(seconds)

    def median_ms(self, key: str, batch: int) -> float | None:
        calls = self.calls.get((key, batch))
        return 1000 * statistics.median(calls) if calls else None

    def p90_ms(self, key: str, batch: int) -> float | None:
        calls = self.calls.get((key, batch))
        return 1000 * percentile(calls, 90) if calls else None

    def images_per_s(self, key: str, batch: int) -> float | None:
        """batch / median call time."""
        calls = self.calls.get((key, batch))
        return batch / statistics.median(calls) if calls else None


def measure_model(
    infers: dict[str, Infer],
    res: int,
    runs: dict[int, int],
    rounds: int,
    policy: RoundPolicy,
    *,
    extra: Callable[[int], Any] | None = None,
) -> Timings:
    """Warm every path at every batch size once, then interleave `rounds` timed rounds.

    `extra(round_index)`, if given, runs inside each round after the model calls (the
    service benchmark times its HTTP load there, in the same window); what it returns for
    the kept rounds is in `Timings.extras`.
    """
    batches = {size: make_images(size, res) for size in runs}
    for key, infer in infers.items():
        log(f"{res}px {key}: warm-up")
        for size, batch in batches.items():
            timed(infer, batch, 2 if size == 1 else 1)
    order = list(infers)
    timings = Timings()

    def one_round(index: int) -> tuple[dict[tuple[str, int], list[float]], Any]:
        log(f"{res}px: round {index + 1}")
        shift = index % len(order)
        data = {}
        for key in order[shift:] + order[:shift]:
            for size, count in runs.items():
                data[key, size] = timed(infers[key], batches[size], count)[0]
        return data, extra(index) if extra is not None else None

    for data, extras in policy.run(rounds, one_round):
        for (key, size), seconds in data.items():
            timings.add(key, size, seconds)
        timings.extras.append(extras)
    return timings


def _x(value: float | None, reference: float | None, *, latency: bool = False) -> str:
    if not value or not reference:
        return "—"
    return f"{(reference / value if latency else value / reference):.2f}×"


def table(res: int, sizes: list[int], timings: Timings) -> str:
    big = [size for size in sizes if size > 1]
    head = "| px | path | b1 median ms | b1 p90 ms | b1 × official |" + "".join(
        f" b{size} images/s | b{size} × official |" for size in big
    )
    lines = [head, "|---:|---|" + "---:|" * (3 + 2 * len(big))]
    for key, label in PATHS.items():
        cells = [
            _num(timings.median_ms(key, 1)),
            _num(timings.p90_ms(key, 1)),
            _x(timings.median_ms(key, 1), timings.median_ms("official", 1), latency=True),
        ]
        for size in big:
            rate = timings.images_per_s(key, size)
            cells += [_num(rate, 2), _x(rate, timings.images_per_s("official", size))]
        lines.append(f"| {res} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--arch", default="R50x1")
    parser.add_argument("--resolutions", default="128,480", help="comma-separated (128,480)")
    parser.add_argument("--quick", action="store_true", help="one round")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    if device is None:
        return 0
    resolutions = [int(v) for v in args.resolutions.split(",") if v.strip()]
    run = RunInfo.start(device, args)
    tables, notes = [], []
    for plan in plans_for(device, args.quick, resolutions):
        gate = quiet_gate(f"{plan.res} px", args.max_others, args.block_waits, 30.0)
        policy = RoundPolicy(args.max_others, args.max_redo)
        infers = {key: build_path(key, args.arch, device, plan.res) for key in PATHS}
        timings = measure_model(infers, plan.res, plan.runs, plan.rounds, policy)
        tables.append(table(plan.res, list(plan.runs), timings))
        notes.append(policy.note(f"{plan.res} px", gate))
    mode = "quick" if args.quick else "full"
    body = "\n".join(
        [
            run.header(f"Prediction, model only · {args.arch} · {mode} run", args, notes),
            f"- Random weights (seed 0), random preprocessed images in [-1, 1]; "
            f"{NUM_CLASSES}-class head. The two paths are interleaved round by round "
            "(order rotated); each batch size warmed up once per path first. images/s = "
            "batch / median call time. Decoding and resizing are not included "
            "(service_speed.py measures them through the API).",
            "",
            *[part for t in tables for part in (t, "")],
        ]
    )
    return publish(
        body,
        args.out,
        TAG,
        section_key(device, args.arch, mode, f"px-{args.resolutions.replace(',', '-')}"),
    )


if __name__ == "__main__":
    sys.exit(main())
