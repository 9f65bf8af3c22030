"""The model registry: every architecture and every official BiT name, in one place."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bit_core.layers import ConvLayer, NormLayer, StdConv2d, group_norm
from bit_core.resnetv2 import ResNetV2, init_weights

OFFICIAL_WEIGHTS_URL = "https://storage.googleapis.com/bit_models/{name}.npz"


@dataclass(frozen=True)
class Architecture:
    """A ResNet-v2 shape: four block depths and a width multiplier."""

    name: str
    block_units: tuple[int, int, int, int]
    width_factor: float

    @property
    def depth(self) -> int:
        """Layer count as in the names: 3 convs per unit, plus root and head."""
        return 3 * sum(self.block_units) + 2


@dataclass(frozen=True)
class OfficialModel:
    """A published BiT model: architecture + upstream dataset (+ the head it ships with)."""

    name: str
    arch: str
    upstream: str
    num_classes: int

    @property
    def url(self) -> str:
        return OFFICIAL_WEIGHTS_URL.format(name=self.name)


_R50, _R101, _R152 = (3, 4, 6, 3), (3, 4, 23, 3), (3, 8, 36, 3)

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("R50x1", _R50, 1),
        Architecture("R50x3", _R50, 3),
        Architecture("R101x1", _R101, 1),
        Architecture("R101x3", _R101, 3),
        Architecture("R152x2", _R152, 2),
        Architecture("R152x4", _R152, 4),
        # Small variants for CPU use and tests; same blocks, fewer units / channels.
        Architecture("R26x1", (2, 2, 2, 2), 1),
        Architecture("R26x0.5", (2, 2, 2, 2), 0.5),
        Architecture("R14x0.5", (1, 1, 1, 1), 0.5),
    )
}

OFFICIAL_ARCHS = ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4")

# BiT-S: ILSVRC-2012 (1000 classes); BiT-M: ImageNet-21k (21843 classes). The
# "-ILSVRC2012" files are BiT-M fine-tuned on ILSVRC-2012, carrying a 1000-class head.
OFFICIAL_MODELS: dict[str, OfficialModel] = {
    model.name: model
    for arch in OFFICIAL_ARCHS
    for model in (
        OfficialModel(f"BiT-S-{arch}", arch, "ILSVRC-2012", 1000),
        OfficialModel(f"BiT-M-{arch}", arch, "ImageNet-21k", 21843),
        OfficialModel(f"BiT-M-{arch}-ILSVRC2012", arch, "ImageNet-21k", 1000),
    )
}


def resolve_arch(name: str) -> Architecture:
    """Map an architecture or official model name (e.g. 'R50x1', 'BiT-M-R50x1') to its shape.

    Raises:
        ValueError: the name is unknown; the message lists the known ones.
    """
    if name in OFFICIAL_MODELS:
        name = OFFICIAL_MODELS[name].arch
    if name not in ARCHITECTURES:
        known = ", ".join([*ARCHITECTURES, *(m for m in OFFICIAL_MODELS if m.count("-") == 2)])
        raise ValueError(f"unknown model '{name}'; known names: {known}")
    return ARCHITECTURES[name]


def list_models() -> list[str]:
    """All names `create_model` accepts: architectures, then official BiT names."""
    return [*ARCHITECTURES, *OFFICIAL_MODELS]


def create_model(
    name: str,
    num_classes: int,
    *,
    generator: torch.Generator | None = None,
    conv_layer: ConvLayer = StdConv2d,
    norm_layer: NormLayer = group_norm,
) -> ResNetV2:
    """Build a BiT ResNet-v2 with a zero-initialised head.

    Args:
        name: an architecture ('R50x1', 'R26x1', ...) or an official name ('BiT-M-R50x1').
            Weights are not loaded here: see `bit_core.load_bit_npz`.
        num_classes: number of outputs of the head.
        generator: draws the initial weights (`bit_core.reproducibility.weights_generator`
            of a run's seed), so they repeat; None: torch's global generator, for models
            whose weights are loaded over them anyway.
        conv_layer, norm_layer: BiT's StdConv2d and GroupNorm by default; e.g.
            `nn.Conv2d` and `bit_core.layers.batch_norm` for a BatchNorm baseline.

    Returns:
        The model; `model(x)` maps images N x 3 x H x W in [-1, 1] to logits
        N x num_classes, `model.pre_logits(x)` to pooled features.
    """
    arch = resolve_arch(name)
    model = ResNetV2(
        arch.block_units,
        arch.width_factor,
        num_classes,
        conv_layer=conv_layer,
        norm_layer=norm_layer,
    )
    return model if generator is None else init_weights(model, generator)
