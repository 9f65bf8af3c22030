"""A synthetic upstream dataset: procedurally drawn shapes x textures x colour palettes.

Each class is one (shape, texture, palette) combination; every image draws that class at a
random position, scale, rotation and aspect, with a random texture phase and orientation,
colours jittered within the palette, a random background and pixel noise. The output is an
ImageFolder of PNGs, the same for the same seed (each image has its own seeded generator):

    python -m demos.transfer.make_upstream --out /tmp/upstream --classes 100 --per-class 100
"""

from __future__ import annotations

import argparse
import colorsys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Shapes as masks over object coordinates (u, v) in about [-1, 1]. Outlines and bars are
# here on purpose: strokes are what handwriting is made of.
SHAPES: dict[str, Mask] = {
    "disk": lambda u, v: np.hypot(u, v) < 0.95,
    "square": lambda u, v: np.maximum(abs(u), abs(v)) < 0.75,
    "triangle": lambda u, v: (v < 0.55) & (v > 1.7 * abs(u) - 1.0),
    "plus": lambda u, v: ((abs(u) < 0.25) & (abs(v) < 0.95)) | ((abs(v) < 0.25) & (abs(u) < 0.95)),
    "ring": lambda u, v: (np.hypot(u, v) < 0.95) & (np.hypot(u, v) > 0.6),
    "bar": lambda u, v: (abs(u) < 0.95) & (abs(v) < 0.22),
    "star": lambda u, v: np.hypot(u, v) < 0.45 + 0.5 * np.cos(5 * np.arctan2(v, u)) ** 8,
    "crescent": lambda u, v: (np.hypot(u, v) < 0.95) & (np.hypot(u - 0.45, v) > 0.75),
    "ell": lambda u, v: (
        ((abs(u + 0.55) < 0.25) & (abs(v) < 0.9)) | ((abs(v - 0.65) < 0.25) & (abs(u) < 0.8))
    ),
    "frame": lambda u, v: (np.maximum(abs(u), abs(v)) < 0.85) & (np.maximum(abs(u), abs(v)) > 0.55),
}
# Texture name -> pattern in [0, 1] over texture coordinates (x, y) and a random phase;
# 0 picks the first foreground colour, 1 the second. Two stripe frequencies make the
# frequency part of the class.
TEXTURES: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "solid": lambda x, y, p: np.zeros_like(x),
    "stripes3": lambda x, y, p: (np.sin(3 * np.pi * x + p) > 0).astype(float),
    "stripes8": lambda x, y, p: (np.sin(8 * np.pi * x + p) > 0).astype(float),
    "checker": lambda x, y, p: (
        (np.sin(4 * np.pi * x + p) > 0) ^ (np.sin(4 * np.pi * y) > 0)
    ).astype(float),
    "dots": lambda x, y, p: (
        np.hypot(np.sin(5 * np.pi * x + p), np.sin(5 * np.pi * y)) < 0.6
    ).astype(float),
}
# Palette name -> hue range (fractions of the colour circle) of the foreground colours.
PALETTES: dict[str, tuple[float, float]] = {"warm": (-0.05, 0.17), "cool": (0.42, 0.75)}
SUPERSAMPLE = 2  # drawn at 2x and averaged down: anti-aliased edges
NOISE_STD = 10.0  # pixel noise, in 0..255 units


def class_names(count: int) -> list[str]:
    """The first `count` (shape, texture, palette) classes, shapes varying fastest.

    So 10 classes are the 10 shapes, 50 add the textures, 100 add the palettes.
    """
    combos = len(SHAPES) * len(TEXTURES) * len(PALETTES)
    if not 1 <= count <= combos:
        raise ValueError(f"classes must be between 1 and {combos}, got {count}")
    shapes, textures, palettes = list(SHAPES), list(TEXTURES), list(PALETTES)
    names = []
    for index in range(count):
        shape = shapes[index % len(shapes)]
        texture = textures[index // len(shapes) % len(textures)]
        palette = palettes[index // (len(shapes) * len(textures))]
        names.append(f"{index:03d}_{shape}_{texture}_{palette}")
    return names


def _colour(rng: np.random.Generator, hues: tuple[float, float]) -> np.ndarray:
    hue = rng.uniform(*hues) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    return np.array(rgb) * 255.0


def draw(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class `name` ('NNN_shape_texture_palette') as uint8 (size, size, 3)."""
    _, shape, texture, palette = name.split("_")
    side = size * SUPERSAMPLE
    grid = (np.arange(side) + 0.5) / side * 2.0 - 1.0
    x, y = np.meshgrid(grid, grid)
    # Object frame: random centre, scale, rotation and aspect (the inverse map to (u, v)).
    cx, cy = rng.uniform(-0.25, 0.25, size=2)
    scale = rng.uniform(0.55, 0.9)
    aspect = rng.uniform(0.8, 1.25)
    angle = rng.uniform(0, 2 * np.pi)
    cos, sin = np.cos(angle), np.sin(angle)
    dx, dy = (x - cx) / scale, (y - cy) / scale
    u = (cos * dx + sin * dy) * aspect
    v = (-sin * dx + cos * dy) / aspect
    mask = SHAPES[shape](u, v)
    # The texture has its own orientation, so stripes are not tied to the shape's edges.
    turn = rng.uniform(0, np.pi)
    tx = np.cos(turn) * x + np.sin(turn) * y
    ty = -np.sin(turn) * x + np.cos(turn) * y
    pattern = TEXTURES[texture](tx, ty, float(rng.uniform(0, 2 * np.pi)))[..., None]
    hues = PALETTES[palette]
    first, second = _colour(rng, hues), _colour(rng, hues)
    if texture != "solid":
        second = 255.0 - first if np.abs(second - first).sum() < 150 else second  # keep it visible
    foreground = first * (1.0 - pattern) + second * pattern
    # Background: a grey level far from the foreground's brightness, with a soft gradient.
    bright = foreground[mask].mean() if mask.any() else 128.0
    level = rng.uniform(0, 70) if bright > 128 else rng.uniform(185, 255)
    gradient = rng.uniform(-25, 25) * x + rng.uniform(-25, 25) * y
    background = np.clip(level + gradient, 0, 255)[..., None].repeat(3, axis=2)
    image = np.where(mask[..., None], foreground, background)
    image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    image = image + rng.normal(0.0, NOISE_STD, size=image.shape)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def generate(
    out_dir: str | Path, *, classes: int = 100, per_class: int = 100, size: int = 32, seed: int = 0
) -> Path:
    """Write `classes` x `per_class` PNGs as `out_dir/<class>/<index>.png`; returns out_dir.

    Image i of class c uses the generator seeded by (seed, c, i): the same file for the same
    arguments, whatever else is generated.
    """
    if per_class < 1 or size < 8:
        raise ValueError("per_class must be at least 1 and size at least 8")
    out = Path(out_dir)
    for label, name in enumerate(class_names(classes)):
        class_dir = out / name
        class_dir.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            rng = np.random.default_rng([seed, label, index])
            Image.fromarray(draw(name, size, rng)).save(class_dir / f"{index:05d}.png")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory (an ImageFolder)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=100, help="images per class")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generate(
        args.out, classes=args.classes, per_class=args.per_class, size=args.size, seed=args.seed
    )
    print(f"wrote {args.classes} x {args.per_class} images of {args.size}px to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
