"""benchmarks/flops.py and engine_speed.py's official rows: what the ratios divide by."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))  # scripts import as siblings

from flops import cpu_peak, flops_per_image, gpu_peak

# engine_speed imports torch.utils.mkldnn, whose torch.jit decorators warn on import.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method`:DeprecationWarning")


def test_r50x1_forward_flops_match_the_published_count():
    # ResNet-50 at 224 px: about 4.1 G multiply-adds, 2 FLOPs each.
    assert flops_per_image("R50x1", 224, training=False) == pytest.approx(8.2e9, rel=0.03)


def test_training_counts_forward_and_backward_and_scales_with_pixels():
    forward = flops_per_image("R50x1", 128, training=False)
    training = flops_per_image("R50x1", 128, training=True)
    assert training == pytest.approx(3 * forward, rel=0.05)  # backward: two products per conv
    large = flops_per_image("R50x1", 480, training=True)
    assert large == pytest.approx(training * (480 / 128) ** 2, rel=0.05)
    assert flops_per_image("R101x1", 128, training=True) > 1.8 * training


CPUINFO = "processor\t: 0\ncpu MHz\t\t: 2600.000\nflags\t\t: fpu sse avx avx2 fma {extra}\n"


def test_cpu_peak_is_cores_times_clock_times_fma_width():
    avx512 = cpu_peak(CPUINFO.format(extra="avx512f"), cores=2)
    avx2 = cpu_peak(CPUINFO.format(extra=""), cores=2)
    assert avx512 is not None and avx2 is not None
    assert avx512.flops == pytest.approx(2 * 2.6e9 * 64)
    assert avx2.flops == pytest.approx(2 * 2.6e9 * 32)
    assert "estimate" in avx512.source and "333 GFLOP/s" in avx512.source
    amx = cpu_peak(CPUINFO.format(extra="avx512f amx_bf16"), cores=2, precision="bf16")
    assert amx is not None and amx.flops == pytest.approx(2 * 2.6e9 * 1024)
    no_bf16 = cpu_peak(CPUINFO.format(extra=""), cores=2, precision="bf16")
    assert no_bf16 is not None and no_bf16.flops == avx2.flops  # converted, not faster
    assert cpu_peak("processor\t: 0\n", cores=2) is None  # no clock: no peak, not a guess


def test_gpu_peaks_by_device_name_and_precision():
    h200 = gpu_peak("NVIDIA H200", "bf16")
    assert h200 is not None and h200.flops == pytest.approx(989.4e12)
    pcie = gpu_peak("NVIDIA H100 PCIe", "bf16")
    assert pcie is not None and pcie.flops == pytest.approx(756e12)
    fp32 = gpu_peak("NVIDIA H100 80GB HBM3", "fp32")
    assert fp32 is not None and "TF32" in fp32.source
    assert gpu_peak("Some Other GPU", "bf16") is None


def test_the_official_rows_use_the_official_standardization_and_match_ours():
    import torch
    from engine_speed import OfficialStdConv2d, make_model, make_official_model

    ours, official = make_model("R14x0.5"), make_official_model("R14x0.5")
    assert any(isinstance(m, OfficialStdConv2d) for m in official.modules())
    assert not any(isinstance(m, OfficialStdConv2d) for m in ours.modules())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(ours.eval()(images), official.eval()(images), atol=1e-5)
