"""Upstream data: many classes, one or several labels per image, and the inception crop.

Sources: an ImageFolder (one label each) or a manifest, CSV (`uri,labels` with labels
joined by `|`) or JSONL (`{"uri": ..., "labels": [...]}`), uris relative to the manifest.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bit_core.data import LabeledImages
from bit_core.upstream import CROP_MIN_AREA

# Inception crop as in BiT's upstream input pipeline: a random box of 5%..100% of the area
# with aspect ratio in [3/4, 4/3], resized to the training resolution, then a random flip.
CROP_AREA = (CROP_MIN_AREA, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class UpstreamImages:
    """Images with one or more class indices each (the first is `images.labels`)."""

    images: LabeledImages
    label_sets: tuple[tuple[int, ...], ...]

    @property
    def multi_label(self) -> bool:
        return any(len(labels) > 1 for labels in self.label_sets)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.images.classes

    def __len__(self) -> int:
        return len(self.images)

    def multi_hot(self) -> torch.Tensor:
        """(N, C) float targets: 1 for every label of an image."""
        table = torch.zeros(len(self), len(self.classes))
        for row, labels in enumerate(self.label_sets):
            table[row, list(labels)] = 1.0
        return table

    @classmethod
    def from_folder(cls, root: str | Path) -> UpstreamImages:
        images = LabeledImages.from_folder(root)
        return cls(images, tuple((label,) for label in images.labels))

    @classmethod
    def from_manifest(cls, path: str | Path) -> UpstreamImages:
        """Read a CSV or JSONL manifest; every error names the line."""
        path = Path(path)
        rows = _read_manifest(path)
        if not rows:
            raise ValueError(f"{path}: the manifest lists no images")
        classes = sorted({label for _, labels in rows for label in labels})
        index = {name: i for i, name in enumerate(classes)}
        sources = [str(uri if Path(uri).is_absolute() else path.parent / uri) for uri, _ in rows]
        images = LabeledImages.from_pairs(
            [(source, labels[0]) for source, (_, labels) in zip(sources, rows, strict=True)],
            classes=classes,
        )
        label_sets = tuple(tuple(sorted({index[x] for x in labels})) for _, labels in rows)
        return cls(images, label_sets)


def _read_manifest(path: Path) -> list[tuple[str, list[str]]]:
    rows: list[tuple[str, list[str]]] = []
    text = path.read_text()
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                uri, labels = str(record["uri"]), [str(x) for x in record["labels"]]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(
                    f'{path}:{number}: expected {{"uri": ..., "labels": [...]}} ({exc})'
                ) from exc
            rows.append((uri, labels))
    elif path.suffix == ".csv":
        for number, record in enumerate(csv.reader(text.splitlines()), 1):
            if number == 1 and record[:2] == ["uri", "labels"]:
                continue  # header
            if len(record) != 2:
                raise ValueError(f"{path}:{number}: expected two columns: uri,labels")
            rows.append((record[0], [x for x in record[1].split("|") if x]))
    else:
        raise ValueError(f"{path}: a manifest must be .csv or .jsonl")
    for number, (uri, labels) in enumerate(rows, 1):
        if not uri or not labels:
            raise ValueError(f"{path}: entry {number} needs a uri and at least one label")
    return rows


def inception_crop(
    images: torch.Tensor,
    size: int,
    rng: np.random.Generator,
    flip: bool = True,
    min_area: float = CROP_AREA[0],
) -> torch.Tensor:
    """Per-image random area/aspect crop resized to `size`, plus a random flip, batched.

    Args:
        images: float (N, C, H, W).
        size: output side.
        rng: the step's random source (a resumed run repeats it).
        min_area: the smallest box, as a fraction of the area (the plan's crop_min_area).
    """
    n = images.shape[0]
    area = rng.uniform(min_area, CROP_AREA[1], size=n)
    log_aspect = rng.uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1]), size=n)
    aspect = np.exp(log_aspect)
    # Box side lengths as fractions of the image, clipped to fit.
    width = np.minimum(np.sqrt(area * aspect), 1.0)
    height = np.minimum(np.sqrt(area / aspect), 1.0)
    cx = rng.uniform(-1 + width, 1 - width + 1e-9)
    cy = rng.uniform(-1 + height, 1 - height + 1e-9)
    mirror = np.where(rng.random(n) < 0.5, -1.0, 1.0) if flip else np.ones(n)
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0] = width * mirror
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy
    grid = F.affine_grid(
        torch.from_numpy(theta).to(images), [n, images.shape[1], size, size], align_corners=False
    )
    return F.grid_sample(images, grid, mode="bilinear", align_corners=False)


def sigmoid_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """JFT-style loss: independent sigmoid per class, summed over classes and images."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum")
