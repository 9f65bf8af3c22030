"""The official BiT `.npz` layout: key names, HWIO kernels, strict loading, round trips.

The reference file is written here by hand (np.savez over keys spelled out below), not by
`save_bit_npz`, so loading and saving are each checked against an independent statement
of the layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bit_core.npz import CheckpointError, checkpoint_keys, load_bit_npz, save_bit_npz
from bit_core.registry import create_model
from bit_core.resnetv2 import ResNetV2

SMALL_ARCHS = ["R14x0.5", "R26x0.5"]
CONV = "standardized_conv2d/kernel"


def official_layout(model: ResNetV2) -> dict[str, torch.Tensor]:
    """Checkpoint key -> parameter, as the official files name them (HWIO for kernels)."""
    layout = {
        f"resnet/root_block/{CONV}": model.root.conv.weight,
        "resnet/group_norm/gamma": model.head.gn.weight,
        "resnet/group_norm/beta": model.head.gn.bias,
        "resnet/head/conv2d/kernel": model.head.conv.weight,
        "resnet/head/conv2d/bias": model.head.conv.bias,
    }
    for b, block in enumerate(model.body, start=1):
        for u, unit in enumerate(block, start=1):
            prefix = f"resnet/block{b}/unit{u:02d}/"
            parts = {"a": (unit.conv1, unit.gn1), "b": (unit.conv2, unit.gn2)}
            parts["c"] = (unit.conv3, unit.gn3)
            for letter, (conv, norm) in parts.items():
                layout[f"{prefix}{letter}/{CONV}"] = conv.weight
                layout[f"{prefix}{letter}/group_norm/gamma"] = norm.weight
                layout[f"{prefix}{letter}/group_norm/beta"] = norm.bias
            if unit.downsample is not None:
                layout[f"{prefix}a/proj/{CONV}"] = unit.downsample.weight
    return layout


def random_official_arrays(model: ResNetV2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 arrays in the official layout, shaped for `model`."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for key, param in official_layout(model).items():
        shape = tuple(param.shape)
        if len(shape) == 4:  # OIHW -> HWIO
            shape = (shape[2], shape[3], shape[1], shape[0])
        arrays[key] = rng.standard_normal(shape).astype(np.float32)
    return arrays


def read(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


def write(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture(params=SMALL_ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def official(tmp_path: Path, arch: str) -> tuple[Path, dict[str, np.ndarray]]:
    """An official-format file with random weights (10-class head) for `arch`."""
    arrays = random_official_arrays(create_model(arch, 10))
    return write(tmp_path / "official.npz", arrays), arrays


def test_layout_matches_documented_examples() -> None:
    model = create_model("R14x0.5", 10)
    keys = checkpoint_keys(model)
    assert set(keys) == set(official_layout(model))
    arrays = random_official_arrays(model)
    root = int(64 * 0.5)
    assert arrays[f"resnet/root_block/{CONV}"].shape == (7, 7, 3, root)
    assert arrays[f"resnet/block1/unit01/a/proj/{CONV}"].shape == (1, 1, root, 4 * root)
    assert arrays[f"resnet/block1/unit01/a/{CONV}"].shape == (1, 1, root, root)
    assert arrays[f"resnet/block2/unit01/b/{CONV}"].shape == (3, 3, 2 * root, 2 * root)
    assert arrays["resnet/block1/unit01/a/group_norm/gamma"].shape == (root,)
    assert arrays["resnet/group_norm/gamma"].shape == (1024,)
    assert arrays["resnet/head/conv2d/kernel"].shape == (1, 1, 1024, 10)
    assert arrays["resnet/head/conv2d/bias"].shape == (10,)
    # One projection per block, on unit01 only; nothing outside the "resnet/" scope.
    assert sorted(k for k in keys if "/proj/" in k) == [
        f"resnet/block{b}/unit01/a/proj/{CONV}" for b in range(1, 5)
    ]
    assert all(key.startswith("resnet/") for key in keys)
    assert len(keys) == 1 + 4 * 9 + 4 + 2 + 2  # root, 4 units x (3 convs + 3 GN x 2), ...


def test_load_copies_every_array_with_hwio_to_oihw(
    arch: str, official: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, arrays = official
    model = create_model(arch, 10)
    load_bit_npz(model, path)
    for key, param in official_layout(model).items():
        expected = arrays[key]
        if expected.ndim == 4:
            expected = np.transpose(expected, (3, 2, 0, 1))  # HWIO -> OIHW, by hand
        assert param.dtype == torch.float32
        np.testing.assert_array_equal(param.detach().numpy(), expected, err_msg=key)
    # Spot check one element against its HWIO position.
    kernel = arrays[f"resnet/root_block/{CONV}"]
    assert model.root.conv.weight[5, 2, 1, 4].item() == kernel[1, 4, 2, 5]


def test_round_trip_is_exact(
    tmp_path: Path, arch: str, official: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, arrays = official
    model = create_model(arch, 10)
    load_bit_npz(model, path)
    out = tmp_path / "exported.npz"
    save_bit_npz(model, out)
    saved = read(out)
    assert set(saved) == set(arrays)
    for key, array in arrays.items():
        assert saved[key].dtype == np.float32, key
        assert saved[key].shape == array.shape, key
        np.testing.assert_array_equal(saved[key], array, err_msg=key)
    assert not list(tmp_path.glob("*.partial"))  # the atomic write left nothing behind

    # And back again: a second model loaded from the export equals the first.
    again = create_model(arch, 10)
    load_bit_npz(again, out)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_logits_equal_before_save_and_after_load(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch, 6)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = model(x)
    assert expected.abs().max() > 0
    save_bit_npz(model, tmp_path / "model.npz")
    loaded = create_model(arch, 6)
    load_bit_npz(loaded, tmp_path / "model.npz")
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_load_resets_frozen_standardization(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_model("R14x0.5", 3)
    save_bit_npz(source, tmp_path / "raw.npz")
    model = create_model("R14x0.5", 3).prepare_for_inference()
    load_bit_npz(model, tmp_path / "raw.npz")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.pre_logits(x), source.pre_logits(x))


def test_load_head_false_zero_head_any_class_count(
    arch: str, official: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, arrays = official
    for classes in (10, 3):
        model = create_model(arch, classes)
        with torch.no_grad():
            model.head.conv.weight.fill_(1.0)
        load_bit_npz(model, path, load_head=False)
        assert model.num_classes == classes
        assert model.head.conv.weight.shape == (classes, model.num_features, 1, 1)
        assert torch.count_nonzero(model.head.conv.weight) == 0
        assert torch.count_nonzero(model.head.conv.bias) == 0
        np.testing.assert_array_equal(
            model.head.gn.weight.detach().numpy(), arrays["resnet/group_norm/gamma"]
        )


def test_load_head_false_accepts_a_file_without_head(
    tmp_path: Path, official: tuple[Path, dict[str, np.ndarray]], arch: str
) -> None:
    _, arrays = official
    headless = {k: v for k, v in arrays.items() if not k.startswith("resnet/head/")}
    path = write(tmp_path / "headless.npz", headless)
    load_bit_npz(create_model(arch, 5), path, load_head=False)
    with pytest.raises(CheckpointError, match="resnet/head/conv2d"):
        load_bit_npz(create_model(arch, 5), path)


def test_load_head_true_with_other_class_count_is_an_error(
    official: tuple[Path, dict[str, np.ndarray]], arch: str
) -> None:
    path, _ = official
    with pytest.raises(CheckpointError, match="load_head=False") as info:
        load_bit_npz(create_model(arch, 7), path, load_head=True)
    message = str(info.value)
    assert "head has 10 classes" in message
    assert "model has 7" in message
    assert str(path) in message


def _error_for(tmp_path: Path, arch: str, arrays: dict[str, np.ndarray]) -> str:
    path = write(tmp_path / "modified.npz", arrays)
    with pytest.raises(CheckpointError) as info:
        load_bit_npz(create_model(arch, 10), path)
    assert str(path) in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    "key",
    [
        "resnet/block1/unit01/a/proj/standardized_conv2d/kernel",
        "resnet/block4/unit01/c/group_norm/beta",
        "resnet/root_block/standardized_conv2d/kernel",
        "resnet/head/conv2d/bias",
    ],
)
def test_missing_key_is_named(
    tmp_path: Path, arch: str, official: tuple[Path, dict[str, np.ndarray]], key: str
) -> None:
    _, arrays = official
    del arrays[key]
    message = _error_for(tmp_path, arch, arrays)
    assert key in message
    assert "missing" in message


def test_extra_key_is_named(
    tmp_path: Path, arch: str, official: tuple[Path, dict[str, np.ndarray]]
) -> None:
    _, arrays = official
    arrays["resnet/block1/unit99/a/group_norm/gamma"] = np.ones(32, np.float32)
    message = _error_for(tmp_path, arch, arrays)
    assert "resnet/block1/unit99/a/group_norm/gamma" in message
    assert "unexpected" in message


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("resnet/block2/unit01/b/standardized_conv2d/kernel", (3, 3, 64, 32)),
        ("resnet/root_block/standardized_conv2d/kernel", (32, 3, 7, 7)),  # OIHW, not HWIO
        ("resnet/block3/unit01/a/group_norm/gamma", (7,)),
        ("resnet/group_norm/beta", (1, 1024)),
    ],
)
def test_misshaped_array_is_named(
    tmp_path: Path,
    arch: str,
    official: tuple[Path, dict[str, np.ndarray]],
    key: str,
    shape: tuple[int, ...],
) -> None:
    _, arrays = official
    assert arrays[key].shape != shape
    arrays[key] = np.zeros(shape, np.float32)
    message = _error_for(tmp_path, arch, arrays)
    assert key in message
    assert "shape" in message


def test_architecture_mismatch_is_an_error(
    tmp_path: Path, official: tuple[Path, dict[str, np.ndarray]], arch: str
) -> None:
    path, _ = official
    other = "R26x0.5" if arch == "R14x0.5" else "R14x0.5"
    with pytest.raises(CheckpointError, match="model name"):
        load_bit_npz(create_model(other, 10), path)


@pytest.mark.parametrize(
    "content",
    [b"this is not an npz file\n", b"PK\x03\x04 truncated zip", b""],
    ids=["text", "truncated-zip", "empty"],
)
def test_non_npz_file_is_named(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "weights.npz"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"weights\.npz") as info:
        load_bit_npz(create_model("R14x0.5", 10), path)
    assert str(path) in str(info.value)


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_bit_npz(create_model("R14x0.5", 10), tmp_path / "absent.npz")


def test_npy_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "weights.npy"
    np.save(path, np.zeros(3, np.float32))
    with pytest.raises(CheckpointError, match=r"weights\.npy"):
        load_bit_npz(create_model("R14x0.5", 10), path)


def test_failed_load_leaves_model_unchanged(
    tmp_path: Path, official: tuple[Path, dict[str, np.ndarray]], arch: str
) -> None:
    _, arrays = official
    arrays["resnet/block4/unit01/c/group_norm/gamma"] = np.zeros(7, np.float32)
    path = write(tmp_path / "bad.npz", arrays)
    model = create_model(arch, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_bit_npz(model, path)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == []
