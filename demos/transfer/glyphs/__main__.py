"""Command line: write the glyph upstream's shards.

python -m demos.transfer.glyphs --out /tmp/glyphs [--classes 1000] [--per-class 100]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from demos.transfer.glyphs.classes import DEFAULT_CLASSES
from demos.transfer.glyphs.dataset import generate
from demos.transfer.glyphs.fonts import MissingFontsError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demos.transfer.glyphs",
        description="Write a rendered-glyph upstream dataset as tar shards for `bit pretrain`.",
    )
    parser.add_argument("--out", required=True, help="output folder (shards, classes.txt)")
    parser.add_argument("--classes", type=int, default=DEFAULT_CLASSES, help="character classes")
    parser.add_argument("--per-class", type=int, default=100, help="images per class")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, help="processes (default: all CPUs)")
    parser.add_argument("--shard-size", type=int, default=5000, help="images per shard")
    parser.add_argument(
        "--font-dir",
        action="append",
        help="a folder of .ttf/.otf fonts to use instead of Debian's (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="replace a dataset in --out")
    args = parser.parse_args(argv)
    try:
        result = generate(
            args.out,
            classes=args.classes,
            per_class=args.per_class,
            size=args.size,
            seed=args.seed,
            workers=args.workers,
            shard_size=args.shard_size,
            font_dirs=args.font_dir,
            force=args.force,
        )
    except (MissingFontsError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.num_images} images of {result.num_classes} classes in "
        f"{result.shards} shards to {result.out_dir} in {result.seconds:.1f}s "
        f"({result.num_images / result.render_seconds:.0f} images/s once the classes were "
        f"chosen)\n"
        f"content sha256 {result.content_sha256}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
