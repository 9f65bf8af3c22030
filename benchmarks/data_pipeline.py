"""Data pipeline speed: can the input keep up with training?

For each crop (128 and 480 px; resized first to 160 and 512 px, the HyperRule's small-image
and official large-image sizes), measured
side by side and interleaved round by round:

* streamed: `bit_core.data.iterate_batches` through its DataLoader path (JPEG decode and
  resize to precrop in worker processes), then `bit_core.augment.train_batch` (batched
  random crop + flip + [-1, 1]) on the training device — what a large dataset gets;
* preloaded: the same call on its in-memory path (decoded once, gathered per step), then
  the same augmentation — what a few-shot dataset gets;
* training: one `train_loop` step of R50x1 at the same crop (engine_speed.py's
  `LoopTrainer`, its micro × accum), images/s.

"Input headroom" = pipeline images/s ÷ training images/s; above 1 the training step is
never waiting for input. On a CPU machine both share the same cores, so 1/headroom is
also roughly the share of the cores that feeding a run costs.

Usage:
    python benchmarks/data_pipeline.py                      # ~6 min on 2 CPU cores
    python benchmarks/data_pipeline.py --quick
    python benchmarks/data_pipeline.py --out BENCHMARKS.md
    python benchmarks/data_pipeline.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from common import (
    RoundPolicy,
    RunInfo,
    _num,
    log,
    pick_device,
    publish,
    quiet_gate,
    script_parser,
    section_key,
)
from engine_speed import LoopTrainer, counts_for, make_model, synchronize
from PIL import Image

from bit_core import augment, data
from bit_core.data import LabeledImages, StepSampler, iterate_batches
from bit_core.hyperrule import LARGE_RESOLUTION, R152X4_RESOLUTION, SMALL_RESOLUTION

TAG = "data_pipeline"
SOURCE_SIZE = (640, 480)  # width, height of the generated JPEGs


def write_images(directory: Path, count: int, seed: int = 0) -> LabeledImages:
    """`count` JPEGs of smooth colour blobs plus noise (compresses and decodes like a
    photo, unlike pure noise), in two classes."""
    rng = np.random.default_rng(seed)
    width, height = SOURCE_SIZE
    pairs = []
    for index in range(count):
        coarse = rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, 8, (height, width, 3))
        path = directory / f"{index}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        pairs.append((str(path), f"class{index % 2}"))
    return LabeledImages.from_pairs(pairs)


@dataclass
class PipelineRun:
    """Seconds for the batches after the first, and the first's (start-up) seconds."""

    images: int
    seconds: float
    startup_s: float


def pipeline(
    images: LabeledImages, precrop: int, crop: int, batch: int, steps: int,
    device: torch.device, workers: int, *, streamed: bool, seed: int,
) -> PipelineRun:  # fmt: skip
    """One pass of `steps + 1` batches; the first batch (worker start-up, or the one-off
    decode of the preloaded path) is timed apart."""
    sampler = StepSampler(len(images), batch, seed)
    limit = data.PRELOAD_LIMIT_BYTES
    if streamed:
        data.PRELOAD_LIMIT_BYTES = 0  # force the DataLoader path for this few-image set
    try:
        began = time.perf_counter()
        stamps = []
        source = iterate_batches(
            images, sampler, precrop, range(steps + 1), num_workers=workers, device=device
        )
        for step, pixels, _labels in source:
            out = augment.train_batch(pixels, crop, augment.step_generator(seed, step))
            synchronize(device)
            stamps.append(time.perf_counter())
            del out
    finally:
        data.PRELOAD_LIMIT_BYTES = limit
    return PipelineRun(batch * steps, stamps[-1] - stamps[0], stamps[0] - began)


@dataclass
class Block:
    """One resolution's kept rounds."""

    crop: int
    batch: int
    rates: dict[str, list[float]] = field(default_factory=dict)
    startup: dict[str, list[float]] = field(default_factory=dict)

    def rate(self, key: str) -> float | None:
        return statistics.median(self.rates[key]) if self.rates.get(key) else None


def precrop_for(crop: int) -> int:
    """The HyperRule's resize side for this crop (160/128, 448/384, the official 512/480)."""
    for precrop, known in (SMALL_RESOLUTION, LARGE_RESOLUTION, R152X4_RESOLUTION):
        if crop == known:
            return precrop
    return crop + crop // 8


def measure(
    res: int, images: LabeledImages, device: torch.device, args: argparse.Namespace,
    policy: RoundPolicy,
) -> Block:  # fmt: skip
    precrop, crop = precrop_for(res), res
    counts = counts_for(device, res, args.quick)
    batch = counts.micro * counts.accum  # the training step's images
    steps = max(2, args.images_per_round // batch)
    trainer = LoopTrainer(make_model("R50x1"), device, counts, res)
    log(f"{res}px: training warm-up")
    trainer.run(1, warmup=1)
    runners: dict[str, Callable[[int], tuple[int, float, float]]] = {}
    for streamed in (True, False):
        name = "streamed" if streamed else "preloaded"

        def run_pipeline(index: int, streamed: bool = streamed) -> tuple[int, float, float]:
            out = pipeline(
                images, precrop, crop, batch, steps, device, args.workers,
                streamed=streamed, seed=index,
            )  # fmt: skip
            return out.images, out.seconds, out.startup_s

        runners[name] = run_pipeline

    def run_training(_: int) -> tuple[int, float, float]:
        seconds = sum(trainer.run(1))
        return trainer.images_per_step(), seconds, 0.0

    runners["training"] = run_training
    log(f"{res}px: pipeline warm-up")
    for name in ("streamed", "preloaded"):
        runners[name](0)
    order = list(runners)

    def one_round(index: int) -> dict[str, tuple[int, float, float]]:
        log(f"{res}px: round {index + 1}")
        shift = index % len(order)
        return {key: runners[key](index) for key in order[shift:] + order[:shift]}

    block = Block(crop, batch)
    for kept in policy.run(1 if args.quick else args.rounds, one_round):
        for key, (count, seconds, startup) in kept.items():
            block.rates.setdefault(key, []).append(count / seconds)
            block.startup.setdefault(key, []).append(startup)
    return block


def table(blocks: list[Block], workers: int) -> str:
    lines = [
        "| crop (precrop) | batch | path | images/s | rounds min–max | first batch s "
        "| input headroom = images/s ÷ training | > 1? |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    labels = {
        "streamed": f"streamed: DataLoader, {workers} decode workers, + batched augment",
        "preloaded": "preloaded (few-shot sets): gather from memory + batched augment",
        "training": "training: R50x1 train_loop step (forward + backward + SGD)",
    }
    for block in blocks:
        train = block.rate("training")
        precrop = precrop_for(block.crop)
        for key, label in labels.items():
            rates = block.rates.get(key, [])
            rate = block.rate(key)
            spread = f"{min(rates):.1f}–{max(rates):.1f}" if len(rates) > 1 else "—"
            startup = statistics.median(block.startup[key]) if key != "training" else None
            headroom = rate / train if rate and train and key != "training" else None
            verdict = "—" if headroom is None else ("yes" if headroom > 1 else "**no**")
            lines.append(
                f"| {block.crop} ({precrop}) | {block.batch} | {label} | {_num(rate, 1)} "
                f"| {spread} | {_num(startup, 2)} "
                f"| {'—' if headroom is None else f'{headroom:.1f}×'} | {verdict} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--resolutions", default="128,480", help="crops, comma-separated")
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=256, help="generated JPEGs (256)")
    parser.add_argument(
        "--images-per-round", type=int, default=256, help="pipeline images per round (256)"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers (cores)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    if device is None:
        return 0
    run = RunInfo.start(device, args)
    blocks, notes = [], []
    with tempfile.TemporaryDirectory(prefix="data_pipeline_") as directory:
        log(f"writing {args.images} JPEGs of {SOURCE_SIZE[0]}×{SOURCE_SIZE[1]}")
        images = write_images(Path(directory), args.images)
        for res in [int(v) for v in args.resolutions.split(",") if v.strip()]:
            gate = quiet_gate(f"{res} px", args.max_others, args.block_waits, 30.0)
            policy = RoundPolicy(args.max_others, args.max_redo)
            blocks.append(measure(res, images, device, args, policy))
            notes.append(policy.note(f"{res} px", gate))
    body = "\n".join(
        [
            run.header("Data pipeline vs training step · R50x1", args, notes),
            f"- {args.images} generated {SOURCE_SIZE[0]}×{SOURCE_SIZE[1]} JPEGs (quality 90) "
            "on local disk. Pipeline images/s over the batches after the first (the first "
            "batch's time — DataLoader worker start-up, or the preloaded path's one-off "
            "decode of every image — is its own column); batch = the training step's "
            "micro × accum. MixUp is off (the HyperRule turns it on only from 20k images). "
            "Training: engine_speed.py's `fast` row (bit_core.train.train_loop). The three "
            "paths are interleaved round by round (order rotated).",
            "",
            table(blocks, args.workers),
        ]
    )  # fmt: skip
    mode = "quick" if args.quick else "full"
    key = section_key(device, mode, f"px-{args.resolutions.replace(',', '-')}")
    return publish(body, args.out, TAG, key)


if __name__ == "__main__":
    sys.exit(main())
