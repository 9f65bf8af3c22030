"""Inference backends: what runs a backbone's forward, images -> pre-logit features.

Every backend runs the same graph (weight standardization folded into plain convolutions)
on the same preprocessed batch; the head, the temperature and the softmax stay in torch
(`bit_core.predict`), so the answer is computed the same way whichever backend ran.

- **torch**: eager PyTorch, with autocast (bf16 on CUDA) and channels_last where they pay.
- **onnxruntime**: the backbone exported to ONNX once, cached in a folder by the weights'
  sha256, run by ONNX Runtime (CUDA or TensorRT providers where installed, else the CPU).
  Needs the optional `onnxruntime` package (`pip install 'bit-service[onnxruntime]'`).

`auto` picks what benchmarks/backend_speed.py measured faster for the device (BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from bit_core.atomic import atomic_write
from bit_core.device import autocast_for, to_device_layout, use_channels_last
from bit_core.resnetv2 import ResNetV2

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime")
# An ONNX Runtime session holds about this many copies of the weights it was built from
# (the graph as read, its initializers, the optimized graph's): what a model cache must
# count for it. Measured per whole model by benchmarks/many_models.py (BENCHMARKS.md).
ONNX_SESSION_WEIGHT_COPIES = 3
BACKEND_CHOICES = ("auto", *BACKENDS)
# Bumped when the exported graph changes, so an older cached file is never reused.
ONNX_GRAPH_VERSION = 1
ONNX_OPSET = 17


class BackendUnavailable(RuntimeError):
    """The backend asked for is not installed or cannot run on this device."""


def onnxruntime_installed() -> bool:
    """onnxruntime runs the graph; onnx is what torch.onnx.export writes it with."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def available_backends(device: torch.device) -> list[str]:
    """The backends that can run on `device` here: torch always; onnxruntime when installed,
    and on a GPU only with its CUDA provider (the onnxruntime-gpu package)."""
    found = ["torch"]
    if onnxruntime_installed():
        import onnxruntime as ort

        if device.type == "cpu" or "CUDAExecutionProvider" in ort.get_available_providers():
            found.append("onnxruntime")
    return found


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend to use for `name` ('auto', 'torch' or 'onnxruntime') on `device`.

    `auto` is onnxruntime on a CPU when it is installed (measured faster there), and torch
    otherwise: on a GPU only torch has been measured here.
    """
    if name not in BACKEND_CHOICES:
        raise ValueError(
            f"unknown inference backend '{name}'; use one of {', '.join(BACKEND_CHOICES)}"
        )
    if name == "auto":
        return "onnxruntime" if device.type == "cpu" and onnxruntime_installed() else "torch"
    if name == "onnxruntime" and not onnxruntime_installed():
        raise BackendUnavailable(
            "the onnxruntime inference backend needs the onnxruntime package: "
            "pip install 'bit-service[onnxruntime]', or set BIT_INFERENCE_BACKEND=torch"
        )
    return name


class FeatureExtractor(Protocol):
    """A loaded backbone: preprocessed images (N, 3, H, W) in [-1, 1] -> features (N, F)."""

    backend: str
    device: torch.device
    num_features: int
    nbytes: int  # memory it holds for its weights
    forwards: int  # forward calls so far (observability, and tests of shared batches)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


def _weight_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class TorchFeatures:
    """Eager PyTorch over a prepared model's `pre_logits`."""

    backend = "torch"

    def __init__(
        self, model: ResNetV2, device: torch.device, precision: str = "auto", *, crop: int = 0
    ) -> None:
        """`model` is prepared here (eval, kernels standardized once) and moved to `device`;
        `crop` (the image side it will mostly see) picks the weights' memory layout."""
        self.device = device
        self.precision = precision
        self.model = model.prepare_for_inference().to(device)
        if use_channels_last(device, crop):
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.num_features = model.num_features
        self.nbytes = _weight_bytes(self.model)
        self.forwards = 0
        # What a forward calls: benchmarks swap in a traced or compiled version of it.
        self.graph: Callable[[torch.Tensor], torch.Tensor] = self.model.pre_logits

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        batch = to_device_layout(batch.to(self.device, non_blocking=True), self.device)
        with autocast_for(self.device, self.precision):
            return self.graph(batch).float()


class PreLogits(nn.Module):
    """The exported graph: images -> pooled features."""

    def __init__(self, model: ResNetV2) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.pre_logits(images)


def onnx_cache_path(cache_dir: str | os.PathLike[str], sha256: str) -> Path:
    """Where the ONNX graph of the backbone with weights `sha256` is cached."""
    return Path(cache_dir) / f"{sha256}.features.v{ONNX_GRAPH_VERSION}.onnx"


def export_features_onnx(model: ResNetV2, out: str | os.PathLike[str]) -> Path:
    """Write `model`'s backbone (to pre-logit features) as ONNX, atomically.

    Kernels are standardized first, so the graph holds plain convolutions. Batch and image
    size are dynamic: one graph serves every crop a base is fine-tuned at.
    """
    model.prepare_for_inference()
    graph = PreLogits(model).eval()
    buffer = io.BytesIO()
    # The TorchScript exporter warns about its own deprecation and constant folding.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (torch.zeros(1, 3, 64, 64),),
            buffer,  # type: ignore[arg-type]  # a file object works as well
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={
                "images": {0: "batch", 2: "height", 3: "width"},
                "features": {0: "batch"},
            },
            opset_version=ONNX_OPSET,
            dynamo=False,  # the TorchScript exporter: no onnxscript needed
        )
    with atomic_write(out) as handle:
        handle.write(buffer.getvalue())
    return Path(out)


# Cached graphs are written by whichever thread (or process) needs one first; threads of
# one process wait for a single export instead of each making their own.
_export_lock = threading.Lock()


def cached_features_onnx(model: ResNetV2, sha256: str, cache_dir: str | os.PathLike[str]) -> Path:
    """The cached ONNX graph of `model` (weights `sha256`), exported on first use."""
    path = onnx_cache_path(cache_dir, sha256)
    with _export_lock:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            log.info("exporting the backbone %s to ONNX at %s", sha256[:12], path)
            export_features_onnx(model, path)
    return path


def _providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda":
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        chosen = [p for p in wanted if p in available]
        if not chosen:
            raise BackendUnavailable(
                "onnxruntime has no CUDA provider here: pip install onnxruntime-gpu, "
                "or set BIT_INFERENCE_BACKEND=torch"
            )
        return [*chosen, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxFeatures:
    """ONNX Runtime over the exported backbone graph (fp32)."""

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: torch.device,
        *,
        num_features: int,
        nbytes: int,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # As many threads as torch uses for a forward: one forward runs at a time anyway
        # (the service's single forward thread), and more would only contend. Each session
        # keeps its own pool: a process-wide one (onnxruntime's global thread pool) would
        # break any other session the process opens without asking for it. Only the pool
        # of the session that just ran spins; the others sleep.
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: warnings name internal graph nodes
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=_providers(device)
        )
        self.device = device
        self.num_features = num_features
        self.nbytes = nbytes
        self.forwards = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        images = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        (features,) = self.session.run(["features"], {"images": images})
        return torch.from_numpy(features)


def make_features(
    model: ResNetV2,
    sha256: str,
    *,
    backend: str,
    device: torch.device,
    precision: str = "auto",
    crop: int = 0,
    onnx_cache_dir: str | os.PathLike[str] | None = None,
) -> FeatureExtractor:
    """A backbone of `backend` for `model` (whose weights hash to `sha256`).

    Args:
        backend: 'torch' or 'onnxruntime' (already resolved, see `resolve_backend`).
        onnx_cache_dir: where ONNX graphs are cached (default `default_onnx_cache_dir()`).
    """
    if backend == "torch":
        return TorchFeatures(model, device, precision, crop=crop)
    if backend != "onnxruntime":
        raise ValueError(f"unknown inference backend '{backend}'")
    if not onnxruntime_installed():
        resolve_backend(backend, device)  # raises BackendUnavailable, saying what to do
    nbytes = ONNX_SESSION_WEIGHT_COPIES * _weight_bytes(model)
    path = cached_features_onnx(model, sha256, onnx_cache_dir or default_onnx_cache_dir())
    return OnnxFeatures(path, device, num_features=model.num_features, nbytes=nbytes)


def default_onnx_cache_dir() -> Path:
    """`$BIT_HOME/cache/onnx` (BIT_HOME defaults to `./.bit`)."""
    return Path(os.environ.get("BIT_HOME") or ".bit").expanduser() / "cache" / "onnx"
