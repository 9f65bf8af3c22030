"""Generated test data: image folders of visually distinct classes, official-format npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

import bit_core

# Three classes a tiny network separates quickly: distinct colour *and* layout.
CLASS_STYLES = {
    "red_square": ((220, 40, 40), "square"),
    "green_stripes": ((40, 190, 60), "stripes"),
    "blue_disc": ((40, 60, 220), "disc"),
}


def draw_example(
    style: str,
    colour: tuple[int, int, int],
    rng: np.random.Generator,
    size: tuple[int, int] = (48, 64),
) -> np.ndarray:
    """One noisy RGB image of a class: its shape in its colour on a grey background."""
    height, width = size
    image = np.full((height, width, 3), 128.0) + rng.normal(0, 12, (height, width, 3))
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.integers(height // 3, 2 * height // 3), rng.integers(width // 3, 2 * width // 3)
    if style == "square":
        mask = (abs(yy - cy) < height // 4) & (abs(xx - cx) < height // 4)
    elif style == "stripes":
        mask = (xx // 6) % 2 == 0
    else:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (height // 4) ** 2
    image[mask] = np.asarray(colour) + rng.normal(0, 12, (int(mask.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_image_folder(
    root: Path, per_class: int, *, seed: int = 0, size: tuple[int, int] = (48, 64)
) -> Path:
    """Write root/<class>/<i>.png for every class in CLASS_STYLES; returns root."""
    rng = np.random.default_rng(seed)
    for name, (colour, style) in CLASS_STYLES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            Image.fromarray(draw_example(style, colour, rng, size)).save(
                root / name / f"{index}.png"
            )
    return root


def make_bit_npz(path: Path, arch: str = "R14x0.5", num_classes: int = 10, seed: int = 0) -> Path:
    """An official-format BiT .npz with random (but well-scaled) weights."""
    generator = torch.Generator().manual_seed(seed)
    model = bit_core.create_model(arch, num_classes)
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                # GroupNorm scales near 1 keep activations well-scaled through the depth.
                is_scale = isinstance(module, torch.nn.GroupNorm) and name == "weight"
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(1.0 + 0.1 * noise if is_scale else 0.1 * noise)
    bit_core.save_bit_npz(model, path)
    return path
