"""Reusable layers of BiT: the weight-standardized convolution and GroupNorm.

The numerical constants live here, named, because two implementations of "the same" BiT
differ exactly in them, and that changes what loaded official weights compute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Weight Standardization epsilon, added to the *biased* variance of each output filter.
# The official BiT PyTorch code uses 1e-10 (timm uses 1e-8). With trained weights the
# per-filter variance is many orders of magnitude larger, so both give the same logits
# within fp32 tolerance; we keep the official value so our outputs match the reference code.
WS_EPS = 1e-10

# GroupNorm as in the BiT paper and the official checkpoints: 32 groups, epsilon 1e-5
# (the TF/JAX GroupNormalization default the checkpoints were trained with).
GN_GROUPS = 32
GN_EPS = 1e-5


def standardize_weight(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """Standardize a conv kernel per output filter over (in, kh, kw).

    Args:
        weight: kernel in PyTorch layout (out, in, kh, kw).
        eps: added to the biased variance before the square root.

    Returns:
        The standardized kernel, same shape and dtype.
    """
    # Each filter is one channel of a (1, out, in*kh*kw) "batch": batch norm in training
    # mode normalizes it with the biased variance, as the paper and the official code do
    # (the unbiased estimator would rescale every filter of a 1x1 conv by sqrt(n/(n-1))).
    # One fused kernel and its fused backward instead of var_mean, subtract, rsqrt and
    # multiply, so a training step is faster (BENCHMARKS.md has the measurement).
    if eps <= 0:  # batch norm refuses eps 0 in training mode
        var, mean = torch.var_mean(weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (weight - mean) * torch.rsqrt(var + eps)
    out_channels = weight.shape[0]
    standardized = F.batch_norm(
        weight.reshape(1, out_channels, -1), None, None, training=True, momentum=0.0, eps=eps
    )
    return standardized.reshape_as(weight)


class StdConv2d(nn.Conv2d):
    """Conv2d with Weight Standardization applied on every forward.

    `freeze_standardization()` replaces the raw kernel by its standardized form once and
    turns the per-forward standardization off: used for inference, where re-standardizing
    on every call is most of a batch-1 CPU forward.
    """

    def __init__(self, *args: Any, eps: float = WS_EPS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps
        self.standardized = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.standardized else standardize_weight(self.weight, self.eps)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def freeze_standardization(self) -> None:
        """Store the standardized kernel in place; later forwards skip standardization."""
        if not self.standardized:
            self.weight.copy_(standardize_weight(self.weight, self.eps))
            self.standardized = True


ConvLayer = Callable[..., nn.Conv2d]
"""Builds a convolution: (in_chs, out_chs, kernel_size=, stride=, padding=, bias=) -> conv.
BiT's is `StdConv2d`; `nn.Conv2d` gives a plain network (e.g. a BatchNorm baseline)."""

NormLayer = Callable[[int], nn.Module]
"""Builds a normalization layer over `num_chs` channels. BiT's is `group_norm`."""


def conv1x1(
    in_chs: int, out_chs: int, stride: int = 1, *, conv_layer: ConvLayer = StdConv2d
) -> nn.Conv2d:
    """1x1 convolution without bias (weight-standardized by default)."""
    return conv_layer(in_chs, out_chs, kernel_size=1, stride=stride, padding=0, bias=False)


def conv3x3(
    in_chs: int, out_chs: int, stride: int = 1, *, conv_layer: ConvLayer = StdConv2d
) -> nn.Conv2d:
    """3x3 convolution without bias, padding 1 (weight-standardized by default)."""
    return conv_layer(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


class GlobalAvgPool2d(nn.Module):
    """Average over the spatial dims, keeping them as 1 x 1: (N, C, H, W) -> (N, C, 1, 1).

    A plain mean rather than `nn.AdaptiveAvgPool2d(1)`: the same numbers, but its CUDA
    backward has a deterministic kernel, where the adaptive pool's raises in deterministic
    mode (`bit_core.reproducibility`). An ONNX export still writes the adaptive pool, which
    becomes ONNX's GlobalAveragePool (what runtimes optimise), not a generic ReduceMean.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return F.adaptive_avg_pool2d(x, 1)
        return x.mean(dim=(2, 3), keepdim=True)


def group_norm(num_chs: int) -> nn.GroupNorm:
    """GroupNorm with BiT's groups and epsilon."""
    return nn.GroupNorm(GN_GROUPS, num_chs, eps=GN_EPS)


def batch_norm(num_chs: int) -> nn.BatchNorm2d:
    """BatchNorm: the baseline BiT replaces (statistics of each device's batch)."""
    return nn.BatchNorm2d(num_chs)
