"""BiT's ResNet-v2: pre-activation bottlenecks with GroupNorm + Weight Standardization.

Reads top to bottom: the bottleneck unit, the model, inference preparation, weight init.
Module names follow the official checkpoints (`root`, `body.block1.unit01`, `head`) so that
the `.npz` conversion in `bit_core.npz` reads as a plain mapping.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from bit_core.layers import (
    ConvLayer,
    GlobalAvgPool2d,
    NormLayer,
    StdConv2d,
    conv1x1,
    conv3x3,
    group_norm,
)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck unit (ResNet-v2), stride on the 3x3 conv.

    The projection shortcut, when present, takes the *pre-activated* input, as in BiT.
    Sub-module names map to the checkpoint: gn1/conv1 = `a`, gn2/conv2 = `b`,
    gn3/conv3 = `c`, downsample = `a/proj` (named `gn*` whatever `norm_layer` builds).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        mid_chs: int,
        stride: int = 1,
        *,
        conv_layer: ConvLayer = StdConv2d,
        norm_layer: NormLayer = group_norm,
    ) -> None:
        super().__init__()
        self.gn1 = norm_layer(in_chs)
        self.conv1 = conv1x1(in_chs, mid_chs, conv_layer=conv_layer)
        self.gn2 = norm_layer(mid_chs)
        self.conv2 = conv3x3(mid_chs, mid_chs, stride, conv_layer=conv_layer)
        self.gn3 = norm_layer(mid_chs)
        self.conv3 = conv1x1(mid_chs, out_chs, conv_layer=conv_layer)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Conv2d | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = conv1x1(in_chs, out_chs, stride, conv_layer=conv_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.gn1(x))
        shortcut = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.gn2(out)))
        out = self.conv3(self.relu(self.gn3(out)))
        return out + shortcut


class Root(nn.Module):
    """7x7/2 standardized conv, zero pad 1, unpadded 3x3/2 max-pool."""

    def __init__(self, out_chs: int, *, conv_layer: ConvLayer = StdConv2d) -> None:
        super().__init__()
        self.conv = conv_layer(3, out_chs, kernel_size=7, stride=2, padding=3, bias=False)
        # Zero padding then an unpadded pool, as in the official code: the same as "SAME"
        # pooling only because inputs are >= 0 (post-conv values are not!), so kept literal.
        self.pad = nn.ConstantPad2d(1, 0.0)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.pad(self.conv(x)))


class Head(nn.Module):
    """GroupNorm, ReLU, global average pool, 1x1 conv (the checkpoint's `head/conv2d`)."""

    def __init__(
        self, in_chs: int, num_classes: int, *, norm_layer: NormLayer = group_norm
    ) -> None:
        super().__init__()
        self.gn = norm_layer(in_chs)
        self.relu = nn.ReLU(inplace=True)
        self.avg = GlobalAvgPool2d()
        self.conv = nn.Conv2d(in_chs, num_classes, kernel_size=1, bias=True)

    @property
    def bias(self) -> torch.Tensor:
        """The head conv's bias (always present; typed non-optional for callers)."""
        assert self.conv.bias is not None
        return self.conv.bias


class ResNetV2(nn.Module):
    """BiT ResNet-v2 classifier.

    Args:
        block_units: number of bottleneck units in each of the four blocks.
        width_factor: channel multiplier (1..4 for the official models; <1 for small
            CPU/test variants). The root has 64 x width_factor channels.
        num_classes: size of the 1x1-conv head. The head starts at zero (BiT's downstream
            initialisation: the first step then trains the head alone, on fixed features).
        conv_layer, norm_layer: what builds every body convolution and normalization
            (timm's way): BiT's `StdConv2d` and `group_norm` by default; `nn.Conv2d` and
            `layers.batch_norm` build the BatchNorm baseline BiT is compared with.
    """

    def __init__(
        self,
        block_units: tuple[int, ...],
        width_factor: float,
        num_classes: int,
        *,
        conv_layer: ConvLayer = StdConv2d,
        norm_layer: NormLayer = group_norm,
    ):
        super().__init__()
        if len(block_units) != 4:
            raise ValueError(f"block_units must have 4 entries, got {block_units}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        root_chs = int(64 * width_factor)
        self.block_units = tuple(block_units)
        self.width_factor = width_factor
        self.num_classes = num_classes
        self.root = Root(root_chs, conv_layer=conv_layer)
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        in_chs = root_chs
        for index, num_units in enumerate(block_units):
            mid_chs = root_chs * 2**index
            out_chs = mid_chs * 4
            stride = 1 if index == 0 else 2
            units: OrderedDict[str, nn.Module] = OrderedDict()
            for unit in range(1, num_units + 1):
                units[f"unit{unit:02d}"] = PreActBottleneck(
                    in_chs,
                    out_chs,
                    mid_chs,
                    stride=stride if unit == 1 else 1,
                    conv_layer=conv_layer,
                    norm_layer=norm_layer,
                )
                in_chs = out_chs
            blocks[f"block{index + 1}"] = nn.Sequential(units)
        self.body = nn.Sequential(blocks)
        self.num_features = in_chs
        self.head = Head(in_chs, num_classes, norm_layer=norm_layer)
        self.reset_head()

    @torch.no_grad()
    def reset_head(self, num_classes: int | None = None) -> None:
        """Zero the head, optionally resizing it to `num_classes` outputs."""
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if num_classes is not None and num_classes != self.num_classes:
            old = self.head.conv
            self.head.conv = nn.Conv2d(self.num_features, num_classes, kernel_size=1, bias=True)
            self.head.conv.to(device=old.weight.device, dtype=old.weight.dtype)
            self.num_classes = num_classes
        nn.init.zeros_(self.head.conv.weight)
        nn.init.zeros_(self.head.bias)

    def units(self) -> list[tuple[str, PreActBottleneck]]:
        """('blockN/unitMM', unit) for every bottleneck, in order (checkpoint naming)."""
        return [
            (f"{block_name}/{unit_name}", unit)
            for block_name, block in self.body.named_children()
            for unit_name, unit in block.named_children()
            if isinstance(unit, PreActBottleneck)
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> normalized feature map (N, C, h, w)."""
        x = self.body(self.root(x))
        return self.head.relu(self.head.gn(x))

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> pooled pre-logit features (N, num_features)."""
        return self.head.avg(self.forward_features(x)).flatten(1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, num_features) -> logits (N, num_classes)."""
        return self.head.conv(features[:, :, None, None]).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> logits (N, num_classes)."""
        return self.forward_head(self.pre_logits(x))

    def prepare_for_inference(self) -> ResNetV2:
        """Eval mode, gradients off, conv kernels standardized once (not on every call)."""
        self.eval()
        self.requires_grad_(False)
        for module in self.modules():
            if isinstance(module, StdConv2d):
                module.freeze_standardization()
        return self


# PyTorch's default Conv2d initialisation (Kaiming-uniform with a = sqrt(5)), drawn from a
# generator instead of the global one. Weight Standardization removes each filter's scale
# and offset, so only the directions drawn here matter.
CONV_INIT_A = math.sqrt(5)


@torch.no_grad()
def init_weights(model: ResNetV2, generator: torch.Generator) -> ResNetV2:
    """Draw every convolution kernel from `generator`; norms at identity, head at zero.

    The same generator state always gives the same weights, whatever else the process
    drew from torch's global generator before (`bit_core.reproducibility`).

    Args:
        model: a ResNetV2 on the CPU (the generator is a CPU one).
        generator: the run's weights generator, e.g. `weights_generator(seed)`.

    Returns:
        The model, initialised in place.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module is not model.head.conv:
            nn.init.kaiming_uniform_(module.weight, a=CONV_INIT_A, generator=generator)
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    model.reset_head()  # BiT's downstream head starts at zero: nothing to draw
    return model
