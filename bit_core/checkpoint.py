"""Our own files: trained models and resumable training state, both as safetensors.

Nothing here unpickles: safetensors holds tensors only, metadata is JSON. A model is a
directory with `weights.safetensors` and `model.json` (architecture, ordered class names,
resolution, plan, metrics and the weights' sha256). Training state is one safetensors file
(model, optimizer momentum, step, sampler state, plan) written atomically.

A linear model shares its backbone: its directory holds only the head (`head.safetensors`)
and model.json names the base by the sha256 of the backbone's weights. The base itself is
stored once, in a base store (a directory per sha256 with `weights.safetensors` and
`base.json`), and `load_model` puts the two together.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from bit_core.atomic import atomic_write
from bit_core.registry import create_model
from bit_core.resnetv2 import ResNetV2

WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "model.json"
HEAD_FILE = "head.safetensors"
BASE_METADATA_FILE = "base.json"
FORMAT_VERSION = 1
# Where a shared linear model's features are taken: the pooled output after the last
# GroupNorm and ReLU (ResNetV2.pre_logits). The head's own tensors are everything else.
FEATURES_LAYER = "pre_logits"
HEAD_PREFIX = "head.conv."


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


def weights_file_of(info: ModelInfo) -> str:
    """The file of a model directory that `info.sha256` is the hash of."""
    return HEAD_FILE if info.shared_base else WEIGHTS_FILE


def split_state(model: ResNetV2) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone tensors, head tensors) of a model's state, ready to save."""
    state = _state_for_saving(model)
    head = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    return {k: v for k, v in state.items() if k not in head}, head


def save_shared_linear(
    directory: str | os.PathLike[str], model: ResNetV2, info: ModelInfo, base: dict[str, str]
) -> ModelInfo:
    """Write a linear model as its head plus `base` ({"sha256", "name"} of its stored
    backbone, see `BaseStore.put`); returns the info with the head's sha256 filled in."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if len(info.classes) != model.num_classes:
        raise ValueError(f"{len(info.classes)} class names for a {model.num_classes}-class head")
    _, head = split_state(model)
    payload = save_safetensors(head)
    with atomic_write(directory / HEAD_FILE) as handle:
        handle.write(payload)
    info.sha256 = hashlib.sha256(payload).hexdigest()
    info.shared_base = {**base, "layer": FEATURES_LAYER}
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


def _read_checked(path: Path, sha256: str, *, verify: bool, what: str) -> bytes:
    payload = path.read_bytes()
    if verify and hashlib.sha256(payload).hexdigest() != sha256:
        raise ValueError(
            f"{path}: does not match the sha256 recorded in {what}; the file is corrupt — "
            "restore it or train the model again"
        )
    return payload


def load_head(
    directory: str | os.PathLike[str], info: ModelInfo | None = None, *, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, F), bias (C,)) of a shared linear model's head (sha256 checked)."""
    info = info or read_model_info(directory)
    payload = _read_checked(
        Path(directory) / HEAD_FILE, info.sha256, verify=verify, what=METADATA_FILE
    )
    head = load_safetensors(payload)
    return head[f"{HEAD_PREFIX}weight"].flatten(1), head[f"{HEAD_PREFIX}bias"]


def load_model(
    directory: str | os.PathLike[str],
    *,
    verify: bool = True,
    bases: BaseStore | None = None,
) -> tuple[ResNetV2, ModelInfo]:
    """Rebuild a saved model on CPU; a shared linear model gets its base from `bases`
    (default: `LocalBaseStore()`, the bases of `$BIT_HOME`).

    Raises:
        ValueError: a file's sha256 differs from the one recorded (corrupt or tampered).
        FileNotFoundError: a shared linear model's base is not in `bases`.
    """
    info = read_model_info(directory)
    model = create_model(info.arch, len(info.classes))
    if info.shared_base is None:
        payload = _read_checked(
            Path(directory) / WEIGHTS_FILE, info.sha256, verify=verify, what=METADATA_FILE
        )
        model.load_state_dict(load_safetensors(payload))
        return model, info
    base_sha = info.shared_base["sha256"]
    backbone = load_backbone_state((bases or LocalBaseStore()).get(base_sha), base_sha)
    weight, bias = load_head(directory, info, verify=verify)
    head = {f"{HEAD_PREFIX}weight": weight[:, :, None, None], f"{HEAD_PREFIX}bias": bias}
    model.load_state_dict({**backbone, **head})
    return model, info


# --- shared bases ---------------------------------------------------------------------------


def backbone_payload(model: ResNetV2) -> tuple[bytes, str]:
    """The backbone's weights as safetensors bytes, and their sha256 (the base's key)."""
    backbone, _ = split_state(model)
    payload = save_safetensors(backbone)
    return payload, hashlib.sha256(payload).hexdigest()


def write_base(
    directory: str | os.PathLike[str],
    model: ResNetV2,
    *,
    arch: str,
    name: str,
    payload: tuple[bytes, str] | None = None,
) -> str:
    """Write `model`'s backbone as a base directory; returns its sha256. `payload` is
    `backbone_payload(model)` when the caller has it already."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights, sha256 = payload or backbone_payload(model)
    with atomic_write(directory / WEIGHTS_FILE) as handle:
        handle.write(weights)
    meta = {
        "arch": arch,
        "sha256": sha256,
        "name": name,
        "layer": FEATURES_LAYER,
        "num_features": model.num_features,
    }
    # Last: a directory with base.json is complete.
    with atomic_write(directory / BASE_METADATA_FILE) as handle:
        handle.write(json.dumps(meta, indent=2).encode())
    return sha256


def read_base_info(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """`base.json` of a base directory."""
    path = Path(directory) / BASE_METADATA_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{directory}: no {BASE_METADATA_FILE}; not a stored base"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a valid base description ({exc})") from exc
    if not isinstance(data, dict) or not {"arch", "sha256"} <= set(data):
        raise ValueError(f"{path}: a base description needs 'arch' and 'sha256'")
    return data


def load_backbone_state(
    directory: str | os.PathLike[str], sha256: str, *, verify: bool = True
) -> dict[str, torch.Tensor]:
    """The backbone tensors of a stored base, checked against `sha256`."""
    payload = _read_checked(
        Path(directory) / WEIGHTS_FILE, sha256, verify=verify, what="the model's shared_base"
    )
    return load_safetensors(payload)


def load_base(directory: str | os.PathLike[str], sha256: str) -> ResNetV2:
    """A stored base as a model whose features are the base's (its 1-class head is unused)."""
    meta = read_base_info(directory)
    model = create_model(meta["arch"], 1)
    state = load_backbone_state(directory, sha256)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not key.startswith(HEAD_PREFIX) for key in missing):
        raise ValueError(f"{directory}: the base's weights do not fit {meta['arch']}")
    return model


class BaseStore(Protocol):
    """Where shared bases live: one directory per backbone sha256."""

    def put(self, model: ResNetV2, *, arch: str, name: str) -> dict[str, str]:
        """Store `model`'s backbone unless already there; {"sha256", "name"} of the base."""
        ...

    def get(self, sha256: str) -> Path:
        """A local directory holding the base `sha256` (FileNotFoundError if unknown)."""
        ...


def default_bases_dir() -> Path:
    """`$BIT_HOME/bases` (BIT_HOME defaults to `./.bit`)."""
    return Path(os.environ.get("BIT_HOME") or ".bit").expanduser() / "bases"


class LocalBaseStore:
    """Bases in a local folder (`bit finetune --mode linear`, `bit predict`)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_bases_dir()

    def put(self, model: ResNetV2, *, arch: str, name: str) -> dict[str, str]:
        payload = backbone_payload(model)
        directory = self.root / payload[1]
        if not (directory / BASE_METADATA_FILE).is_file():
            write_base(directory, model, arch=arch, name=name, payload=payload)
        return {"sha256": payload[1], "name": name}

    def get(self, sha256: str) -> Path:
        directory = self.root / sha256
        if not (directory / BASE_METADATA_FILE).is_file():
            raise FileNotFoundError(
                f"the shared base {sha256[:12]}… of this linear model is not in {self.root}; "
                "set BIT_HOME to the folder it was trained under, or move the model with "
                "`bit export --format bundle` (a bundle is self-contained)"
            )
        return directory


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
