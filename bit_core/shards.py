"""WebDataset-format tar shards for large upstream sets, read by every rank without overlap.

A shard is a tar whose members are grouped by key: `KEY.jpg|jpeg|png|webp` holds the image,
`KEY.cls` its labels (class names separated by commas) or `KEY.json` `{"labels": [...]}`.
`classes.txt` beside the shards lists every class, one per line, in index order.
Rank r of W reads shards r, r+W, r+2W, ...; within an epoch its shards and their samples
come in an order fixed by (seed, epoch, rank), so a resumed run skips exactly the samples
it had consumed and sees the same stream as an uninterrupted one.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bit_core.images import load_square

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CLASSES_FILE = "classes.txt"


@dataclass(frozen=True)
class ShardSet:
    """The shards of a dataset and its class list."""

    shards: tuple[Path, ...]
    classes: tuple[str, ...]
    num_examples: int
    multi_label: bool

    def __len__(self) -> int:
        return self.num_examples

    @classmethod
    def from_dir(cls, directory: str | Path) -> ShardSet:
        directory = Path(directory)
        shards = tuple(sorted(directory.glob("*.tar")))
        if not shards:
            raise ValueError(f"{directory}: no .tar shards")
        classes_file = directory / CLASSES_FILE
        if not classes_file.exists():
            raise ValueError(f"{directory}: missing {CLASSES_FILE} (one class name per line)")
        classes = tuple(
            line.strip() for line in classes_file.read_text().splitlines() if line.strip()
        )
        scans = [_scan(shard) for shard in shards]
        return cls(shards, classes, sum(n for n, _ in scans), any(multi for _, multi in scans))

    def for_rank(self, rank: int, world: int) -> tuple[Path, ...]:
        mine = self.shards[rank::world]
        if not mine:
            raise ValueError(f"{len(self.shards)} shards cannot feed {world} ranks: write more")
        return mine


def _scan(shard: Path) -> tuple[int, bool]:
    """(images in the shard, whether any sample has several labels), without decoding."""
    images, multi = 0, False
    with tarfile.open(shard) as archive:
        for member in archive:
            name = member.name.lower()
            if name.endswith(IMAGE_SUFFIXES):
                images += 1
            elif name.endswith((".cls", ".json")) and not multi:
                handle = archive.extractfile(member)
                text = handle.read().decode() if handle else ""
                labels = json.loads(text)["labels"] if name.endswith(".json") else text.split(",")
                multi = len([x for x in labels if str(x).strip()]) > 1
    return images, multi


def _samples(shard: Path, classes: dict[str, int]) -> Iterator[tuple[str, bytes, list[int]]]:
    """(name, image bytes, label indices) of one shard, in tar order."""
    pending: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as archive:
        for member in archive:
            if not member.isfile():
                continue
            key, _, suffix = member.name.rpartition(".")
            handle = archive.extractfile(member)
            assert handle is not None
            pending.setdefault(key, {})["." + suffix.lower()] = handle.read()
    for key, parts in pending.items():
        image = next((parts[s] for s in IMAGE_SUFFIXES if s in parts), None)
        if image is None:
            continue
        if ".json" in parts:
            names = [str(x) for x in json.loads(parts[".json"])["labels"]]
        elif ".cls" in parts:
            names = [x.strip() for x in parts[".cls"].decode().split(",") if x.strip()]
        else:
            raise ValueError(f"{shard}: sample '{key}' has no .cls or .json labels")
        try:
            yield f"{shard.name}:{key}", image, [classes[name] for name in names]
        except KeyError as exc:
            raise ValueError(
                f"{shard}: sample '{key}' has label {exc} not in {CLASSES_FILE}"
            ) from exc


def shard_batches(
    shards: ShardSet,
    *,
    rank: int,
    world: int,
    batch_size: int,
    size: int,
    steps: range,
    seed: int,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(step, uint8 images (B, 3, size, size), multi-hot targets (B, C)) for this rank."""
    index = {name: i for i, name in enumerate(shards.classes)}
    mine = shards.for_rank(rank, world)

    def stream() -> Iterator[tuple[str, bytes, list[int]]]:
        epoch = 0
        while True:
            rng = np.random.default_rng([seed, epoch, rank])
            for shard_index in rng.permutation(len(mine)):
                samples = list(_samples(mine[shard_index], index))
                for order in rng.permutation(len(samples)):
                    yield samples[order]
            epoch += 1

    samples = stream()
    for _ in range(steps.start * batch_size):  # resume: skip what earlier steps consumed
        next(samples)
    for step in steps:
        batch = [next(samples) for _ in range(batch_size)]
        pixels = torch.stack(
            [torch.from_numpy(load_square(image, size, name=name)) for name, image, _ in batch]
        )
        targets = torch.zeros(batch_size, len(shards.classes))
        for row, (_, _, labels) in enumerate(batch):
            targets[row, labels] = 1.0
        yield step, pixels.to(device), targets.to(device)
