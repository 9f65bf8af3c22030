"""BiT ResNet-v2: sizes of every registered model, exact structure, WS, head, errors.

The large official models are built on the meta device: shapes and parameter counts
without allocating memory, so R152x4 (~0.94 G parameters) costs nothing.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import bit_core.layers as layers
from bit_core.layers import (
    GN_EPS,
    GN_GROUPS,
    WS_EPS,
    GlobalAvgPool2d,
    StdConv2d,
    standardize_weight,
)
from bit_core.registry import (
    ARCHITECTURES,
    OFFICIAL_ARCHS,
    OFFICIAL_MODELS,
    create_model,
    list_models,
    resolve_arch,
)
from bit_core.resnetv2 import PreActBottleneck, ResNetV2

# timm's published parameter counts (millions, 1000-class head) for the BiT models.
PUBLISHED_MPARAMS = {
    "R50x1": 25.5,
    "R50x3": 217.3,
    "R101x1": 44.5,
    "R101x3": 387.9,
    "R152x2": 236.3,
    "R152x4": 936.5,
}

ALL_NAMES = [*ARCHITECTURES, *OFFICIAL_MODELS]
SMALL = "R14x0.5"


def expected_num_params(block_units: tuple[int, ...], width_factor: float, classes: int) -> int:
    """Parameter count of a BiT ResNet-v2, written out from the architecture by hand.

    Root: 7x7 conv 3 -> 64w, no bias. Unit: GN(in) + 1x1 in->mid, GN(mid) + 3x3 mid->mid,
    GN(mid) + 1x1 mid->4 mid, and a 1x1 in->out projection on the first unit of a block.
    Head: GN(features) + 1x1 conv with bias. GroupNorm has a gamma and a beta per channel.
    """
    root = int(64 * width_factor)
    total = 7 * 7 * 3 * root
    in_chs = root
    for index, units in enumerate(block_units):
        mid = root * 2**index
        out = 4 * mid
        for unit in range(units):
            total += 2 * in_chs + in_chs * mid  # a: gn + 1x1
            total += 2 * mid + 9 * mid * mid  # b: gn + 3x3
            total += 2 * mid + mid * out  # c: gn + 1x1
            if unit == 0:
                total += in_chs * out  # a/proj
            in_chs = out
    return total + 2 * in_chs + in_chs * classes + classes


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _random_head(model: ResNetV2) -> None:
    with torch.no_grad():
        model.head.conv.weight.normal_(0, 0.02)
        model.head.conv.bias.normal_(0, 0.02)


def test_registry_lists_every_official_model() -> None:
    assert set(OFFICIAL_ARCHS) == set(PUBLISHED_MPARAMS)
    for arch in OFFICIAL_ARCHS:
        for name in (f"BiT-S-{arch}", f"BiT-M-{arch}", f"BiT-M-{arch}-ILSVRC2012"):
            assert OFFICIAL_MODELS[name].arch == arch
            assert OFFICIAL_MODELS[name].url == (
                f"https://storage.googleapis.com/bit_models/{name}.npz"
            )
    assert OFFICIAL_MODELS["BiT-S-R50x1"].num_classes == 1000
    assert OFFICIAL_MODELS["BiT-M-R50x1"].num_classes == 21843
    assert OFFICIAL_MODELS["BiT-M-R50x1-ILSVRC2012"].num_classes == 1000
    assert list_models() == ALL_NAMES


@pytest.mark.parametrize(
    ("arch", "units", "width"),
    [
        ("R50x1", (3, 4, 6, 3), 1),
        ("R50x3", (3, 4, 6, 3), 3),
        ("R101x1", (3, 4, 23, 3), 1),
        ("R101x3", (3, 4, 23, 3), 3),
        ("R152x2", (3, 8, 36, 3), 2),
        ("R152x4", (3, 8, 36, 3), 4),
    ],
)
def test_official_architectures_match_the_paper(arch: str, units: tuple, width: int) -> None:
    spec = ARCHITECTURES[arch]
    assert spec.block_units == units
    assert spec.width_factor == width
    assert f"R{spec.depth}x{width}" == arch


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_registered_model_size_and_shapes(name: str) -> None:
    arch = resolve_arch(name)
    with torch.device("meta"):
        model = create_model(name, 1000)
    assert isinstance(model, ResNetV2)
    assert model.block_units == arch.block_units
    assert model.width_factor == arch.width_factor

    params = count(model)
    assert params == expected_num_params(arch.block_units, arch.width_factor, 1000)
    if arch.name in PUBLISHED_MPARAMS:
        assert round(params / 1e6, 1) == PUBLISHED_MPARAMS[arch.name]
    assert all(p.is_meta for p in model.parameters())

    # Meta tensors propagate shapes through the whole forward. One forward per name (a meta
    # forward of R152 takes ~1 s of Python): the hook sees what `pre_logits` returns,
    # which `test_forward_is_head_of_pre_logits` ties to the method itself.
    features = int(2048 * arch.width_factor)
    assert model.num_features == features
    seen: list[torch.Tensor] = []
    model.head.avg.register_forward_hook(lambda module, args, out: seen.append(out.flatten(1)))
    with torch.no_grad():
        logits = model(torch.empty(2, 3, 128, 128, device="meta"))
    assert logits.shape == (2, 1000)
    assert [tuple(t.shape) for t in seen] == [(2, features)]


def test_bit_l_r152x4_body_is_about_928m() -> None:
    with torch.device("meta"):
        model = create_model("R152x4", 1000)
    body = count(model) - count(model.head.conv)
    assert count(model.head.conv) == 8192 * 1000 + 1000
    assert round(body / 1e6) == 928


def test_bit_m_upstream_head_size() -> None:
    with torch.device("meta"):
        model = create_model("BiT-M-R50x1", OFFICIAL_MODELS["BiT-M-R50x1"].num_classes)
    assert model.head.conv.weight.shape == (21843, 2048, 1, 1)
    assert count(model) == expected_num_params((3, 4, 6, 3), 1, 21843)


# --- exact structure -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_structure(name: str) -> None:
    arch = ARCHITECTURES[name]
    with torch.device("meta"):
        model = create_model(name, 10)
    root_chs = int(64 * arch.width_factor)

    # Every conv but the head's is weight-standardized, without bias.
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for module_name, conv in convs:
        if module_name == "head.conv":
            assert type(conv) is nn.Conv2d
            assert conv.bias is not None
            assert conv.kernel_size == (1, 1)
        else:
            assert isinstance(conv, StdConv2d), module_name
            assert conv.bias is None, module_name
            assert conv.eps == WS_EPS
    assert len(convs) == 3 * sum(arch.block_units) + 4 + 2  # units, projections, root, head

    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 * sum(arch.block_units) + 1
    for norm in norms:
        assert norm.num_groups == GN_GROUPS == 32
        assert norm.eps == GN_EPS == 1e-5
        assert norm.affine

    # Root: 7x7/2 conv (padding 3), zero-pad 1, 3x3/2 max-pool without padding.
    assert list(dict(model.root.named_children())) == ["conv", "pad", "pool"]
    conv = model.root.conv
    assert (conv.in_channels, conv.out_channels) == (3, root_chs)
    assert conv.kernel_size == (7, 7)
    assert conv.stride == (2, 2)
    assert conv.padding == (3, 3)
    assert isinstance(model.root.pad, nn.ConstantPad2d)
    assert model.root.pad.padding == (1, 1, 1, 1)
    assert model.root.pad.value == 0
    pool = model.root.pool
    assert isinstance(pool, nn.MaxPool2d)
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 0)

    # Head: GN, ReLU, global average pool, 1x1 conv.
    assert list(dict(model.head.named_children())) == ["gn", "relu", "avg", "conv"]
    assert isinstance(model.head.avg, GlobalAvgPool2d)

    blocks = list(model.body.named_children())
    assert [block_name for block_name, _ in blocks] == ["block1", "block2", "block3", "block4"]
    in_chs = root_chs
    for index, ((_, block), num_units) in enumerate(zip(blocks, arch.block_units, strict=True)):
        units = list(block.named_children())
        assert [n for n, _ in units] == [f"unit{i:02d}" for i in range(1, num_units + 1)]
        mid = root_chs * 2**index
        for unit_name, unit in units:
            assert isinstance(unit, PreActBottleneck)
            first = unit_name == "unit01"
            stride = 2 if first and index > 0 else 1
            # Stride on the 3x3 conv, never on the 1x1s.
            assert unit.conv1.stride == (1, 1)
            assert unit.conv2.stride == (stride, stride)
            assert unit.conv3.stride == (1, 1)
            assert unit.conv1.kernel_size == (1, 1)
            assert unit.conv2.kernel_size == (3, 3)
            assert unit.conv2.padding == (1, 1)
            assert unit.conv3.kernel_size == (1, 1)
            assert (unit.conv1.in_channels, unit.conv1.out_channels) == (in_chs, mid)
            assert (unit.conv2.in_channels, unit.conv2.out_channels) == (mid, mid)
            assert (unit.conv3.in_channels, unit.conv3.out_channels) == (mid, 4 * mid)
            assert unit.gn1.num_channels == in_chs  # pre-activation: GN on the input
            # Projection exactly on unit01 of each block, with the block's stride.
            if first:
                assert isinstance(unit.downsample, StdConv2d)
                assert unit.downsample.kernel_size == (1, 1)
                assert unit.downsample.stride == (stride, stride)
                assert (unit.downsample.in_channels, unit.downsample.out_channels) == (
                    in_chs,
                    4 * mid,
                )
            else:
                assert unit.downsample is None
            in_chs = 4 * mid
    assert model.num_features == in_chs == model.head.gn.num_channels


def test_forward_is_head_of_pre_logits() -> None:
    torch.manual_seed(0)
    model = create_model(SMALL, 4).eval()
    _random_head(model)
    seen: list[torch.Tensor] = []
    model.head.avg.register_forward_hook(lambda module, args, out: seen.append(out.flatten(1)))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        features = model.pre_logits(x)
        logits = model(x)
    assert features.shape == (2, 1024)
    torch.testing.assert_close(seen[0], features, rtol=0, atol=0)
    torch.testing.assert_close(seen[1], features, rtol=0, atol=0)
    torch.testing.assert_close(logits, model.forward_head(features), rtol=0, atol=0)
    expected = features @ model.head.conv.weight.flatten(1).T + model.head.conv.bias
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize(("size", "spatial"), [(128, 4), (224, 7)])
def test_feature_map_size(size: int, spatial: int) -> None:
    torch.manual_seed(0)
    model = create_model(SMALL, 3).eval()
    with torch.no_grad():
        features = model.forward_features(torch.rand(1, 3, size, size) * 2 - 1)
    assert features.shape == (1, 1024, spatial, spatial)
    assert (features >= 0).all()  # after the head's GN + ReLU


def test_projection_takes_the_preactivated_input() -> None:
    torch.manual_seed(0)
    unit = PreActBottleneck(32, 128, 32, stride=2).eval()
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        pre = torch.relu(unit.gn1(x))
        branch = unit.conv3(torch.relu(unit.gn3(unit.conv2(torch.relu(unit.gn2(unit.conv1(pre)))))))
        assert unit.downsample is not None
        expected = branch + unit.downsample(pre)
        torch.testing.assert_close(unit(x.clone()), expected)


# --- weight standardization --------------------------------------------------------------


def test_ws_constants() -> None:
    assert WS_EPS == 1e-10
    assert inspect.signature(standardize_weight).parameters["eps"].default == WS_EPS
    assert StdConv2d(4, 4, 1).eps == WS_EPS


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (64, 32, 1, 1), (8, 3, 7, 7)])
def test_standardize_weight_moments(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=torch.float64) * 0.05 + 0.3
    out = standardize_weight(weight)
    assert out.shape == weight.shape
    assert out.dtype == weight.dtype
    flat = out.flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(shape[0], dtype=torch.float64))
    # Biased variance 1: the unbiased one would be n/(n-1), visibly off for small n.
    var = flat.var(1, unbiased=False)
    torch.testing.assert_close(var, torch.ones(shape[0], dtype=torch.float64))


def test_standardize_weight_uses_ws_eps_on_the_biased_variance() -> None:
    # A filter whose biased variance equals WS_EPS comes out with variance exactly 1/2;
    # timm's 1e-8 would give ~0.0099 and no eps 1.0.
    values = torch.tensor([1.0, -1.0] * 8, dtype=torch.float64) * 1e-5  # biased var 1e-10
    weight = (values + 3.0).reshape(1, 4, 2, 2)
    out = standardize_weight(weight)
    assert out.flatten().var(unbiased=False).item() == pytest.approx(0.5, rel=1e-6)
    assert standardize_weight(weight, eps=0.0).flatten().var(unbiased=False).item() == (
        pytest.approx(1.0, rel=1e-6)
    )


def test_stdconv2d_matches_reference() -> None:
    torch.manual_seed(0)
    conv = StdConv2d(8, 16, kernel_size=3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 8, 9, 9)
    weight = conv.weight.detach()
    var, mean = torch.var_mean(weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
    reference = nn.functional.conv2d(
        x, (weight - mean) / torch.sqrt(var + 1e-10), None, stride=2, padding=1
    )
    torch.testing.assert_close(conv(x), reference, rtol=1e-5, atol=1e-5)
    # Not a plain conv: standardization changes the result.
    plain = nn.functional.conv2d(x, weight, None, stride=2, padding=1)
    assert not torch.allclose(conv(x), plain, atol=1e-3)


def test_prepare_for_inference_same_logits_and_no_restandardization(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = create_model(SMALL, 7)
    _random_head(model)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    model.train()
    with torch.no_grad():
        expected = model(x)
        expected_features = model.pre_logits(x)
    assert expected.abs().max() > 1e-3  # the comparison is not trivial

    assert model.prepare_for_inference() is model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    std_convs = [m for m in model.modules() if isinstance(m, StdConv2d)]
    assert std_convs and all(m.standardized for m in std_convs)

    def fail(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("standardize_weight called after prepare_for_inference")

    monkeypatch.setattr(layers, "standardize_weight", fail)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.pre_logits(x), expected_features, rtol=0, atol=1e-5)
    # Idempotent: a second call does not standardize again.
    model.prepare_for_inference()


# --- head -------------------------------------------------------------------------------


def test_head_is_zero_initialised() -> None:
    torch.manual_seed(0)
    model = create_model(SMALL, 5)
    assert torch.count_nonzero(model.head.conv.weight) == 0
    assert torch.count_nonzero(model.head.conv.bias) == 0
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert logits.shape == (2, 5)
    assert torch.equal(logits, torch.zeros(2, 5))


def test_reset_head_resizes_and_zeroes() -> None:
    torch.manual_seed(0)
    model = create_model(SMALL, 5).double()
    _random_head(model)
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.conv")}

    model.reset_head()  # same size: zeroed in place
    assert model.num_classes == 5
    assert torch.count_nonzero(model.head.conv.weight) == 0

    model.reset_head(12)
    assert model.num_classes == 12
    assert model.head.conv.weight.shape == (12, model.num_features, 1, 1)
    assert model.head.conv.bias.shape == (12,)
    assert model.head.conv.weight.dtype == torch.float64  # keeps dtype (and device)
    assert torch.count_nonzero(model.head.conv.weight) == 0
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 64, 64, dtype=torch.float64))
    assert torch.equal(logits, torch.zeros(2, 12, dtype=torch.float64))
    for key, value in model.state_dict().items():
        if not key.startswith("head.conv"):
            assert torch.equal(value, body[key]), key


# --- errors -----------------------------------------------------------------------------


def test_unknown_model_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="R50x7") as info:
        create_model("R50x7", 10)
    message = str(info.value)
    for known in ("R50x1", "R152x4", "R14x0.5", "BiT-M-R50x1", "BiT-S-R101x3"):
        assert known in message


@pytest.mark.parametrize("num_classes", [0, -1])
def test_num_classes_must_be_positive(num_classes: int) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_model(SMALL, num_classes)


def test_block_units_must_have_four_entries() -> None:
    with pytest.raises(ValueError, match="4 entries"):
        ResNetV2((1, 1, 1), 0.5, 10)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_reset_head_rejects_non_positive_num_classes() -> None:
    model = create_model(SMALL, 5)
    with pytest.raises(ValueError):
        model.reset_head(0)


def test_a_batchnorm_baseline_is_built_from_layer_callables(tmp_path) -> None:
    """The BN baseline of BiT's GN+WS comparison: same blocks, other conv and norm layers."""
    from bit_core.npz import save_bit_npz
    from bit_core.reproducibility import weights_generator

    bn = create_model(
        "R14x0.5",
        5,
        generator=weights_generator(0),
        conv_layer=nn.Conv2d,
        norm_layer=layers.batch_norm,
    )
    gn = create_model("R14x0.5", 5, generator=weights_generator(0))
    norms = [m for m in bn.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == len([m for m in gn.modules() if isinstance(m, nn.GroupNorm)])
    assert not any(isinstance(m, (nn.GroupNorm, StdConv2d)) for m in bn.modules())
    # The same parameter shapes (BN adds only running statistics), and the same draws.
    assert {k: v.shape for k, v in bn.named_parameters()} == {
        k: v.shape for k, v in gn.named_parameters()
    }
    assert torch.equal(bn.root.conv.weight, gn.root.conv.weight)
    bn.train()
    out = bn(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 5) and norms[0].num_batches_tracked.item() == 1
    with pytest.raises(ValueError, match="only BiT's own layers"):
        save_bit_npz(bn, tmp_path / "bn.npz")
