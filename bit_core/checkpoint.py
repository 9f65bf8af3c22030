"""Our own files: trained models and resumable training state, both as safetensors.

Nothing here unpickles: safetensors holds tensors only, metadata is JSON. A model is a
directory with `weights.safetensors` and `model.json` (architecture, ordered class names,
resolution, plan, metrics and the weights' sha256). Training state is one safetensors file
(model, optimizer momentum, step, sampler state, plan) written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from bit_core.atomic import atomic_write
from bit_core.registry import create_model
from bit_core.resnetv2 import ResNetV2

WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "model.json"
FORMAT_VERSION = 1


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _state_for_saving(model: ResNetV2) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}


@dataclass
class ModelInfo:
    """What `model.json` holds."""

    arch: str
    classes: list[str]
    crop: int
    sha256: str = ""
    plan: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    format_version: int = FORMAT_VERSION
    # Temperature scaling fitted on held-out images: probabilities are softmax(logits / T).
    # None (and model.json files written before it existed): T = 1.
    temperature: float | None = None
    # A linear model that shares its backbone: {"sha256": base weights' sha256, "layer":
    # where features are taken ("pre_logits"), "name": the base's name}. Its directory
    # then holds only the head (HEAD_FILE); None: the weights file holds the whole model.
    shared_base: dict[str, str] | None = None
    # What made the model: seed, plan, data version, base sha256, versions, device,
    # precision, deterministic mode (bit_core.provenance). Empty in older model.json files.
    provenance: dict[str, Any] = field(default_factory=dict)


def save_model(directory: str | os.PathLike[str], model: ResNetV2, info: ModelInfo) -> ModelInfo:
    """Write a trained model directory; returns the info with the weights' sha256 filled in."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if len(info.classes) != model.num_classes:
        raise ValueError(f"{len(info.classes)} class names for a {model.num_classes}-class head")
    payload = save_safetensors(_state_for_saving(model))
    with atomic_write(directory / WEIGHTS_FILE) as handle:
        handle.write(payload)
    info.sha256 = hashlib.sha256(payload).hexdigest()
    with atomic_write(directory / METADATA_FILE) as handle:
        handle.write(json.dumps(info.__dict__, indent=2).encode())
    return info


def read_model_info(directory: str | os.PathLike[str]) -> ModelInfo:
    """Read `model.json` of a model directory."""
    path = Path(directory) / METADATA_FILE
    try:
        data = json.loads(path.read_text())
        return ModelInfo(**data)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{directory}: no {METADATA_FILE}; pass a model directory written by "
            "`bit finetune` (it holds weights.safetensors and model.json)"
        ) from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{path}: not a valid model description ({exc})") from exc


def load_model(
    directory: str | os.PathLike[str], *, verify: bool = True
) -> tuple[ResNetV2, ModelInfo]:
    """Rebuild a saved model on CPU.

    Raises:
        ValueError: the weights' sha256 differs from model.json (corrupt or tampered file).
    """
    info = read_model_info(directory)
    payload = (Path(directory) / WEIGHTS_FILE).read_bytes()
    if verify and hashlib.sha256(payload).hexdigest() != info.sha256:
        raise ValueError(
            f"{directory}: {WEIGHTS_FILE} does not match the sha256 recorded in "
            f"{METADATA_FILE}; the file is corrupt — restore it or train the model again"
        )
    model = create_model(info.arch, len(info.classes))
    model.load_state_dict(load_safetensors(payload))
    return model, info


# --- resumable training state -------------------------------------------------------------


@dataclass
class TrainingState:
    """Everything needed to continue a run exactly where it stopped."""

    step: int
    model: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor]
    meta: dict[str, Any]


def save_training_state(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    meta: dict[str, Any],
) -> None:
    """Atomically write model weights, SGD momentum buffers, the step and JSON metadata."""
    names = {id(param): name for name, param in model.named_parameters()}
    tensors = {f"model/{key}": value for key, value in _state_for_saving(model).items()}  # type: ignore[arg-type]
    for group in optimizer.param_groups:
        for param in group["params"]:
            buffer = optimizer.state.get(param, {}).get("momentum_buffer")
            if buffer is not None:
                tensors[f"momentum/{names[id(param)]}"] = buffer.detach().cpu().contiguous()
    metadata = {"step": str(step), "meta": json.dumps(meta)}
    payload = save_safetensors(tensors, metadata=metadata)
    with atomic_write(path) as handle:
        handle.write(payload)


def load_training_state(path: str | os.PathLike[str]) -> TrainingState:
    """Read a state written by `save_training_state` (no unpickling)."""
    payload = Path(path).read_bytes()
    try:
        tensors = load_safetensors(payload)
        header_size = int.from_bytes(payload[:8], "little")
        metadata = json.loads(payload[8 : 8 + header_size])["__metadata__"]
    except (SafetensorError, ValueError, KeyError) as exc:
        raise ValueError(
            f"{path}: unreadable training checkpoint ({exc}); delete it to restart the run"
        ) from exc
    return TrainingState(
        step=int(metadata["step"]),
        model={k[6:]: v for k, v in tensors.items() if k.startswith("model/")},
        momentum={k[9:]: v for k, v in tensors.items() if k.startswith("momentum/")},
        meta=json.loads(metadata["meta"]),
    )


def restore_training_state(
    state: TrainingState, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Copy a saved state into a model and its SGD optimizer, in place."""
    model.load_state_dict(state.model)
    for name, param in model.named_parameters():
        if name in state.momentum:
            buffer = state.momentum[name].to(device=param.device, dtype=param.dtype)
            optimizer.state[param]["momentum_buffer"] = buffer
