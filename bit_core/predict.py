"""Prediction: the evaluation preprocessing, batched, with kernels standardized once."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from bit_core import augment
from bit_core.backends import FeatureExtractor, make_features, resolve_backend
from bit_core.checkpoint import (
    BaseStore,
    LocalBaseStore,
    ModelInfo,
    backbone_payload,
    load_base,
    load_head,
    load_model,
    read_model_info,
)
from bit_core.device import resolve_device
from bit_core.images import ImageSource, load_square
from bit_core.resnetv2 import ResNetV2


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float


def head_of(model: ResNetV2) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole model's head as (weight (C, F), bias (C,)) copies."""
    return model.head.conv.weight.detach().flatten(1).clone(), model.head.bias.detach().clone()


class Predictor:
    """Classifies images with a trained model: a backbone (features) and a linear head.

    Preprocessing is exactly evaluation's (resize to crop x crop, [-1, 1]). The backbone
    runs on an inference backend (`bit_core.backends`) with its conv kernels standardized
    once; the official code redoes that on every forward, which is most of a batch-1 CPU
    forward. The head, the temperature and the softmax run in torch for every backend.

    Linear models of one base share one backbone object: `backbone_key` names it (the
    base's sha256, or the model's own for a whole model), so a caller can run one
    backbone forward for a batch that mixes such models and `finish` each model's rows.
    """

    def __init__(
        self,
        features: FeatureExtractor,
        head: tuple[torch.Tensor, torch.Tensor],
        classes: list[str],
        crop: int,
        *,
        backbone_key: str = "",
        info: ModelInfo | None = None,
        temperature: float | None = None,
    ) -> None:
        """`head` is (weight (C, F), bias (C,)); `temperature` (default: the model's,
        `info.temperature`) divides the logits before the softmax; None means 1."""
        weight, bias = head
        if len(classes) != weight.shape[0]:
            raise ValueError(f"{len(classes)} class names for a {weight.shape[0]}-class model")
        if weight.shape[1] != features.num_features:
            raise ValueError(
                f"a head over {weight.shape[1]} features on a backbone of {features.num_features}"
            )
        self.features = features
        self.device = features.device
        self.backend = features.backend
        self.backbone_key = backbone_key
        self.classes = list(classes)
        self.crop = crop
        self.info = info
        self.temperature = (
            temperature
            if temperature is not None
            else (info.temperature if info is not None else None)
        )
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        self.weight = weight.detach().float().to(self.device).contiguous()
        self.bias = bias.detach().float().to(self.device)
        self.head_bytes = self.weight.nbytes + self.bias.nbytes

    @classmethod
    def from_model(
        cls,
        model: ResNetV2,
        classes: list[str],
        crop: int,
        *,
        device: str = "auto",
        precision: str = "auto",
        backend: str = "torch",
        info: ModelInfo | None = None,
        temperature: float | None = None,
        onnx_cache_dir: str | os.PathLike[str] | None = None,
    ) -> Predictor:
        """A predictor with its own backbone, split from a whole model."""
        resolved = resolve_device(device)
        # The key of the ONNX graph cache: the weights' hash, never a name that may be reused.
        key = info.sha256 if info is not None and info.sha256 else backbone_payload(model)[1]
        features = make_features(
            model,
            key,
            backend=resolve_backend(backend, resolved),
            device=resolved,
            precision=precision,
            crop=crop,
            onnx_cache_dir=onnx_cache_dir,
        )
        return cls(
            features,
            head_of(model),
            classes,
            crop,
            backbone_key=key,
            info=info,
            temperature=temperature,
        )

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        device: str = "auto",
        precision: str = "auto",
        backend: str = "auto",
        bases: BaseStore | None = None,
        onnx_cache_dir: str | os.PathLike[str] | None = None,
    ) -> Predictor:
        """Load a model directory written by `bit finetune` (sha256 checked); a shared
        linear model's base comes from `bases` (default: `$BIT_HOME/bases`)."""
        info = read_model_info(directory)
        resolved = resolve_device(device)
        chosen = resolve_backend(backend, resolved)
        if info.shared_base is None:
            model, info = load_model(directory)
            return cls.from_model(
                model,
                info.classes,
                info.crop,
                device=device,
                precision=precision,
                backend=chosen,
                info=info,
                onnx_cache_dir=onnx_cache_dir,
            )
        base_sha = info.shared_base["sha256"]
        base = load_base((bases or LocalBaseStore()).get(base_sha), base_sha)
        features = make_features(
            base,
            base_sha,
            backend=chosen,
            device=resolved,
            precision=precision,
            crop=info.crop,
            onnx_cache_dir=onnx_cache_dir,
        )
        return cls.on_backbone(features, base_sha, directory, info)

    @classmethod
    def on_backbone(
        cls,
        features: FeatureExtractor,
        backbone_key: str,
        directory: str | os.PathLike[str],
        info: ModelInfo | None = None,
    ) -> Predictor:
        """A shared linear model's predictor on an already loaded backbone of its base:
        reads only the head (a few KB)."""
        info = info or read_model_info(directory)
        head = load_head(directory, info)
        return cls(features, head, info.classes, info.crop, backbone_key=backbone_key, info=info)

    def preprocess(
        self, sources: list[ImageSource], names: list[str] | None = None
    ) -> torch.Tensor:
        """Decode images to a float batch (N, 3, crop, crop) in [-1, 1] (CPU).

        No parallel torch op (NumPy, and the resize's serial uint8 kernel): the service
        runs this on its decode threads, and a torch op that went parallel would make each
        of them a master of its own OpenMP team, which slows every forward (see
        service/inference/threads.py).
        """
        names = names or [None] * len(sources)  # type: ignore[list-item]
        arrays = [
            load_square(source, self.crop, name=name)
            for source, name in zip(sources, names, strict=True)
        ]
        return torch.from_numpy(augment.to_unit_range_array(np.stack(arrays)))

    @torch.inference_mode()
    def finish(self, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, C) from this model's backbone features (N, F):
        softmax((features @ W.T + b) / T), on the CPU."""
        logits = torch.addmm(self.bias, features.to(self.device).float(), self.weight.T)
        if self.temperature is not None:
            logits = logits / self.temperature
        return torch.softmax(logits, dim=-1).cpu()

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, C) for a preprocessed batch: softmax(logits / T)."""
        return self.finish(self.features(batch))

    def top_k(self, probabilities: torch.Tensor, k: int) -> list[list[Prediction]]:
        """The k most likely classes per row, most likely first."""
        if k < 1:
            raise ValueError(f"top_k must be at least 1, got {k}")
        values, indices = probabilities.topk(min(k, len(self.classes)), dim=-1)
        return [
            [Prediction(self.classes[i], float(p)) for p, i in zip(row_p, row_i, strict=True)]
            for row_p, row_i in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    def predict(
        self, sources: list[ImageSource], *, top_k: int = 5, batch_size: int = 64
    ) -> list[list[Prediction]]:
        """Top-k predictions for each image, in input order."""
        results: list[list[Prediction]] = []
        for start in range(0, len(sources), batch_size):
            batch = self.preprocess(sources[start : start + batch_size])
            results.extend(self.top_k(self.probabilities(batch), top_k))
        return results
