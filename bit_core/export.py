"""A trained model out of its directory: a portable bundle, the official `.npz`, ONNX.

- **bundle**: the model as it is stored (`weights.safetensors` + `model.json`) in one `.zip`
  (or `.tar`) with exactly those two members. `bit predict` runs it as is, `read_bundle`
  unpacks it after strict checks (member names and sizes, the JSON schema, the weights'
  sha256, safetensors only: nothing is ever unpickled).
- **npz**: the official BiT layout (HWIO kernels, `resnet/...` keys, the head included),
  which the official code, timm and `bit weights import` read. The calibration temperature
  and class names are not part of that format.
- **onnx**: the inference graph with weight standardization folded into plain convolutions
  and a dynamic batch; input `images` (N, 3, crop, crop) in [-1, 1], outputs `logits` and
  `probabilities` (softmax(logits / T)). The preprocessing, class names and temperature are
  in the model's metadata_props (`bit.*`). Needs the optional `onnx` package.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bit_core.atomic import atomic_write
from bit_core.checkpoint import (
    METADATA_FILE,
    WEIGHTS_FILE,
    BaseStore,
    ModelInfo,
    load_model,
    read_model_info,
    save_model,
)
from bit_core.npz import save_bit_npz
from bit_core.registry import ARCHITECTURES

FORMATS = ("bundle", "npz", "onnx")
BUNDLE_MEMBERS = (WEIGHTS_FILE, METADATA_FILE)
MAX_METADATA_BYTES = 1 << 20
# The largest official architecture (R152x4, 21843 classes) is about 3.7 GB in float32.
MAX_WEIGHTS_BYTES = 4 << 30

# The fields of model.json and the JSON types each may hold (None: null allowed).
_INFO_TYPES: dict[str, tuple[type, ...]] = {
    "arch": (str,),
    "classes": (list,),
    "crop": (int,),
    "sha256": (str,),
    "plan": (dict,),
    "metrics": (dict,),
    "base_model": (str, type(None)),
    "format_version": (int,),
    "temperature": (float, int, type(None)),
    "shared_base": (dict, type(None)),
    "provenance": (dict,),
}


class ExportUnavailable(RuntimeError):
    """The format needs an optional package that is not installed."""


class BundleError(ValueError):
    """A file is not a valid model bundle; the message says what is wrong."""


# --- bundle -----------------------------------------------------------------------------------


def export_bundle(
    model_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    bases: BaseStore | None = None,
) -> Path:
    """Pack a model directory into a bundle: `.tar` when `out` ends so, else `.zip`.

    The weights are checked against model.json's sha256 first, so a corrupt model is never
    shipped. A linear model that shares its base (from `bases`) is written whole: a bundle
    is self-contained. Written atomically.
    """
    model_dir, out = Path(model_dir), Path(out)
    info = read_model_info(model_dir)
    if info.shared_base is not None:
        with tempfile.TemporaryDirectory(prefix="bit-whole-") as scratch:
            model, info = load_model(model_dir, bases=bases)
            info.shared_base = None
            save_model(scratch, model, info)
            return export_bundle(scratch, out)
    validate_info(info.__dict__, source=str(model_dir))
    load_model(model_dir)  # sha256 and shapes
    with atomic_write(out) as handle:
        if out.suffix == ".tar":
            with tarfile.open(fileobj=handle, mode="w") as archive:
                for name in BUNDLE_MEMBERS:
                    archive.add(model_dir / name, arcname=name, recursive=False)
        else:
            # Stored, not deflated: float weights barely compress and stay seekable.
            with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
                for name in BUNDLE_MEMBERS:
                    archive.write(model_dir / name, arcname=name)
    return out


def validate_info(data: Any, *, source: str) -> ModelInfo:
    """Check a parsed model.json strictly and return it as a ModelInfo."""
    if not isinstance(data, dict):
        raise BundleError(f"{source}: {METADATA_FILE} must be a JSON object")
    unknown = sorted(set(data) - set(_INFO_TYPES))
    missing = sorted({"arch", "classes", "crop", "sha256"} - set(data))
    if unknown or missing:
        raise BundleError(
            f"{source}: {METADATA_FILE} has unknown fields {unknown} or lacks {missing}; "
            "export the model again with `bit export --format bundle`"
        )
    for key, value in data.items():
        if not isinstance(value, _INFO_TYPES[key]) or isinstance(value, bool):
            raise BundleError(f"{source}: {METADATA_FILE} field '{key}' has the wrong type")
    classes = data["classes"]
    if (
        not classes
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise BundleError(f"{source}: 'classes' must be distinct non-empty names")
    if data["arch"] not in ARCHITECTURES:
        raise BundleError(
            f"{source}: unknown architecture '{data['arch']}'; known: {', '.join(ARCHITECTURES)}"
        )
    if not 16 <= data["crop"] <= 2048:
        raise BundleError(f"{source}: crop {data['crop']} is outside 16..2048")
    if data.get("shared_base") is not None:
        raise BundleError(
            f"{source}: a bundle must hold the whole model, not a reference to a shared base; "
            "export the model again with `bit export --format bundle`"
        )
    temperature = data.get("temperature")
    if temperature is not None and not temperature > 0:
        raise BundleError(f"{source}: temperature must be positive")
    sha = data["sha256"]
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise BundleError(f"{source}: 'sha256' must be 64 lower-case hex digits")
    return ModelInfo(**data)


def _bundle_members(path: Path, max_weights_bytes: int) -> Iterator[tuple[str, int, Any]]:
    """(name, size, opener) of each member, after checking names, types and sizes."""
    limits = {WEIGHTS_FILE: max_weights_bytes, METADATA_FILE: MAX_METADATA_BYTES}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = sorted(i.filename for i in infos)
            if names != sorted(BUNDLE_MEMBERS):
                raise BundleError(
                    f"{path}: a bundle holds exactly {list(BUNDLE_MEMBERS)}, found {names[:5]}"
                )
            for item in infos:
                if item.file_size > limits[item.filename]:
                    raise BundleError(f"{path}: '{item.filename}' is too large")
                yield item.filename, item.file_size, lambda i=item: archive.open(i)
        return
    try:
        tar = tarfile.open(path, mode="r:")  # noqa: SIM115 (closed by the `with` below)
    except tarfile.TarError as exc:
        raise BundleError(
            f"{path}: not a model bundle (.zip or .tar from `bit export --format bundle`)"
        ) from exc
    with tar:
        members = tar.getmembers()
        names = sorted(m.name for m in members)
        if names != sorted(BUNDLE_MEMBERS) or not all(m.isfile() for m in members):
            raise BundleError(
                f"{path}: a bundle holds exactly the files {list(BUNDLE_MEMBERS)}, "
                f"found {names[:5]}"
            )
        for member in members:
            if member.size > limits[member.name]:
                raise BundleError(f"{path}: '{member.name}' is too large")
            yield member.name, member.size, lambda m=member: tar.extractfile(m)


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a file that looks like a bundle (member names only)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return METADATA_FILE in archive.namelist()
        with tarfile.open(path, mode="r:") as archive:
            return METADATA_FILE in archive.getnames()
    except (tarfile.TarError, OSError, zipfile.BadZipFile):
        return False


def read_bundle(
    path: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    max_weights_bytes: int = MAX_WEIGHTS_BYTES,
) -> ModelInfo:
    """Unpack and check a bundle into `destination` (a new or empty directory).

    Checks: exactly the two members, as regular files, within their size bounds; model.json
    against the schema; the weights are the sha256 model.json names, and load as safetensors
    into the named architecture with its class count (nothing is unpickled).

    Raises:
        BundleError: any check failed (the destination may hold partial files then).
    """
    path, destination = Path(path), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    try:
        for name, size, opener in _bundle_members(path, max_weights_bytes):
            with opener() as reader, open(destination / name, "wb") as writer:
                copied = 0
                while chunk := reader.read(1 << 20):
                    copied += len(chunk)
                    if copied > size:
                        raise BundleError(f"{path}: '{name}' is longer than its header says")
                    writer.write(chunk)
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{path}: unreadable bundle ({exc})") from exc
    try:
        data = json.loads((destination / METADATA_FILE).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: {METADATA_FILE} is not JSON ({exc})") from exc
    info = validate_info(data, source=str(path))
    try:
        load_model(destination)
    except ValueError as exc:  # sha256 mismatch
        raise BundleError(str(exc)) from exc
    except Exception as exc:  # a bad safetensors header, or shapes that do not fit
        raise BundleError(f"{path}: the weights do not fit {info.arch} ({exc})") from exc
    return info


@contextlib.contextmanager
def model_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A model directory for `path`: the directory itself, or a bundle unpacked to a
    temporary directory (removed on exit)."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="bit-bundle-") as scratch:
        read_bundle(path, scratch)
        yield Path(scratch)


# --- npz --------------------------------------------------------------------------------------


def export_npz(
    model_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    bases: BaseStore | None = None,
) -> Path:
    """Write the model in the official BiT `.npz` layout, head included."""
    model, _ = load_model(model_dir, bases=bases)
    save_bit_npz(model, out)
    return Path(out)


# --- onnx -------------------------------------------------------------------------------------


class _InferenceGraph(nn.Module):
    """Images -> (logits, softmax(logits / T)); kernels already standardized."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
        return logits, torch.softmax(logits / self.temperature, dim=-1)


def onnx_metadata(info: ModelInfo) -> dict[str, str]:
    """The metadata_props an exported ONNX model carries (all values are strings)."""
    return {
        "bit.arch": info.arch,
        "bit.classes": json.dumps(info.classes),
        "bit.crop": str(info.crop),
        "bit.input": "images: float32 (N, 3, crop, crop), RGB, channels first",
        "bit.preprocessing": (
            "resize to crop x crop (bilinear, antialiased, aspect not kept), "
            "then x * 2 / 255 - 1: values in [-1, 1]"
        ),
        "bit.input_range": "[-1, 1]",
        "bit.temperature": json.dumps(info.temperature if info.temperature is not None else 1.0),
        "bit.outputs": "logits (N, C); probabilities = softmax(logits / temperature) (N, C)",
        "bit.weights_sha256": info.sha256,
        "bit.base_model": info.base_model or "",
    }


def export_onnx(
    model_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    opset: int = 17,
    bases: BaseStore | None = None,
) -> Path:
    """Export the inference graph to ONNX (weight standardization folded, dynamic batch).

    Raises:
        ExportUnavailable: the `onnx` package is not installed (`pip install 'bit-service[onnx]'`).
    """
    try:
        import onnx
    except ImportError as exc:
        raise ExportUnavailable(
            "ONNX export needs the onnx package: pip install 'bit-service[onnx]'"
        ) from exc
    model, info = load_model(model_dir, bases=bases)
    # Standardize every kernel once and store it: the graph holds plain convolutions.
    model.prepare_for_inference()
    graph = _InferenceGraph(model, info.temperature or 1.0).eval()
    example = torch.zeros(1, 3, info.crop, info.crop)
    buffer = io.BytesIO()
    # The TorchScript exporter warns about its own deprecation and constant folding.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            buffer,  # type: ignore[arg-type]  # a file object works as well
            input_names=["images"],
            output_names=["logits", "probabilities"],
            dynamic_axes={name: {0: "batch"} for name in ("images", "logits", "probabilities")},
            opset_version=opset,
            dynamo=False,  # the TorchScript exporter: no onnxscript needed
        )
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in onnx_metadata(info).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_write(out) as handle:
        handle.write(proto.SerializeToString())
    return Path(out)


def export(
    model: str | os.PathLike[str],
    format: str,
    out: str | os.PathLike[str],
    *,
    bases: BaseStore | None = None,
) -> Path:
    """Export a model directory or bundle to `format` ('bundle', 'npz' or 'onnx'); a
    linear model that shares its base gets it from `bases` and is exported whole."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format '{format}'; use one of {', '.join(FORMATS)}")
    with model_directory(model) as directory:
        writer = {"bundle": export_bundle, "npz": export_npz, "onnx": export_onnx}[format]
        return writer(directory, out, bases=bases)
