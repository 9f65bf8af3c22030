"""The upstream (pre-training) recipe of BiT as pure functions and a serialisable plan.

SGD momentum 0.9, weight decay 1e-4, lr 0.03 x global_batch / 256, global batch 4096,
linear warmup over 5k steps; BiT-S/M: 90 epochs, x0.1 at epochs 30, 60, 80; BiT-L: 40
epochs, x0.1 at 10, 23, 30, 37. No framework import here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
LR_PER_256 = 0.03
GLOBAL_BATCH = 4096
WARMUP_STEPS = 5000
RECIPES: dict[str, tuple[int, tuple[int, ...]]] = {
    "bit-s": (90, (30, 60, 80)),  # ILSVRC-2012
    "bit-m": (90, (30, 60, 80)),  # ImageNet-21k
    "bit-l": (40, (10, 23, 30, 37)),  # JFT-300M
}
RESOLUTION = 224  # inception crop + flip at 224 upstream
# The inception crop's smallest box, as a fraction of the image area (the largest is all of
# it). At a few dozen pixels a box of 5% can hold nothing recognisable: overridable.
CROP_MIN_AREA = 0.05


@dataclass
class UpstreamPlan:
    """A resolved pre-training plan (all in optimizer steps), with what was overridden."""

    num_examples: int
    num_classes: int
    global_batch: int
    epochs: float
    steps_per_epoch: int
    decay_steps: tuple[int, ...]
    warmup_steps: int
    base_lr: float
    loss: str  # "softmax" (one label) or "sigmoid" (several labels, JFT-style)
    resolution: int = RESOLUTION
    crop_min_area: float = CROP_MIN_AREA
    momentum: float = MOMENTUM
    weight_decay: float = WEIGHT_DECAY
    recipe: str = "bit-m"
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return max(1, round(self.epochs * self.steps_per_epoch))

    def lr_at(self, step: int) -> float | None:
        """Linear warmup to base_lr, then x0.1 after each decay step; None when done."""
        if step >= self.total_steps:
            return None
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        return self.base_lr * 0.1 ** sum(1 for boundary in self.decay_steps if step >= boundary)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["decay_steps"] = list(self.decay_steps)
        data["total_steps"] = self.total_steps
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UpstreamPlan:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in names}
        values["decay_steps"] = tuple(values["decay_steps"])
        return cls(**values)


OVERRIDABLE = (
    "global_batch",
    "epochs",
    "total_steps",
    "decay_epochs",
    "warmup_steps",
    "base_lr",
    "weight_decay",
    "resolution",
    "crop_min_area",
    "loss",
)


def upstream_plan(
    num_examples: int,
    num_classes: int,
    *,
    recipe: str = "bit-m",
    multi_label: bool = False,
    **overrides: Any,
) -> UpstreamPlan:
    """Resolve the upstream recipe for a dataset; overrides are recorded in the plan.

    `total_steps` (instead of epochs) fixes the run length; the decay epochs then scale
    with it. A run shorter than twice the recipe's warmup warms up over a tenth of itself.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got '{recipe}'")
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; accepted: {', '.join(OVERRIDABLE)}")
    overrides = {
        k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items() if v is not None
    }
    if num_examples < 1 or num_classes < 1:
        raise ValueError("a pre-training dataset needs at least one example and one class")
    global_batch = int(overrides.get("global_batch", GLOBAL_BATCH))
    if global_batch < 1:
        raise ValueError(f"global_batch must be at least 1, got {global_batch}")
    steps_per_epoch = math.ceil(num_examples / global_batch)
    recipe_epochs, recipe_decays = RECIPES[recipe]
    epochs = float(overrides.get("epochs", recipe_epochs))
    decay_epochs = tuple(float(e) for e in overrides.get("decay_epochs", recipe_decays))
    if "total_steps" in overrides:
        # Keep the recipe's shape: decays at the same fractions of the run.
        scale = int(overrides["total_steps"]) / (epochs * steps_per_epoch)
        epochs *= scale
        decay_epochs = tuple(e * scale for e in decay_epochs)
    total = max(1, round(epochs * steps_per_epoch))
    default_warmup = WARMUP_STEPS if total > 2 * WARMUP_STEPS else max(1, total // 10)
    warmup = int(overrides.get("warmup_steps", default_warmup))
    crop_min_area = float(overrides.get("crop_min_area", CROP_MIN_AREA))
    if not 0.0 < crop_min_area <= 1.0:
        raise ValueError(f"crop_min_area must be in (0, 1], got {crop_min_area}")
    loss = overrides.get("loss", "sigmoid" if multi_label else "softmax")
    if loss not in ("softmax", "sigmoid"):
        raise ValueError(f"loss must be 'softmax' or 'sigmoid', got '{loss}'")
    return UpstreamPlan(
        num_examples=num_examples,
        num_classes=num_classes,
        global_batch=global_batch,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        decay_steps=tuple(round(e * steps_per_epoch) for e in decay_epochs),
        warmup_steps=warmup,
        base_lr=float(overrides.get("base_lr", LR_PER_256 * global_batch / 256)),
        loss=loss,
        resolution=int(overrides.get("resolution", RESOLUTION)),
        crop_min_area=crop_min_area,
        weight_decay=float(overrides.get("weight_decay", WEIGHT_DECAY)),
        recipe=recipe,
        overrides=overrides,
    )
