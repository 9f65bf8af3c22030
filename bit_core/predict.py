"""Prediction: the evaluation preprocessing, batched, with kernels standardized once."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from bit_core import augment
from bit_core.checkpoint import ModelInfo, load_model
from bit_core.device import autocast_for, resolve_device, to_device_layout, use_channels_last
from bit_core.images import ImageSource, load_square
from bit_core.resnetv2 import ResNetV2


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float


class Predictor:
    """Classifies images with a trained model.

    Preprocessing is exactly evaluation's (resize to crop x crop, [-1, 1]). The model's conv
    kernels are standardized once here; the official code redoes it on every forward,
    which is most of a batch-1 CPU forward.
    """

    def __init__(
        self,
        model: ResNetV2,
        classes: list[str],
        crop: int,
        *,
        device: str = "auto",
        precision: str = "auto",
        info: ModelInfo | None = None,
        temperature: float | None = None,
    ) -> None:
        """`temperature` (default: the model's, `info.temperature`) divides the logits
        before the softmax; None means 1."""
        if len(classes) != model.num_classes:
            raise ValueError(f"{len(classes)} class names for a {model.num_classes}-class model")
        self.device = resolve_device(device)
        self.precision = precision
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
        self.model = model.prepare_for_inference().to(self.device)
        if use_channels_last(self.device, crop):
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], *, device: str = "auto", precision: str = "auto"
    ) -> Predictor:
        """Load a model directory written by `bit finetune` (sha256 checked)."""
        model, info = load_model(directory)
        return cls(model, info.classes, info.crop, device=device, precision=precision, info=info)

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
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, C) for a preprocessed batch: softmax(logits / T)."""
        batch = to_device_layout(batch.to(self.device, non_blocking=True), self.device)
        with autocast_for(self.device, self.precision):
            logits = self.model(batch).float()
        if self.temperature is not None:
            logits = logits / self.temperature
        return torch.softmax(logits, dim=-1).cpu()

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
