"""The official BiT `.npz` checkpoint layout, in and out.

Keys look like `resnet/block1/unit01/a/standardized_conv2d/kernel`; conv kernels are stored
HWIO (TensorFlow) and PyTorch wants OIHW. Loading is strict: any missing, unexpected or
mis-shaped array is an error, except the head when the caller asks for a fresh one.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
import torch
from torch import nn

from bit_core.atomic import atomic_write
from bit_core.layers import StdConv2d
from bit_core.resnetv2 import ResNetV2

PREFIX = "resnet/"
HEAD_KEYS = (f"{PREFIX}head/conv2d/kernel", f"{PREFIX}head/conv2d/bias")

# TF stores conv kernels as (kh, kw, in, out); PyTorch as (out, in, kh, kw).
HWIO_TO_OIHW = (3, 2, 0, 1)
OIHW_TO_HWIO = (2, 3, 1, 0)


class CheckpointError(ValueError):
    """A checkpoint file does not fit the model it is loaded into."""


def _affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalization layer's scale and shift."""
    weight, bias = norm.weight, norm.bias
    assert isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
    return weight, bias


def checkpoint_keys(model: ResNetV2) -> dict[str, torch.Tensor]:
    """Map every official checkpoint key to the model parameter it holds."""
    conv = "standardized_conv2d/kernel"
    gamma, beta = _affine(model.head.gn)
    keys = {
        f"{PREFIX}root_block/{conv}": model.root.conv.weight,
        f"{PREFIX}group_norm/gamma": gamma,
        f"{PREFIX}group_norm/beta": beta,
        HEAD_KEYS[0]: model.head.conv.weight,
        HEAD_KEYS[1]: model.head.bias,
    }
    for unit_path, unit in model.units():
        prefix = f"{PREFIX}{unit_path}/"
        for letter, norm, conv_layer in (
            ("a", unit.gn1, unit.conv1),
            ("b", unit.gn2, unit.conv2),
            ("c", unit.gn3, unit.conv3),
        ):
            keys[f"{prefix}{letter}/{conv}"] = conv_layer.weight
            (
                keys[f"{prefix}{letter}/group_norm/gamma"],
                keys[f"{prefix}{letter}/group_norm/beta"],
            ) = _affine(norm)
        if unit.downsample is not None:
            keys[f"{prefix}a/proj/{conv}"] = unit.downsample.weight
    return keys


def _read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except TypeError as exc:  # a .npy file: np.load returns a bare array, not an archive
        raise CheckpointError(
            f"{path}: a single .npy array, not a BiT .npz archive of named arrays"
        ) from exc
    except FileNotFoundError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(
            f"{path}: not a readable BiT .npz checkpoint ({exc}); re-download or re-export it"
        ) from exc


@torch.no_grad()
def load_bit_npz(model: ResNetV2, path: str | os.PathLike[str], load_head: bool = True) -> None:
    """Load official-format BiT weights into `model`, in place.

    Args:
        model: a model from `bit_core.create_model` of the checkpoint's architecture.
        path: the `.npz` file.
        load_head: copy the file's head too (it must have as many classes as the model);
            False zero-initialises the head instead, as fine-tuning does.

    Raises:
        CheckpointError: a key is missing or unexpected, or an array has the wrong shape;
            the message names the key and both shapes.
    """
    arrays = _read_npz(path)
    targets = checkpoint_keys(model)
    if not load_head:
        for key in HEAD_KEYS:
            targets.pop(key)
            arrays.pop(key, None)
    elif HEAD_KEYS[0] in arrays and arrays[HEAD_KEYS[0]].shape[-1] != model.num_classes:
        raise CheckpointError(
            f"{path}: the checkpoint's head has {arrays[HEAD_KEYS[0]].shape[-1]} classes but "
            f"the model has {model.num_classes}; pass load_head=False to start from a "
            "zero-initialised head (fine-tuning does)"
        )
    missing = sorted(set(targets) - set(arrays))
    unexpected = sorted(set(arrays) - set(targets))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match this architecture "
            f"(missing {len(missing)} keys, e.g. {missing[:3]}; "
            f"unexpected {len(unexpected)} keys, e.g. {unexpected[:3]}); "
            "check that the model name matches the file"
        )
    converted = {}
    for key, param in targets.items():  # check every shape before touching the model
        array = arrays[key]
        if array.ndim == 4:
            array = array.transpose(HWIO_TO_OIHW)
        if tuple(array.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{path}: '{key}' has shape {tuple(array.shape)} (after HWIO->OIHW) but the "
                f"model expects {tuple(param.shape)}; check that the model name matches the file"
            )
        converted[key] = array
    for key, param in targets.items():
        param.copy_(torch.from_numpy(np.ascontiguousarray(converted[key])))
    for module in model.modules():
        if isinstance(module, StdConv2d):
            module.standardized = False  # raw kernels again: standardize on every forward
    if not load_head:
        model.reset_head()


def _is_body_conv(model: ResNetV2, module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module is not model.head.conv


def save_bit_npz(model: ResNetV2, path: str | os.PathLike[str]) -> None:
    """Write `model` in the official `.npz` layout (float32, HWIO kernels), atomically.

    Args:
        model: the model to export.
        path: destination file; written to a temporary file first, then renamed.
    """
    if not all(isinstance(m, StdConv2d) for m in model.modules() if _is_body_conv(model, m)) or (
        any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    ):
        raise ValueError(
            "only BiT's own layers (StdConv2d, GroupNorm) fit the official .npz layout; "
            "save a model built with other layers with torch's own tools"
        )
    arrays = {}
    for key, param in checkpoint_keys(model).items():
        array = param.detach().to(device="cpu", dtype=torch.float32).numpy()
        arrays[key] = array.transpose(OIHW_TO_HWIO) if array.ndim == 4 else array
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
