"""Model FLOPs per image and the device's peak, for model FLOPs utilisation (MFU).

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on the meta device (shapes
only, no arithmetic): convolutions and matrix products of one forward, or of a forward
and backward for training, with a multiply-add counted as 2 FLOPs. Weight Standardization,
GroupNorm and the optimizer are not counted (they are a few percent of the work), so MFU
is a lower bound on the device's arithmetic use.

Peaks are dense (no sparsity) figures from the vendors' data sheets for GPUs; for a CPU
they are estimated from /proc/cpuinfo (cores × clock × FMA width), and said to be.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bit_core import create_model

NUM_CLASSES = 10


@cache
def flops_per_image(arch: str, resolution: int, *, training: bool) -> float:
    """Conv + matmul FLOPs of one image: forward, or forward + backward when `training`."""
    batch = 2  # a batch of 2 and not 1: no shape special-cases in the count
    with torch.device("meta"):
        model = create_model(arch, NUM_CLASSES)
        images = torch.empty(batch, 3, resolution, resolution)
    counter = FlopCounterMode(display=False)
    with counter:
        if training:
            model(images).sum().backward()
        else:
            with torch.no_grad():
                model(images)
    return counter.get_total_flops() / batch


@dataclass(frozen=True)
class Peak:
    flops: float  # per second
    source: str  # what the figure is, in words


# Dense tensor-core peaks in FLOP/s: (bf16, tf32, fp32 without tensor cores).
_GPU_PEAKS = {
    "H200": (989.4e12, 494.7e12, 66.9e12),
    "H100 SXM": (989.4e12, 494.7e12, 66.9e12),
    "H100 PCIe": (756.0e12, 378.0e12, 51.2e12),
    "H100 NVL": (835.0e12, 417.5e12, 60.0e12),
    "H100": (989.4e12, 494.7e12, 66.9e12),  # a bare "H100" name: the SXM part
    "A100": (312.0e12, 156.0e12, 19.5e12),
}


def gpu_peak(name: str, precision: str) -> Peak | None:
    """The data-sheet peak of a GPU (by its torch device name) for bf16 or fp32 rows.

    fp32 rows use the TF32 peak: cuDNN runs fp32 convolutions on TF32 tensor cores by
    default (`torch.backends.cudnn.allow_tf32`).
    """
    for key, (bf16, tf32, fp32) in _GPU_PEAKS.items():
        if key in name:
            if precision == "bf16":
                return Peak(bf16, f"{key} dense bf16 {bf16 / 1e12:.0f} TFLOP/s (data sheet)")
            if torch.backends.cudnn.allow_tf32:
                return Peak(tf32, f"{key} dense TF32 {tf32 / 1e12:.0f} TFLOP/s (data sheet)")
            return Peak(fp32, f"{key} fp32 {fp32 / 1e12:.1f} TFLOP/s (data sheet)")
    return None


def cpu_peak(
    cpuinfo: str | None = None, cores: int | None = None, precision: str = "fp32"
) -> Peak | None:
    """Peak of the CPUs torch uses: cores × clock × FLOPs per cycle, estimated.

    fp32 FLOPs per cycle assume two FMA units: 64 with AVX-512, 32 with AVX2 + FMA. bf16:
    1024 with AMX (Intel's figure for its tile unit), 128 with AVX512-BF16 alone, else as
    fp32 (bf16 is then converted, not faster). The clock is the one /proc/cpuinfo reports
    (on a VM usually the nominal one, not turbo).
    """
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if not path.exists():
            return None
        cpuinfo = path.read_text()
    found = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    flags = set(found.group(1).split()) if found else set()
    clock = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.M)
    if clock is None:
        return None
    if "avx512f" in flags:
        per_cycle, unit = 64, "AVX-512 fp32, 2 FMA units assumed"
    elif {"avx2", "fma"} <= flags:
        per_cycle, unit = 32, "AVX2 fp32, 2 FMA units assumed"
    else:
        per_cycle, unit = 16, "SSE fp32"
    if precision == "bf16" and "amx_bf16" in flags:
        per_cycle, unit = 1024, "AMX bf16"
    elif precision == "bf16" and "avx512_bf16" in flags:
        per_cycle, unit = 128, "AVX512-BF16"
    cores = cores or torch.get_num_threads() or os.cpu_count() or 1
    ghz = float(clock.group(1)) / 1000
    return Peak(
        cores * ghz * 1e9 * per_cycle,
        f"CPU {precision} estimate: {cores} cores × {ghz:.2f} GHz × {per_cycle} FLOP/cycle "
        f"({unit}) = {cores * ghz * per_cycle:.0f} GFLOP/s",
    )


def device_peak(device: torch.device, precision: str) -> Peak | None:
    """The peak to report MFU against on `device` for a row computing in `precision`."""
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device), precision)
    return cpu_peak(precision=precision)
