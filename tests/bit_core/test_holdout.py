"""Hold-out, folds and the cross-validated estimate: disjoint, stratified, seeded, honest."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from bit_core.holdout import (
    HOLDOUT_MIN_PER_CLASS,
    cross_validate_linear,
    holdout_split,
    stratified_folds,
)


def _labels(*counts: int) -> list[int]:
    return [c for c, n in enumerate(counts) for _ in range(n)]


def test_holdout_is_disjoint_stratified_and_seeded():
    labels = _labels(8, 10, 25, 13)
    train, held = holdout_split(labels, fraction=0.2, seed=3)  # type: ignore[misc]
    assert not set(train) & set(held)
    assert sorted(train + held) == list(range(len(labels)))
    # round half up of 0.2 * n per class: 1.6 -> 2, 2 -> 2, 5 -> 5, 2.6 -> 3
    assert Counter(labels[i] for i in held) == {0: 2, 1: 2, 2: 5, 3: 3}
    assert holdout_split(labels, fraction=0.2, seed=3) == (train, held)
    others = {tuple(holdout_split(labels, fraction=0.2, seed=s)[1]) for s in range(5)}  # type: ignore[index]
    assert len(others) == 5
    # A tiny share still holds out one image per class.
    assert len(holdout_split(labels, fraction=0.01, seed=0)[1]) == 4  # type: ignore[index]


def test_holdout_is_none_under_the_rule():
    assert holdout_split(_labels(8, 8), fraction=0.0, seed=0) is None
    assert holdout_split(_labels(8, HOLDOUT_MIN_PER_CLASS - 1), fraction=0.2, seed=0) is None
    assert holdout_split(_labels(3, 3), fraction=0.5, seed=0, min_per_class=2) is not None
    with pytest.raises(ValueError, match=r"outside 0\.\.0\.5"):
        holdout_split(_labels(8, 8), fraction=0.6, seed=0)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_are_disjoint_cover_everything_and_are_stratified(k: int):
    labels = _labels(5, 7, 11)
    folds = stratified_folds(labels, k=k, seed=1)
    assert len(folds) == k
    tests = [set(test) for _, test in folds]
    assert sum(map(len, tests)) == len(labels) == len(set().union(*tests))
    for train, test in folds:
        assert not set(train) & set(test) and len(train) + len(test) == len(labels)
        for c, n in Counter(labels).items():
            per_fold = sum(labels[i] == c for i in test)
            assert n // k <= per_fold <= -(-n // k)
    assert stratified_folds(labels, k=k, seed=1) == folds
    assert stratified_folds(labels, k=k, seed=2) != folds
    sizes = [len(test) for _, test in folds]
    assert max(sizes) - min(sizes) <= 1


def _blobs(per_class: int, classes: int, *, separable: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    centres = torch.randn(classes, 16, generator=generator) * 4
    features = torch.randn(len(labels), 16, generator=generator)
    if separable:
        features = features + centres[labels]
    else:
        labels = labels[torch.randperm(len(labels), generator=generator)]
    return features, labels


def test_cv_estimate_is_near_one_on_separable_features_and_near_chance_on_noise():
    features, labels = _blobs(10, 4, separable=True)
    estimate = cross_validate_linear(features, labels, 4, seed=0, classes=list("abcd"))
    assert estimate is not None
    assert estimate["kind"] == "cross_validated" and estimate["method"] == "k-fold"
    assert estimate["folds"] == 5 and len(estimate["fold_top1"]) == 5
    assert estimate["top1"] > 0.95 and estimate["count"] == 40
    assert set(estimate["per_class_recall"]) == set("abcd")
    assert "linear-probe" in estimate["label"]

    features, labels = _blobs(40, 4, separable=False, seed=1)
    noise = cross_validate_linear(features, labels, 4, seed=0)
    assert noise is not None and abs(noise["top1"] - 0.25) < 0.15


def test_cv_rule_leave_one_out_single_image_classes_and_none():
    features, labels = _blobs(3, 3, separable=True)
    loo = cross_validate_linear(features, labels, 3, seed=0)
    assert loo is not None and loo["method"] == "leave-one-out" and loo["folds"] == 9
    # Class 2 has one image: it always trains and is never tested.
    features, labels = features[:7], labels[:7]
    partial = cross_validate_linear(features, labels, 3, seed=0)
    assert partial is not None and partial["count"] == 6
    assert partial["untested_classes"] == ["2"] and set(partial["per_class_recall"]) == {"0", "1"}
    one_shot = cross_validate_linear(features[[0, 3, 6]], labels[[0, 3, 6]], 3, seed=0)
    assert one_shot is None


def test_cv_never_tests_on_a_mirror_of_a_training_image():
    # Each image's "mirror" is the image itself, on random labels: if a test image's
    # mirror trained, the head would memorise it and score near 1.
    features, labels = _blobs(20, 2, separable=False, seed=4)
    estimate = cross_validate_linear(features, labels, 2, seed=0, mirrors=features.clone())
    assert estimate is not None and estimate["top1"] < 0.8  # noise: no memorised answers
