"""Labeled image sets and the step-indexed, checkpointable sampler.

A training run asks for "the batch of step t"; the answer depends only on (seed, t), so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bit_core.images import ImageSource, image_size, load_square

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
# Few-shot sets are decoded once and kept in memory up to this size; larger sets stream
# through DataLoader worker processes.
PRELOAD_LIMIT_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class LabeledImages:
    """An ordered list of (image, class index) with the class names in index order."""

    sources: tuple[ImageSource, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.sources)

    @classmethod
    def from_pairs(
        cls,
        pairs: Sequence[tuple[ImageSource, str]],
        classes: Sequence[str] | None = None,
        names: Sequence[str] | None = None,
    ) -> LabeledImages:
        """Build from (path or bytes, label name); classes default to the sorted labels,
        `names` (how errors refer to each image) to the paths."""
        if not pairs:
            raise ValueError("no images given: provide at least one (image, label) pair")
        class_names = sorted({label for _, label in pairs}) if classes is None else list(classes)
        index = {name: i for i, name in enumerate(class_names)}
        unknown = sorted({label for _, label in pairs if label not in index})
        if unknown:
            raise ValueError(f"labels {unknown} are not among the classes {class_names}")
        if names is not None and len(names) != len(pairs):
            raise ValueError(f"{len(names)} names for {len(pairs)} images")
        return cls(
            sources=tuple(source for source, _ in pairs),
            labels=tuple(index[label] for _, label in pairs),
            classes=tuple(class_names),
            names=tuple(names)
            if names is not None
            else tuple(
                f"image #{i}" if isinstance(source, bytes) else str(source)
                for i, (source, _) in enumerate(pairs)
            ),
        )

    @classmethod
    def from_folder(cls, root: str | Path, classes: Sequence[str] | None = None) -> LabeledImages:
        """ImageFolder layout: one sub-directory per class, images inside.

        Hidden files and folders are skipped; any other file must be an image (it fails loudly when
        decoded otherwise), so a stray file is reported rather than silently ignored.
        """
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"{root}: not a directory; expected one sub-directory per class")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise ValueError(f"{root}: no class sub-directories (expected {root}/<class>/<image>)")
        pairs: list[tuple[ImageSource, str]] = []
        for class_dir in class_dirs:
            files = sorted(
                path
                for path in class_dir.rglob("*")
                if path.is_file()
                and not any(part.startswith(".") for part in path.relative_to(class_dir).parts)
            )
            if not files:
                raise ValueError(f"{class_dir}: class '{class_dir.name}' has no images")
            pairs.extend((str(path), class_dir.name) for path in files)
        return cls.from_pairs(pairs, classes=classes)

    def subset(self, indices: Sequence[int]) -> LabeledImages:
        """The images at `indices`, in that order, with the same classes."""
        return LabeledImages(
            sources=tuple(self.sources[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            classes=self.classes,
            names=tuple(self.names[i] for i in indices),
        )

    def typical_hw(self, sample: int = 256) -> tuple[int, int]:
        """Median (height, width) over up to `sample` images, read from headers only."""
        step = max(1, len(self) // sample)
        sizes = [image_size(self.sources[i], name=self.names[i]) for i in range(0, len(self), step)]
        return (
            int(statistics.median(h for h, _ in sizes)),
            int(statistics.median(w for _, w in sizes)),
        )

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(np.asarray(self.labels), minlength=len(self.classes))
        return {name: int(count) for name, count in zip(self.classes, counts, strict=True)}


class SquareImages(Dataset[tuple[torch.Tensor, int]]):
    """Decodes item i to a uint8 tensor (3, size, size); used inside DataLoader workers."""

    def __init__(self, images: LabeledImages, size: int) -> None:
        self.images = images
        self.size = size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """(uint8 image, its index): targets are gathered by index, single- or multi-label."""
        array = load_square(self.images.sources[index], self.size, name=self.images.names[index])
        return torch.from_numpy(array), index


class StepSampler:
    """Yields the example indices of each training step, as a pure function of (seed, step).

    With at least `batch_size` examples it walks through seeded per-epoch permutations
    (no repeats within an epoch); with fewer — few-shot — it samples with replacement,
    as the official code does.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self._epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    @property
    def with_replacement(self) -> bool:
        return self.num_examples < self.batch_size

    def indices(self, step: int) -> np.ndarray:
        if self.with_replacement:
            rng = np.random.default_rng([self.seed, step, 0x5A])
            return rng.integers(0, self.num_examples, size=self.batch_size)
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(positions // self.num_examples):
            mask = positions // self.num_examples == epoch
            out[mask] = self._epoch_permutation(int(epoch))[positions[mask] % self.num_examples]
        return out

    def _epoch_permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(
                self.num_examples
            )
            self._epoch = epoch
        return self._permutation

    def state_dict(self) -> dict[str, Any]:
        return {"num_examples": self.num_examples, "batch_size": self.batch_size, "seed": self.seed}

    def check_compatible(self, state: dict[str, Any]) -> None:
        """Refuse to resume a run whose data or batch differ from the checkpoint's."""
        if state != self.state_dict():
            raise ValueError(
                f"cannot resume: the checkpoint was made with sampler {state}, this run has "
                f"{self.state_dict()}; use the same data, batch size and seed, or start afresh"
            )


def iterate_batches(
    images: LabeledImages,
    sampler: StepSampler,
    size: int,
    steps: range,
    *,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    targets: torch.Tensor | None = None,
    part: tuple[int, int] = (0, 1),
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(step, uint8 images (B, 3, size, size), targets (B, ...)) for each step, on `device`.

    Args:
        targets: per-image targets, indexed like `images` (default: the class indices);
            e.g. multi-hot rows for multi-label pre-training.
        part: (rank, world): this process takes every world-th example of each global
            batch, so data-parallel ranks never read the same example of a step.

    Small sets are decoded once and gathered per step; larger sets stream through a
    DataLoader whose workers decode in parallel.
    """
    rank, world = part
    table = torch.tensor(images.labels, dtype=torch.long) if targets is None else targets
    table = table.to(device)

    def step_indices(step: int) -> np.ndarray:
        return sampler.indices(step)[rank::world]

    if len(images) * 3 * size * size <= PRELOAD_LIMIT_BYTES:
        decoded = SquareImages(images, size)
        pixels = torch.stack([decoded[i][0] for i in range(len(images))]).to(device)
        for step in steps:
            index = torch.from_numpy(step_indices(step)).to(device)
            yield step, pixels[index], table[index]
        return
    loader = DataLoader(
        SquareImages(images, size),
        batch_sampler=[step_indices(step).tolist() for step in steps],
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=False,
        # Its workers' seeds come from here, not from torch's global generator (decoding
        # draws nothing, but the run neither reads nor shifts global random state).
        generator=torch.Generator().manual_seed(sampler.seed),
    )
    for step, (pixels, index) in zip(steps, loader, strict=True):
        index = index.to(device, non_blocking=True)
        yield step, pixels.to(device, non_blocking=True), table[index]
