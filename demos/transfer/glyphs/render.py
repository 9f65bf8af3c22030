"""One glyph image: a character in a font, distorted, grey on grey.

The glyph is drawn at twice the output size with a random stroke weight, then mapped onto
the canvas by one warp that holds a random scale, aspect, rotation, shear, position and a
smooth elastic field; the canvas is halved (anti-aliasing), blurred, and composed as
a foreground grey over a background grey with a gentle gradient, plus pixel noise. Every
choice comes from the generator passed in, so (seed, index) fixes the pixels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from demos.transfer.glyphs.fonts import load_font

SUPERSAMPLE = 2  # the glyph is warped at 2x and halved: anti-aliased edges
FILL = (0.45, 0.9)  # the glyph's longer side, as a fraction of the image side
ASPECT = 0.15  # log-aspect jitter: width x e^a, height / e^a, a in +-ASPECT
# Small: turned far, a character is another (Canadian syllabics are 90-degree turns of
# one shape; n and u, p and d are half-turns).
ROTATION = math.radians(15)
SHEAR = 0.3  # slant, as x += SHEAR * y at most: italics and handwriting lean
# Elastic field: displacements at the nodes of an ELASTIC_CELLS^2 grid, Gaussian with a
# standard deviation up to this fraction of the side, interpolated bilinearly in between.
ELASTIC_CELLS = 4
ELASTIC = 0.035
# Stroke weight: thinned by a 3x3 minimum filter with THIN_P, otherwise thickened by a
# stroke of 0..STROKE_PER_EM x em pixels (so the range scales with the image size).
THIN_P = 0.2
STROKE_PER_EM = 1 / 24
BLUR = (0.0, 0.9)  # Gaussian blur sigma, output pixels
BLUR_STEP = 0.05  # sigma is rounded to this, so the blur matrices can be cached
MIN_CONTRAST = 64  # grey levels between glyph and background at the least
GRADIENT = 30  # the background's linear ramp spans up to +-GRADIENT grey levels
NOISE = (0.0, 12.0)  # pixel noise standard deviation, grey levels
MIN_INK = 3.0  # an image must hold this many full pixels of ink (else the glyph vanished)
MIN_PEAK = 0.6  # the glyph's densest pixel covers at least this much of it


@dataclass(frozen=True)
class Rendered:
    """The image and the glyph's coverage (0..1 per pixel), both (size, size)."""

    image: np.ndarray  # uint8
    coverage: np.ndarray  # float32


def glyph_image(char: str, font_path: Path, em: int, rng: np.random.Generator) -> Image.Image:
    """The character's coverage at `em` with a random stroke weight, cropped to its ink."""
    font = load_font(font_path, em)
    thin = rng.random() < THIN_P
    stroke = 0 if thin else int(rng.integers(0, int(em * STROKE_PER_EM) + 1))
    left, top, right, bottom = (int(v) for v in font.getbbox(char, stroke_width=stroke))
    image = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(image).text(
        (2 - left, 2 - top), char, fill=255, font=font, stroke_width=stroke, stroke_fill=255
    )
    if thin:
        thinner = image.filter(ImageFilter.MinFilter(3))
        # A hairline face would lose its strokes: thin only while most of the ink stays.
        if 2 * _ink(thinner) >= _ink(image):
            image = thinner
    box = image.getbbox()
    if box is None:
        raise ValueError(f"{font_path.name} draws nothing for U+{ord(char):04X}")
    return image.crop(box)


def _ink(image: Image.Image) -> float:
    return float(np.asarray(image, dtype=np.float32).sum())


def render(char: str, font_path: Path, size: int, rng: np.random.Generator) -> Rendered:
    """`char` in the font at `font_path`, distorted, as a grey (size, size) image."""
    canvas = size * SUPERSAMPLE
    glyph = np.asarray(glyph_image(char, font_path, canvas, rng), dtype=np.float32) / 255.0
    warped = _warp(glyph, canvas, rng)
    coverage = warped.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    sigma = round(rng.uniform(*BLUR) / BLUR_STEP) * BLUR_STEP
    if sigma > 0.1:
        kernel = _blur_matrix(size, sigma)
        coverage = kernel @ coverage @ kernel.T
    if coverage.sum() < MIN_INK:
        raise ValueError(f"U+{ord(char):04X} in {font_path.name} left no ink at {size}px")
    peak = float(coverage.max())
    if peak < MIN_PEAK:  # a blurred hairline would fade into the noise: darker ink
        coverage *= MIN_PEAK / peak
    return Rendered(_compose(coverage, rng), coverage.astype(np.float32))


def _warp(glyph: np.ndarray, canvas: int, rng: np.random.Generator) -> np.ndarray:
    """The glyph mapped onto a canvas x canvas grid, sampled bilinearly (zero outside).

    The forward map takes glyph coordinates (centred) to canvas coordinates: scale and
    aspect, shear, rotation, then a shift; each canvas pixel is also pushed by the elastic
    field before it is mapped back.
    """
    height, width = glyph.shape
    scale = rng.uniform(*FILL) * canvas / max(width, height)
    aspect = math.exp(rng.uniform(-ASPECT, ASPECT))
    angle, shear = rng.uniform(-ROTATION, ROTATION), rng.uniform(-SHEAR, SHEAR)
    cos, sin = math.cos(angle), math.sin(angle)
    forward = (
        np.array([[cos, -sin], [sin, cos]])
        @ np.array([[1.0, shear], [0.0, 1.0]])
        @ np.diag([scale * aspect, scale / aspect])
    )
    corners = forward @ (np.array([[-1, 1, 1, -1], [-1, -1, 1, 1]]) * [[width / 2], [height / 2]])
    half_extent = np.abs(corners).max(axis=1)
    # Too big for the canvas after rotation and shear: shrink to fit.
    fit = min(1.0, 0.98 * canvas / 2 / float(half_extent.max()))
    forward *= fit
    room = np.maximum(canvas / 2 - half_extent * fit, 0.0)
    shift = rng.uniform(-room, room)
    inverse = np.linalg.inv(forward)

    spread = _node_weights(canvas)
    push = rng.normal(
        0.0, rng.uniform(0, ELASTIC) * canvas, size=(2, ELASTIC_CELLS + 1, ELASTIC_CELLS + 1)
    )
    centres = np.arange(canvas, dtype=np.float64) + 0.5 - canvas / 2
    x = centres[None, :] + spread @ push[0] @ spread.T - shift[0]
    y = centres[:, None] + spread @ push[1] @ spread.T - shift[1]
    # Back to glyph pixel coordinates (pixel centres at +0.5), then bilinear sampling.
    u = inverse[0, 0] * x + inverse[0, 1] * y + width / 2 - 0.5
    v = inverse[1, 0] * x + inverse[1, 1] * y + height / 2 - 0.5
    padded = np.pad(glyph, 1).ravel()  # zero border: outside the glyph is background
    # Clipped onto the border: a point outside reads zeros only (u = width + 1 gives
    # u0 = width with weight 0 and the zero column width + 1 with weight 1).
    u = np.clip(u + 1, 0, width + 1)
    v = np.clip(v + 1, 0, height + 1)
    u0 = np.minimum(u.astype(np.intp), width)
    v0 = np.minimum(v.astype(np.intp), height)
    fu, fv = u - u0, v - v0
    at = v0 * (width + 2) + u0  # flat index of the upper-left neighbour
    top = padded[at] * (1 - fu) + padded[at + 1] * fu
    bottom = padded[at + width + 2] * (1 - fu) + padded[at + width + 3] * fu
    return top * (1 - fv) + bottom * fv


@functools.lru_cache(maxsize=8)
def _node_weights(canvas: int) -> np.ndarray:
    """(canvas, ELASTIC_CELLS + 1): linear interpolation from grid nodes to pixel centres."""
    position = (np.arange(canvas) + 0.5) / canvas * ELASTIC_CELLS
    nodes = np.arange(ELASTIC_CELLS + 1)
    return np.maximum(0.0, 1.0 - np.abs(position[:, None] - nodes[None, :]))


@functools.lru_cache(maxsize=64)
def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """(size, size) Gaussian blur along one axis, rows renormalised at the borders."""
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :]
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights[np.abs(offsets) > 3 * sigma + 1] = 0.0
    return weights / weights.sum(axis=1, keepdims=True)


def _compose(coverage: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Foreground grey over a background grey ramp, plus noise, as uint8."""
    background = rng.uniform(0, 255)
    # Dark on light or light on dark, whichever side has room for the contrast.
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if (255 - background if sign > 0 else background) < MIN_CONTRAST:
        sign = -sign
    room = 255 - background if sign > 0 else background
    foreground = background + sign * rng.uniform(MIN_CONTRAST, room)
    size = coverage.shape[0]
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    gx, gy = rng.uniform(-2 * GRADIENT, 2 * GRADIENT, size=2)
    plane = background + gx * ramp[None, :] + gy * ramp[:, None]
    image = plane + (foreground - plane) * coverage
    image += rng.normal(0.0, rng.uniform(*NOISE), size=image.shape)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)
