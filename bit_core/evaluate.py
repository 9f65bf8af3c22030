"""Evaluation: top-1/top-5, per-class precision and recall, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bit_core import augment
from bit_core.data import LabeledImages, SquareImages
from bit_core.device import autocast_for, to_device_layout


@dataclass
class EvalReport:
    """Metrics of a classifier on a labeled set; `confusion[true][predicted]` counts."""

    classes: list[str]
    count: int
    loss: float
    top1: float
    top5: float
    precision: list[float]
    recall: list[float]
    confusion: list[list[int]]

    def summary(self) -> dict[str, Any]:
        """JSON-ready dict, per-class metrics keyed by class name."""
        return {
            "count": self.count,
            "loss": self.loss,
            "top1": self.top1,
            "top5": self.top5,
            "per_class": {
                name: {"precision": p, "recall": r}
                for name, p, r in zip(self.classes, self.precision, self.recall, strict=True)
            },
            "confusion": self.confusion,
            "classes": self.classes,
        }


def metrics_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, classes: list[str]
) -> EvalReport:
    """Compute the report from logits (N, C) and true labels (N,)."""
    num_classes = len(classes)
    logits, labels = logits.float().cpu(), labels.cpu()
    predicted = logits.argmax(dim=1)
    k = min(5, num_classes)
    top5 = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)
    true_positive = confusion.diag().double()
    # An empty column/row has no defined precision/recall; 0 is the conservative report.
    precision = true_positive / confusion.sum(dim=0).clamp(min=1)
    recall = true_positive / confusion.sum(dim=1).clamp(min=1)
    count = int(labels.numel())
    return EvalReport(
        classes=list(classes),
        count=count,
        loss=float(F.cross_entropy(logits, labels)) if count else 0.0,
        top1=float((predicted == labels).double().mean()) if count else 0.0,
        top5=float(top5.double().mean()) if count else 0.0,
        precision=precision.tolist(),
        recall=recall.tolist(),
        confusion=confusion.tolist(),
    )


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    images: LabeledImages,
    crop: int,
    *,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    batch_size: int = 64,
) -> torch.Tensor:
    """Logits (N, C) at the crop size: images resized to crop x crop, as BiT evaluates.

    Args:
        model: the classifier (left in eval mode).
        images: the images, in order (their labels are not read).
        crop: evaluation side (the plan's `crop`).
        device: where the model is.
        precision: autocast policy (see `bit_core.device.autocast_for`).

    Returns:
        float32 logits on the CPU, one row per image.
    """
    device = torch.device(device)
    model.eval()
    decoded = SquareImages(images, crop)
    all_logits = []
    for start in range(0, len(images), batch_size):
        items = [decoded[i][0] for i in range(start, min(start + batch_size, len(images)))]
        batch = augment.to_unit_range(torch.stack(items).to(device))
        batch = to_device_layout(batch, device)
        with autocast_for(device, precision):
            all_logits.append(model(batch).float().cpu())
    if not all_logits:
        return torch.zeros(0, int(getattr(model, "num_classes", 0)))
    return torch.cat(all_logits)


def evaluate(
    model: torch.nn.Module,
    images: LabeledImages,
    crop: int,
    *,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    batch_size: int = 64,
) -> EvalReport:
    """Evaluate at the crop size: images resized to crop x crop, as BiT evaluates.

    Args:
        model: the classifier (left in eval mode).
        images: labeled images; their class order must be the model's.
        crop: evaluation side (the plan's `crop`).
    """
    logits = predict_logits(
        model, images, crop, device=device, precision=precision, batch_size=batch_size
    )
    labels = torch.tensor(images.labels, dtype=torch.long)
    return metrics_from_logits(logits, labels, list(images.classes))
