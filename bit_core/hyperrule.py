"""BiT-HyperRule: the downstream fine-tuning recipe as small pure functions of the data.

Follows the official `bit_hyperrule.py`, which reproduces the paper's numbers: schedule by
number of training examples, resolution by image area, MixUp only for larger sets.
No framework import here; `hyperrule()` bundles the rule into a serialisable `Plan`.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

BASE_LR = 0.003  # at BASE_BATCH; SGD momentum 0.9, no weight decay
BASE_BATCH = 512
MOMENTUM = 0.9
MIXUP_ALPHA = 0.1
SMALL_DATASET = 20_000
MEDIUM_DATASET = 500_000
SMALL_IMAGE_AREA = 96 * 96
SMALL_RESOLUTION = (160, 128)  # (resize to, random crop)
LARGE_RESOLUTION = (448, 384)
R152X4_RESOLUTION = (512, 480)

# "paper": 448/384 for large images (512/480 for R152x4), as the paper words it.
# "official": 512/480 for all large images, as the released code does.
RESOLUTION_RULES = ("paper", "official")
MODES = ("full", "linear")


def schedule_supports(num_examples: int) -> tuple[int, int, int, int, int]:
    """Step boundaries: end of warmup, three decays, end of training."""
    if num_examples < SMALL_DATASET:
        return (100, 200, 300, 400, 500)
    if num_examples < MEDIUM_DATASET:
        return (500, 3000, 6000, 9000, 10_000)
    return (500, 6000, 12_000, 18_000, 20_000)


def resolution(
    image_hw: tuple[int, int], arch: str | None = None, rule: str = "paper"
) -> tuple[int, int]:
    """(precrop, crop) sizes: resize to precrop, random-crop to crop, evaluate at crop."""
    if rule not in RESOLUTION_RULES:
        raise ValueError(f"resolution rule must be one of {RESOLUTION_RULES}, got '{rule}'")
    if image_hw[0] * image_hw[1] < SMALL_IMAGE_AREA:
        return SMALL_RESOLUTION
    # Any name of the R152x4 architecture: "R152x4", "BiT-M-R152x4", "BiT-M-R152x4-ILSVRC2012".
    if rule == "official" or (arch is not None and "R152x4" in arch):
        return R152X4_RESOLUTION
    return LARGE_RESOLUTION


def mixup_alpha(num_examples: int) -> float:
    """MixUp alpha: none below 20k examples, 0.1 from there on."""
    return 0.0 if num_examples < SMALL_DATASET else MIXUP_ALPHA


def lr_at(step: int, supports: tuple[int, ...], base_lr: float) -> float | None:
    """Learning rate at `step`; None once training is over (step >= supports[-1]).

    Linear warmup from 0 to base_lr until supports[0], then x0.1 once for every later
    support that the step has passed (strictly), exactly as the official code.
    """
    if step < supports[0]:
        return base_lr * step / supports[0]
    if step >= supports[-1]:
        return None
    decays = sum(1 for support in supports[1:] if support < step)
    return base_lr * 0.1**decays


def scale_supports(supports: tuple[int, ...], total_steps: int) -> tuple[int, ...]:
    """Stretch a schedule to end at `total_steps`, keeping its proportions."""
    if total_steps < len(supports):
        raise ValueError(f"total_steps must be at least {len(supports)}, got {total_steps}")
    scaled = [round(s * total_steps / supports[-1]) for s in supports]
    scaled[-1] = total_steps
    # Keep them strictly increasing and >= 1: push low values up, then high values down
    # (total_steps >= 5 leaves room for both).
    for index in range(len(scaled) - 1):
        scaled[index] = max(scaled[index], scaled[index - 1] + 1 if index else 1)
    for index in range(len(scaled) - 2, -1, -1):
        scaled[index] = min(scaled[index], scaled[index + 1] - 1)
    return tuple(scaled)


@dataclass
class Plan:
    """A resolved fine-tuning plan: everything a run needs, and what was overridden."""

    num_examples: int
    image_hw: tuple[int, int]
    arch: str | None
    mode: str
    precrop: int
    crop: int
    mixup_alpha: float
    supports: tuple[int, ...]
    base_lr: float
    batch_size: int
    momentum: float = MOMENTUM
    weight_decay: float = 0.0
    resolution_rule: str = "paper"
    overrides: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.supports[-1]

    def lr_at(self, step: int) -> float | None:
        """The plan's learning rate at `step`, None when training is over."""
        return lr_at(step, self.supports, self.base_lr)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_hw"] = list(self.image_hw)
        data["supports"] = list(self.supports)
        data["total_steps"] = self.total_steps
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["image_hw"] = tuple(values["image_hw"])
        values["supports"] = tuple(values["supports"])
        return cls(**values)


OVERRIDABLE = (
    "batch_size",
    "base_lr",
    "total_steps",
    "supports",
    "precrop",
    "crop",
    "mixup_alpha",
    "resolution_rule",
    "mode",
)


def hyperrule(
    num_examples: int, image_hw: tuple[int, int], *, arch: str | None = None, **overrides: Any
) -> Plan:
    """Resolve the BiT-HyperRule for a dataset.

    Args:
        num_examples: number of training images.
        image_hw: a typical (height, width) of the training images (e.g. the median).
        arch: architecture or model name; R152x4 gets 512/480 under the paper's rule.
        **overrides: any of `OVERRIDABLE`. A `batch_size` below 512 scales the default
            learning rate linearly (0.003 x batch / 512) unless `base_lr` is given too.
            `total_steps` stretches the schedule's supports proportionally.

    Returns:
        The plan; `plan.overrides` records what the caller set, `plan.notes` why values
        differ from the rule.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be at least 1, got {num_examples}")
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; accepted: {', '.join(OVERRIDABLE)}")
    # Recorded JSON-native (lists, not tuples) so a plan survives a JSON round trip unchanged.
    overrides = {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in overrides.items()
        if value is not None
    }
    notes: list[str] = []
    mode = overrides.get("mode", "full")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got '{mode}'")
    rule = overrides.get("resolution_rule", "paper")
    precrop, crop = resolution(image_hw, arch, rule)
    precrop = int(overrides.get("precrop", precrop))
    crop = int(overrides.get("crop", crop))
    if not 0 < crop <= precrop:
        raise ValueError(f"crop ({crop}) must be positive and at most precrop ({precrop})")
    supports = tuple(int(s) for s in overrides.get("supports", schedule_supports(num_examples)))
    increasing = all(a < b for a, b in itertools.pairwise(supports))
    if len(supports) != 5 or not increasing or supports[0] < 1:
        raise ValueError(f"supports must be 5 strictly increasing positive steps, got {supports}")
    if "total_steps" in overrides:
        supports = scale_supports(supports, int(overrides["total_steps"]))
        notes.append(f"schedule stretched to {supports[-1]} steps: supports {list(supports)}")
    batch_size = int(overrides.get("batch_size", BASE_BATCH))
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if "base_lr" in overrides:
        base_lr = float(overrides["base_lr"])
    else:
        base_lr = BASE_LR * batch_size / BASE_BATCH
        if batch_size != BASE_BATCH:
            notes.append(
                f"base_lr scaled linearly with the batch: {BASE_LR} x {batch_size}/{BASE_BATCH}"
            )
    if num_examples < batch_size:
        notes.append(f"{num_examples} examples < batch {batch_size}: sampled with replacement")
    alpha = float(overrides.get("mixup_alpha", mixup_alpha(num_examples)))
    return Plan(
        num_examples=num_examples,
        image_hw=(int(image_hw[0]), int(image_hw[1])),
        arch=arch,
        mode=mode,
        precrop=precrop,
        crop=crop,
        mixup_alpha=alpha,
        supports=supports,
        base_lr=base_lr,
        batch_size=batch_size,
        resolution_rule=rule,
        overrides=dict(overrides),
        notes=notes,
    )
