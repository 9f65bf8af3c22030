"""BiT's augmentation as batched tensor ops: random crop, horizontal flip, [-1, 1], MixUp.

Everything runs on whatever device the batch is on (the GPU when training there), and all
randomness comes from a generator seeded by (seed, step), so a resumed run repeats it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def step_generator(seed: int, step: int) -> np.random.Generator:
    """The random source of one training step's augmentation."""
    return np.random.default_rng([seed, step, 0xA6])


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> a new float tensor in [-1, 1], BiT's input range."""
    return images.float() * (2.0 / 255.0) - 1.0


def to_unit_range_array(images: np.ndarray) -> np.ndarray:
    """`to_unit_range` in NumPy (same float32 values), for threads that must not run torch."""
    return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def random_crop_flip(images: torch.Tensor, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """Per-image random `crop` x `crop` window and random horizontal flip.

    Args:
        images: uint8 or float batch (N, C, H, W) with H, W >= crop.
        crop: output side.
        rng: the step's random source.

    Returns:
        (N, C, crop, crop), same dtype and device.
    """
    n, _, height, width = images.shape
    if height < crop or width < crop:
        raise ValueError(f"cannot crop {crop}x{crop} from {height}x{width} images")
    device = images.device
    top = torch.from_numpy(rng.integers(0, height - crop + 1, size=n)).to(device)
    left = torch.from_numpy(rng.integers(0, width - crop + 1, size=n)).to(device)
    flip = torch.from_numpy(rng.random(n) < 0.5).to(device)
    offsets = torch.arange(crop, device=device)
    rows = (top[:, None] + offsets)[:, :, None]  # (N, crop, 1)
    cols = left[:, None] + offsets  # (N, crop)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # (N, 1, crop)
    batch = torch.arange(n, device=device)[:, None, None]
    # Advanced indexing gathers every window at once: (N, crop, crop, C) -> NCHW.
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def train_batch(images: torch.Tensor, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """uint8 pre-crop batch -> augmented float batch in [-1, 1]."""
    return to_unit_range(random_crop_flip(images, crop, rng))


def eval_batch(images: torch.Tensor, crop: int) -> torch.Tensor:
    """uint8 batch -> float [-1, 1] at crop x crop (resized if needed), no randomness."""
    x = to_unit_range(images)
    if x.shape[-2:] != (crop, crop):
        x = F.interpolate(x, size=(crop, crop), mode="bilinear", antialias=True)
    return x


def mixup(
    images: torch.Tensor, alpha: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """MixUp with one lambda per step, as the official code.

    Returns:
        (mixed images, permutation of the partner images, lambda). The loss is
        lam * CE(logits, y) + (1 - lam) * CE(logits, y[permutation]).
    """
    lam = float(rng.beta(alpha, alpha))
    permutation = torch.from_numpy(rng.permutation(images.shape[0])).to(images.device)
    return lam * images + (1.0 - lam) * images[permutation], permutation, lam
