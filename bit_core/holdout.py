"""Images that do not train: a stratified hold-out, k folds, a cross-validated estimate.

Every split is a pure function of (labels, seed): a NumPy Generator seeded from them,
never global random state, so the same dataset and seed always give the same split.

The rules, as the product documents them:

- **Hold-out** (`holdout_split`): only when every class has at least
  HOLDOUT_MIN_PER_CLASS images. Each class gives max(1, floor(fraction * n_c + 0.5))
  of its images (round half up), so with fraction <= 0.5 each class keeps at least as
  many training images as it holds out.
- **Cross-validation** (`cross_validate_linear`), for sets too small to hold out:
  only classes with at least 2 images are tested (a held-out image of a 1-image class
  would leave its class without a training image); 1-image classes stay in every
  training fold. With no class of 2 images there is no estimate (None). Then, with m
  the smallest tested class:
    - m >= 5: stratified 5-fold;
    - m in 2..4: leave-one-out over the tested images (a k = m fold would train on as
      little as 1 image per class, an estimate of a smaller set than the one trained),
      unless more than LEAVE_ONE_OUT_MAX_IMAGES images are tested: then k = m folds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bit_core.linear import fit_head

HOLDOUT_MIN_PER_CLASS = 8
DEFAULT_HOLDOUT_FRACTION = 0.2
MAX_HOLDOUT_FRACTION = 0.5
DEFAULT_FOLDS = 5
LEAVE_ONE_OUT_MAX_IMAGES = 200  # each image is one head fit: bounded to keep it seconds
CV_LABEL = "estimate of linear-probe quality on frozen features"
# Salts: the hold-out and the folds of one seed are independent draws.
_HOLDOUT_SALT = 0x401D
_FOLDS_SALT = 0xF01D


def _by_class(labels: Sequence[int]) -> dict[int, list[int]]:
    members: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        members.setdefault(int(label), []).append(index)
    return dict(sorted(members.items()))


def holdout_split(
    labels: Sequence[int],
    *,
    fraction: float,
    seed: int,
    min_per_class: int = HOLDOUT_MIN_PER_CLASS,
) -> tuple[list[int], list[int]] | None:
    """A stratified, seeded hold-out.

    Args:
        labels: the class index of each image.
        fraction: the share of each class to hold out, 0 to 0.5 (0: no hold-out).
        seed: the same seed and labels give the same split.
        min_per_class: a class with fewer images makes the whole split None.

    Returns:
        (train indices, held-out indices), each sorted, disjoint and covering every
        image; None when fraction is 0 or a class has fewer than `min_per_class` images.
    """
    if not 0.0 <= fraction <= MAX_HOLDOUT_FRACTION:
        raise ValueError(
            f"hold-out fraction {fraction} is outside 0..{MAX_HOLDOUT_FRACTION}; "
            "give e.g. 0.2, or 0 to hold nothing out"
        )
    members = _by_class(labels)
    if fraction == 0 or not members or min(map(len, members.values())) < min_per_class:
        return None
    rng = np.random.default_rng([seed, _HOLDOUT_SALT])
    held: list[int] = []
    for indices in members.values():
        take = max(1, math.floor(fraction * len(indices) + 0.5))
        order = rng.permutation(len(indices))
        held.extend(indices[i] for i in order[:take])
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)


def stratified_folds(
    labels: Sequence[int], *, k: int, seed: int
) -> list[tuple[list[int], list[int]]]:
    """k stratified folds: each class's images, shuffled, dealt round the folds in turn.

    The deal continues from fold to fold across classes, so fold sizes differ by at most
    one. Test sets are disjoint and together cover every image.

    Returns:
        [(train indices, test indices)] * k, each sorted.
    """
    if not 2 <= k <= len(labels):
        raise ValueError(f"k = {k} folds for {len(labels)} images; need 2 <= k <= images")
    rng = np.random.default_rng([seed, _FOLDS_SALT])
    fold_of = np.empty(len(labels), dtype=np.int64)
    dealt = 0
    for indices in _by_class(labels).values():
        for position, i in enumerate(rng.permutation(len(indices))):
            fold_of[indices[i]] = (dealt + position) % k
        dealt += len(indices)
    everything = np.arange(len(labels))
    return [
        (everything[fold_of != f].tolist(), everything[fold_of == f].tolist()) for f in range(k)
    ]


def cross_validate_linear(
    features: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    num_classes: int,
    *,
    seed: int,
    k: int | None = None,
    mirrors: torch.Tensor | None = None,
    classes: Sequence[str] | None = None,
) -> dict[str, Any] | None:
    """Cross-validated top-1 of a linear head on frozen features (the module's rule).

    Args:
        features: (N, F) features of the N images (one row each).
        labels: (N,) class indices.
        num_classes: the head's outputs.
        seed: fixes the folds.
        k: force k stratified folds over the tested images (default: the rule).
        mirrors: optional (N, F) features of each image's mirrored copy, row for row;
            a copy trains with its image and is never tested (testing on the mirror of a
            training image would leak it).
        classes: names to key per-class recall by (default: the class index, as text).

    Returns:
        {"kind": "cross_validated", "method": "k-fold" | "leave-one-out", "folds",
        "top1" (mean over folds), "top1_std" (over folds), "top1_sem" (standard error
        of that mean), "fold_top1", "per_class_recall" (tested classes), "count" (tested
        images), "untested_classes", "label"}; None when no class has 2 images.
    """
    y = torch.as_tensor(labels, dtype=torch.long)
    n = int(y.numel())
    counts = torch.bincount(y, minlength=num_classes)
    tested_classes = [c for c in range(num_classes) if counts[c] >= 2]
    if not tested_classes:
        return None
    tested = [i for i in range(n) if counts[y[i]] >= 2]
    always_train = [i for i in range(n) if counts[y[i]] == 1]
    smallest = min(int(counts[c]) for c in tested_classes)
    if k is None:
        if smallest >= DEFAULT_FOLDS:
            k = DEFAULT_FOLDS
        elif len(tested) <= LEAVE_ONE_OUT_MAX_IMAGES:
            k = len(tested)
        else:
            k = smallest
    method = "leave-one-out" if k == len(tested) else "k-fold"
    folds = stratified_folds([int(y[i]) for i in tested], k=k, seed=seed)

    correct = torch.zeros(n, dtype=torch.bool)
    fold_top1 = []
    for train_pos, test_pos in folds:
        train = torch.tensor(always_train + [tested[p] for p in train_pos], dtype=torch.long)
        test = torch.tensor([tested[p] for p in test_pos], dtype=torch.long)
        x, t = features[train], y[train]
        if mirrors is not None:
            x, t = torch.cat([x, mirrors[train]]), torch.cat([t, t])
        weight, bias, _ = fit_head(x.float(), t, num_classes)
        hits = (features[test].float() @ weight.T + bias).argmax(1) == y[test]
        correct[test] = hits
        fold_top1.append(float(hits.double().mean()))
    names = list(classes) if classes is not None else [str(c) for c in range(num_classes)]
    recall = {names[c]: float(correct[y == c].double().mean()) for c in tested_classes}
    mean = float(np.mean(fold_top1))
    std = float(np.std(fold_top1, ddof=1)) if k > 1 else 0.0
    return {
        "kind": "cross_validated",
        "method": method,
        "folds": k,
        "top1": mean,
        "top1_std": std,
        "top1_sem": std / math.sqrt(k),
        "fold_top1": fold_top1,
        "per_class_recall": recall,
        "count": len(tested),
        "untested_classes": [names[c] for c in range(num_classes) if counts[c] == 1],
        "label": CV_LABEL,
    }
