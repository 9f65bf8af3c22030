"""Device and precision choices shared by training, evaluation and prediction."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available; asking for CUDA without it is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available; use 'cpu'")
    return device


def resolve_precision(device: torch.device, precision: str) -> str:
    """'auto' -> 'bf16' on CUDA (the fast path), 'fp32' elsewhere; others as given."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got '{precision}'")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA (the fast path), plain fp32 elsewhere unless asked."""
    if resolve_precision(device, precision) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# On CPU, oneDNN's NHWC convolutions pay off only for large images: measured on R50x1
# (BENCHMARKS.md) 1.72x training and 1.37x batch-8 inference at 480 px, but no gain (or a
# small loss at batch 1) at 128 px. On CUDA, cuDNN's NHWC kernels win at every size.
CPU_CHANNELS_LAST_MIN_SIDE = 256


def use_channels_last(device: torch.device, side: int) -> bool:
    """Whether images of `side` pixels run faster in channels_last on `device`."""
    return device.type == "cuda" or side >= CPU_CHANNELS_LAST_MIN_SIDE


def to_device_layout(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The memory layout `use_channels_last` picks for this batch."""
    if use_channels_last(device, batch.shape[-1]):
        return batch.contiguous(memory_format=torch.channels_last)
    return batch
