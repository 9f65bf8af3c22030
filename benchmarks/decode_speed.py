"""Decoding user photos: the decode before vs the reduced-scale decode now, side by side.

Every image the service handles is decoded by `bit_core.images`: training's preload and
loader workers, evaluation and the served predictor through `load_square` (decode, then
resize to the size the model needs), the upload check through `open_image`. A large JPEG
is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's scaled inverse DCT), never below
`REDUCING_GAP` times the size the caller needs. Measured on generated photo-like JPEGs,
from the service benchmark's 320×240 up to a 12 MP phone photo, interleaved round by round:

* before: the code until 2026-12-02: a full-size decode, a copy for the EXIF rotation and
  another for the RGB conversion (each a fresh buffer: 36 MB at 12 MP), then Pillow's
  bilinear resize;
* full: `open_image(data)` at full size (no copies), then `resize_square` (torch's uint8
  kernel for the same filter, on x86 with AVX2);
* reduced: `load_square(data, size)`, as training, evaluation and prediction call it: the
  same as full, from a reduced-scale decode;
* the upload check: the same three, without the resize; `reduced` is
  `open_image(data, min_side=1)` (the smallest scale).

The pixel columns compare reduced with before: how far what the model sees now is from
what it saw (0-255 levels). Decoding and resizing run on the calling thread, so these are
per-core figures: a 2-core machine does about twice as many at once.

Usage:
    python benchmarks/decode_speed.py                      # ~2 min on 2 CPU cores
    python benchmarks/decode_speed.py --quick
    python benchmarks/decode_speed.py --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
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
    add_load_args,
    log,
    photo_jpeg,
    publish,
    quiet_gate,
    section_key,
)
from PIL import Image, ImageOps

from bit_core.images import REDUCING_GAP, TORCH_RESIZE, load_square, open_image, resize_square

TAG = "decode_speed"
# (width, height): the service benchmark's image, a 1.2 MP camera frame, a 12 MP phone photo.
PHOTOS = ((320, 240), (1280, 960), (4032, 3024))
# The model's crop when serving (128, 384) and the training resize of large images (448).
SIZES = (128, 384, 448)
UPLOAD_CHECK = 0  # the row size that stands for the upload check (no resize)


def open_before(data: bytes) -> Image.Image:
    """`open_image` as it was for an RGB JPEG: full size, two copies (the pixels are the
    same as `open_image(data)`'s)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        upright = ImageOps.exif_transpose(image) or image  # a copy when already upright
        return upright.convert("RGB")  # another copy when already RGB


def square_before(image: Image.Image, size: int) -> np.ndarray:
    """The resize and layout of `load_square` before: Pillow's."""
    image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def paths(data: bytes, size: int) -> dict[str, Callable[[], object]]:
    """The three ways to get what a caller of `size` needs from `data`."""
    if size == UPLOAD_CHECK:
        return {
            "before": lambda: open_before(data).close(),
            "full": lambda: open_image(data).close(),
            "reduced": lambda: open_image(data, min_side=1).close(),
        }
    return {
        "before": lambda: square_before(open_before(data), size),
        "full": lambda: resize_square(open_image(data), size),
        "reduced": lambda: load_square(data, size),
    }


@dataclass
class Row:
    """One (photo, size): the kept per-call times of each path, and what the decode gave."""

    photo: tuple[int, int]
    file_kb: int
    size: int
    decoded: tuple[int, int]  # the reduced path's decoded (width, height)
    mean_level: float | None  # mean |reduced - before| over the output, 0-255
    max_level: int | None
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median_ms(self, path: str) -> float:
        return 1000 * statistics.median(self.seconds[path])


def make_row(photo: tuple[int, int], data: bytes, size: int) -> Row:
    side = 1 if size == UPLOAD_CHECK else REDUCING_GAP * size
    decoded = open_image(data, min_side=side).size
    if size == UPLOAD_CHECK:
        return Row(photo, len(data) // 1024, size, decoded, None, None)
    before = square_before(open_before(data), size)
    difference = np.abs(load_square(data, size).astype(np.int16) - before)
    return Row(
        photo, len(data) // 1024, size, decoded, float(difference.mean()), int(difference.max())
    )


def time_round(rows: list[Row], photos: dict[tuple[int, int], bytes], index: int) -> None:
    """Each (photo, size), every path, in an order rotated by round; ~0.2 s per path."""
    for row in rows:
        calls = paths(photos[row.photo], row.size)
        names = list(calls)
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            call = calls[name]
            began = time.perf_counter()
            call()
            once = time.perf_counter() - began
            repeats = max(1, min(50, int(0.2 / max(once, 1e-4))))
            began = time.perf_counter()
            for _ in range(repeats):
                call()
            row.seconds.setdefault(name, []).append((time.perf_counter() - began) / repeats)


def table(rows: list[Row]) -> str:
    lines = [
        "| photo | file KB | needed | decoded at | before ms | full ms | reduced ms "
        "| before ÷ reduced | full ÷ reduced | mean \\|Δ\\| levels | max \\|Δ\\| levels |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        needed = "upload check" if row.size == UPLOAD_CHECK else f"{row.size} px square"
        scale = row.photo[0] / row.decoded[0]
        decoded = f"{row.decoded[0]}×{row.decoded[1]} (1/{scale:.0f})"
        before, full, reduced = (row.median_ms(p) for p in ("before", "full", "reduced"))
        lines.append(
            f"| {row.photo[0]}×{row.photo[1]} | {row.file_kb} | {needed} | {decoded} "
            f"| {before:.2f} | {full:.2f} | {reduced:.2f} | {before / reduced:.2f}× "
            f"| {full / reduced:.2f}× "
            f"| {_num(row.mean_level, 2)} | {'—' if row.max_level is None else row.max_level} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write/update this run's section in a file")
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--rounds", type=int, default=5)
    add_load_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu")  # Pillow decodes on the CPU, whatever trains or serves
    rounds = 1 if args.quick else args.rounds
    run = RunInfo.start(device, args)
    photos = {photo: photo_jpeg(*photo) for photo in PHOTOS}
    rows = [make_row(photo, photos[photo], size) for photo in PHOTOS for size in SIZES]
    rows += [make_row(photo, photos[photo], UPLOAD_CHECK) for photo in PHOTOS]
    for row in rows:  # warm-up: every path once
        for call in paths(photos[row.photo], row.size).values():
            call()
    gate = quiet_gate("decode", args.max_others, args.block_waits, 30.0)
    policy = RoundPolicy(args.max_others, args.max_redo)
    log(f"timing {len(rows)} rows × 3 paths, {rounds} round(s)")
    policy.run(rounds, lambda index: time_round(rows, photos, index))
    body = "\n".join(
        [
            run.header(
                "Decoding user photos", args, [policy.note("all rounds", gate)],
                threads="one decoding thread",
            ),
            "- Generated photo-like JPEGs (smooth colour blobs + noise, quality 90). 'before': "
            "the decode until 2026-12-02 (full size, a copy for the EXIF rotation and one for "
            "the RGB conversion, then Pillow's bilinear resize); 'full': full size, no "
            "copies, then `resize_square` (torch's uint8 kernel for Pillow's filter: "
            f"{'used' if TORCH_RESIZE else 'not used, no AVX2'} here); 'reduced': "
            "`load_square` now (the same from a JPEG decoded at 1/2, 1/4 or 1/8 scale, never "
            f"below {REDUCING_GAP}× the needed size). Upload check: the decode alone, "
            "'reduced' at the smallest scale. Median time per call over the kept rounds, the "
            f"three paths interleaved, their order rotated; {rounds} kept round(s). "
            "|Δ|: reduced vs before, in 0-255 levels.",
            "",
            table(rows),
        ]
    )  # fmt: skip
    return publish(
        body,
        args.out,
        TAG,
        section_key(device, "quick" if args.quick else "full"),
    )


if __name__ == "__main__":
    sys.exit(main())
