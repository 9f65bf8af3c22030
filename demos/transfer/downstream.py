"""The downstream half: scikit-learn's digits, few-shot sets, and one run per method.

Every method trains through `bit_core.recipe.run_finetune`, the code the service runs; only
the base model and the plan's mode differ between them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bit_core import hyperrule
from bit_core.data import LabeledImages
from bit_core.recipe import BaseModel, run_finetune
from bit_core.train import RunConfig

# The three methods, then a control: a linear head on *random* features tells how
# much of "pretrained + linear" the pre-training earns (random conv features are strong).
FULL, LINEAR, SCRATCH, RANDOM_LINEAR = (
    "pretrained + full fine-tune",
    "pretrained + linear",
    "from scratch",
    "random init + linear",
)
METHODS = (FULL, LINEAR, SCRATCH, RANDOM_LINEAR)
PRETRAINED_METHODS = (FULL, LINEAR)
DIGIT_SIDE = 32  # the 8x8 digits are upsampled 4x: the root's stride-4 stem needs room
TEST_SEED = 0  # fixes the test set, whatever the run's seeds
SHOTS_SALT = 0xD161  # few-shot draws use their own stream, apart from training's


@dataclass(frozen=True)
class FinetuneSettings:
    """The HyperRule's CPU-sized overrides, the same for every method."""

    arch: str
    steps: int
    batch: int
    lr: float
    precrop: int
    crop: int


def write_digits(root: Path) -> list[tuple[str, str]]:
    """scikit-learn's digits as 32x32 RGB PNGs; returns every (path, label), in dataset order."""
    from sklearn.datasets import load_digits  # the optional `demo` extra

    digits = load_digits()
    pairs = []
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        # Values are 0..16 ink; scale to 0..255 and upsample smoothly.
        grey = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8))
        image = grey.resize((DIGIT_SIDE, DIGIT_SIDE), Image.Resampling.BILINEAR).convert("RGB")
        path = root / str(label) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        pairs.append((str(path), str(label)))
    return pairs


Pool = dict[str, list[tuple[str, str]]]


def split(pairs: list[tuple[str, str]], test_size: int) -> tuple[Pool, LabeledImages]:
    """A fixed test set, and the rest per class: the pool that few-shot sets come from."""
    order = np.random.default_rng(TEST_SEED).permutation(len(pairs))
    test = [pairs[i] for i in order[:test_size]]
    pool: Pool = {}
    for i in sorted(order[test_size:]):
        pool.setdefault(pairs[i][1], []).append(pairs[i])
    return pool, LabeledImages.from_pairs(test, classes=sorted(pool))


def few_shot(pool: Pool, shots: int, seed: int) -> LabeledImages:
    """`shots` images per class; one permutation per seed, so 1-shot ⊂ 5-shot ⊂ 10-shot."""
    rng = np.random.default_rng([seed, SHOTS_SALT])
    chosen: list[tuple[str, str]] = []
    for label in sorted(pool):
        order = rng.permutation(len(pool[label]))
        chosen.extend(pool[label][i] for i in order[:shots])
    return LabeledImages.from_pairs(chosen, classes=sorted(pool))


def run_method(
    method: str,
    train: LabeledImages,
    test: LabeledImages,
    settings: FinetuneSettings,
    base: BaseModel,
    seed: int,
    work: Path,
) -> float:
    """Train one method on `train` through `run_finetune`; top-1 on `test`.

    Args:
        base: the pre-trained base; the random-weight methods use its architecture only.
    """
    if method not in PRETRAINED_METHODS:
        # Random weights drawn from the seed (bit_core.reproducibility): repeatable.
        base = BaseModel(settings.arch, settings.arch, None)
    # The HyperRule with CPU-sized overrides, every one recorded in the plan: a small batch
    # and a stretched schedule instead of 512 x 500 steps, and smaller images. The base lr
    # is set, not scaled with the batch (0.003 x 32/512 would barely move in so few steps);
    # it was chosen on pool images outside the training sets, never on the test set.
    plan = hyperrule(
        len(train),
        (DIGIT_SIDE, DIGIT_SIDE),
        arch=settings.arch,
        batch_size=settings.batch,
        total_steps=settings.steps,
        base_lr=settings.lr,
        precrop=settings.precrop,
        crop=settings.crop,
        mode="linear" if method in (LINEAR, RANDOM_LINEAR) else "full",
    )
    out = work / "model"
    _, info = run_finetune(
        train,
        base,
        plan,
        out,
        config=RunConfig(seed=seed, device="cpu", checkpoint_every=0),
        val=test,
    )
    shutil.rmtree(out, ignore_errors=True)
    assert info is not None  # no cancel, no stop_after: the run always finishes
    return float(info.metrics["validation"]["top1"])
