"""Parity with timm: the same official-layout `.npz` file gives the same outputs in both.

timm's `resnetv2_*_bit` models and their `.npz` loader (`ResNetV2.load_pretrained`, i.e.
`timm.models.resnetv2._load_weights`) are an implementation of BiT written independently of
ours, so agreement checks our module layout, the HWIO->OIHW key mapping of `bit_core.npz`,
the stem padding/pooling, the pre-activation shortcut and the head in one go.

A random checkpoint is used (no download): every parameter gets a distinct random value, so
a swapped, transposed or skipped tensor changes the outputs.

Known, intended difference: the Weight Standardization epsilon (ours 1e-10 as in the
official BiT code, timm 1e-8). It rescales each standardized filter by about
(1e-8 - 1e-10) / (2 var), about 5e-9 relative for these unit-variance kernels. The float64
test measures it directly and then aligns the epsilon to show the two compute the same thing.

Skipped where timm is not installed (it is not a dependency of the project).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

import bit_core  # noqa: E402
from bit_core.layers import StdConv2d  # noqa: E402
from bit_core.resnetv2 import ResNetV2  # noqa: E402

pytestmark = pytest.mark.slow

# Our architecture name -> timm's model name for the same shape.
TIMM_NAMES = {"R50x1": "resnetv2_50x1_bit", "R101x1": "resnetv2_101x1_bit"}
NUM_CLASSES = 10
TIMM_WS_EPS = 1e-8  # `timm.models.resnetv2._create_resnetv2_bit`: partial(StdConv2d, eps=1e-8)

# fp32: each implementation alone differs from its own float64 result by up to ~1e-5
# (R50x1) / ~3.5e-5 (R101x1) on these O(1) logits and features (measured; accumulation
# order in convs and norms). The two differ from each other by at most ~5e-5 (R101x1
# pre-logit features), using under 30% of this tolerance; the WS-eps effect is ~1e-7.
# Real errors land far outside it (measured on R50x1 logits): kh/kw of the kernels
# transposed 0.45, gn2/gn3 gammas of one unit swapped 0.15, -inf instead of zero padding
# before the stem max-pool 7.5e-3.
FP32_TOL = {"rtol": 1e-4, "atol": 1e-4}
# float64, epsilons as shipped: only the WS-eps effect remains (measured <= 1.5e-7).
FP64_TOL = {"rtol": 1e-6, "atol": 1e-6}
# float64, our epsilon set to timm's: same arithmetic up to summation order (~1e-13).
FP64_SAME_EPS_TOL = {"rtol": 1e-10, "atol": 1e-10}


@torch.no_grad()
def _randomize(model: ResNetV2, seed: int) -> None:
    """Give every parameter a random value: GN gammas near 1, betas small, conv kernels
    standard normal, and a head scaled so the logits are O(1)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    filled: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            module.weight.copy_(1.0 + 0.1 * randn(module.weight.shape))
            module.bias.copy_(0.1 * randn(module.bias.shape))
            filled.update((id(module.weight), id(module.bias)))
        elif isinstance(module, StdConv2d):
            module.weight.copy_(randn(module.weight.shape))
            filled.add(id(module.weight))
    head = model.head.conv
    head.weight.copy_(randn(head.weight.shape) / head.weight.shape[1] ** 0.5)
    head.bias.copy_(0.1 * randn(head.bias.shape))
    filled.update((id(head.weight), id(head.bias)))
    assert filled == {id(p) for p in model.parameters()}, "a parameter was left unrandomized"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """arch -> (random official-layout .npz with a NUM_CLASSES head, input batch), cached."""
    cache: dict[str, tuple[Path, torch.Tensor]] = {}

    def make(arch: str) -> tuple[Path, torch.Tensor]:
        if arch not in cache:
            model = bit_core.create_model(arch, NUM_CLASSES)
            _randomize(model, seed=0)
            path = tmp_path_factory.mktemp("timm_parity") / f"random-{arch}.npz"
            bit_core.save_bit_npz(model, path)
            generator = torch.Generator().manual_seed(1)
            images = torch.rand(2, 3, 128, 128, generator=generator) * 2 - 1  # in [-1, 1]
            cache[arch] = (path, images)
        return cache[arch]

    return make


def _ours(arch: str, path: Path, num_classes: int = NUM_CLASSES, load_head: bool = True):
    model = bit_core.create_model(arch, num_classes)
    bit_core.load_bit_npz(model, path, load_head=load_head)
    return model.eval()


def _timm(arch: str, path: Path, num_classes: int = NUM_CLASSES):
    model = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=num_classes)
    model.load_pretrained(str(path))  # timm's own .npz loader
    return model.eval()


def _ours_outputs(model: ResNetV2, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled pre-logit features, logits) from one forward."""
    features = model.pre_logits(images)
    return features, model.forward_head(features)


def _timm_outputs(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled pre-logit features, logits) from one forward."""
    feature_map = model.forward_features(images)
    return model.forward_head(feature_map, pre_logits=True), model.forward_head(feature_map)


@torch.no_grad()
@pytest.mark.parametrize("arch", list(TIMM_NAMES))
def test_fp32_logits_and_features_match_timm(checkpoint, arch: str) -> None:
    path, images = checkpoint(arch)
    ours, theirs = _ours(arch, path), _timm(arch, path)

    expected_features, expected_logits = _timm_outputs(theirs, images)
    assert expected_logits.shape == (2, NUM_CLASSES)
    assert expected_logits.abs().max() > 0.1  # a non-trivial head, not near-zero logits

    features, logits = _ours_outputs(ours, images)
    torch.testing.assert_close(features, expected_features, **FP32_TOL)
    torch.testing.assert_close(logits, expected_logits, **FP32_TOL)

    # The inference path (kernels standardized once, then plain convs) agrees as well.
    ours.prepare_for_inference()
    torch.testing.assert_close(ours(images), expected_logits, **FP32_TOL)


@torch.no_grad()
@pytest.mark.parametrize("arch", list(TIMM_NAMES))
def test_float64_difference_is_only_the_ws_epsilon(checkpoint, arch: str) -> None:
    path, images = checkpoint(arch)
    # Loaded from the float32 file, then widened: both hold exactly the same values.
    ours, theirs = _ours(arch, path).double(), _timm(arch, path).double()
    images = images.double()
    expected_features, expected_logits = _timm_outputs(theirs, images)

    # As shipped (WS eps 1e-10 vs 1e-8): the eps effect alone, far below fp32 rounding.
    features, logits = _ours_outputs(ours, images)
    torch.testing.assert_close(features, expected_features, **FP64_TOL)
    torch.testing.assert_close(logits, expected_logits, **FP64_TOL)

    # With timm's eps the two are the same computation: equal to float64 rounding.
    for module in ours.modules():
        if isinstance(module, StdConv2d):
            module.eps = TIMM_WS_EPS
    features, logits = _ours_outputs(ours, images)
    torch.testing.assert_close(features, expected_features, **FP64_SAME_EPS_TOL)
    torch.testing.assert_close(logits, expected_logits, **FP64_SAME_EPS_TOL)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["R50x1"])  # head handling does not depend on depth
def test_load_head_false_gives_zero_head(checkpoint, arch: str) -> None:
    """load_head=False: the file's backbone, a zero head, so all-zero logits (where BiT
    fine-tuning starts), whether or not the class count matches the file's.

    timm has no such switch: its loader copies the head only when the class count matches
    the file's and otherwise leaves the model's own head (normal init, std 0.01). So timm
    is built with a class count the file does not have, its head is checked to be
    untouched by the load, and is then zeroed as BiT fine-tuning does.
    """
    path, images = checkpoint(arch)
    other_classes = NUM_CLASSES + 1  # not the file's head size

    theirs = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=other_classes)
    head_before = theirs.head.fc.weight.clone()
    theirs.load_pretrained(str(path))
    theirs.eval()
    assert torch.equal(theirs.head.fc.weight, head_before)  # head not taken from the file
    nn.init.zeros_(theirs.head.fc.weight)
    nn.init.zeros_(theirs.head.fc.bias)
    expected_features, expected_logits = _timm_outputs(theirs, images)
    assert not expected_logits.any()

    for num_classes in (NUM_CLASSES, other_classes):
        ours = _ours(arch, path, num_classes=num_classes, load_head=False)
        assert not ours.head.conv.weight.any()
        assert not ours.head.conv.bias.any()
        features, logits = _ours_outputs(ours, images)
        assert logits.shape == (2, num_classes)
        assert not logits.any()
        # The backbone is loaded from the file all the same, in both.
        torch.testing.assert_close(features, expected_features, **FP32_TOL)


@torch.no_grad()
def test_npz_export_of_a_model_is_read_by_timm(tmp_path: Path) -> None:
    """`bit export --format npz` of a fine-tuned model: timm's loader takes it, head
    included, and gives our logits."""
    from bit_core.checkpoint import ModelInfo, save_model
    from bit_core.export import export

    arch = "R50x1"
    model = bit_core.create_model(arch, NUM_CLASSES)
    _randomize(model, seed=7)
    save_model(tmp_path / "m", model, ModelInfo(arch, [f"c{i}" for i in range(10)], crop=64))
    npz = export(tmp_path / "m", "npz", tmp_path / "m.npz")
    theirs = timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=NUM_CLASSES)
    theirs.load_pretrained(str(npz))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    expected = theirs.eval()(images)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(model.eval()(images), expected, **FP32_TOL)
