"""bit_core.evaluate.metrics_from_logits on hand-computed cases."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bit_core.evaluate import EvalReport, metrics_from_logits


def _logits_predicting(predicted: list[int], num_classes: int) -> torch.Tensor:
    """Logits whose argmax is `predicted`; the other classes get distinct lower scores."""
    logits = -torch.arange(num_classes, dtype=torch.float32).repeat(len(predicted), 1) / 10
    for row, cls in enumerate(predicted):
        logits[row, cls] = 5.0
    return logits


def test_three_class_report_matches_hand_computation() -> None:
    classes = ["cat", "dog", "fox"]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = [0, 1, 1, 1, 0, 2]
    logits = _logits_predicting(predicted, 3)

    report = metrics_from_logits(logits, labels, classes)

    assert isinstance(report, EvalReport)
    assert report.classes == classes
    assert report.count == 6
    # confusion[true][predicted]
    assert report.confusion == [
        [1, 1, 0],
        [0, 2, 0],
        [1, 0, 1],
    ]
    assert report.top1 == pytest.approx(4 / 6)
    assert report.top5 == 1.0  # only 3 classes: the true class is always in the top 5
    # precision = diag / column sums (2, 3, 1); recall = diag / row sums (2, 2, 2)
    assert report.precision == pytest.approx([1 / 2, 2 / 3, 1 / 1])
    assert report.recall == pytest.approx([1 / 2, 2 / 2, 1 / 2])
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert report.loss == pytest.approx(expected_loss)


def test_all_correct_and_all_wrong() -> None:
    labels = torch.tensor([0, 1, 2])
    perfect = metrics_from_logits(_logits_predicting([0, 1, 2], 3), labels, ["a", "b", "c"])
    assert perfect.top1 == 1.0
    assert perfect.precision == [1.0, 1.0, 1.0]
    assert perfect.recall == [1.0, 1.0, 1.0]
    assert perfect.confusion == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]

    wrong = metrics_from_logits(_logits_predicting([1, 2, 0], 3), labels, ["a", "b", "c"])
    assert wrong.top1 == 0.0
    assert wrong.top5 == 1.0
    assert wrong.precision == [0.0, 0.0, 0.0]
    assert wrong.recall == [0.0, 0.0, 0.0]
    assert wrong.confusion == [[0, 1, 0], [0, 0, 1], [1, 0, 0]]


def test_absent_class_gets_zero_precision_and_recall() -> None:
    # Class 2 is never the true label and never predicted.
    labels = torch.tensor([0, 1, 1])
    report = metrics_from_logits(_logits_predicting([0, 0, 1], 3), labels, ["a", "b", "c"])
    assert report.confusion == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert report.precision == pytest.approx([1 / 2, 1 / 1, 0.0])
    assert report.recall == pytest.approx([1 / 1, 1 / 2, 0.0])


def test_top5_with_more_than_five_classes() -> None:
    # 7 classes; scores descend with the class index, so the ranking is 0, 1, 2, ...
    logits = -torch.arange(7, dtype=torch.float32).repeat(3, 1)
    labels = torch.tensor([0, 4, 5])  # rank 1 (top-1), rank 5 (top-5), rank 6 (miss)
    report = metrics_from_logits(logits, labels, [f"c{i}" for i in range(7)])
    assert report.top1 == pytest.approx(1 / 3)
    assert report.top5 == pytest.approx(2 / 3)
    assert report.confusion[4][0] == 1 and report.confusion[5][0] == 1


def test_half_precision_logits_are_accepted() -> None:
    labels = torch.tensor([0, 1])
    report = metrics_from_logits(_logits_predicting([0, 1], 2).half(), labels, ["a", "b"])
    assert report.top1 == 1.0
    assert isinstance(report.loss, float)


def test_summary_is_json_serialisable() -> None:
    classes = ["cat", "dog", "fox"]
    report = metrics_from_logits(
        _logits_predicting([0, 1, 1, 1, 0, 2], 3), torch.tensor([0, 0, 1, 1, 2, 2]), classes
    )
    summary = report.summary()
    decoded = json.loads(json.dumps(summary, allow_nan=False))

    assert decoded["count"] == 6
    assert decoded["classes"] == classes
    assert decoded["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert decoded["top1"] == pytest.approx(4 / 6)
    assert decoded["top5"] == 1.0
    assert set(decoded["per_class"]) == set(classes)
    assert decoded["per_class"]["dog"]["precision"] == pytest.approx(2 / 3)
    assert decoded["per_class"]["fox"]["recall"] == pytest.approx(1 / 2)
    assert math.isfinite(decoded["loss"])


def test_empty_input_gives_zero_metrics() -> None:
    report = metrics_from_logits(
        torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), ["a", "b", "c"]
    )
    assert report.count == 0
    assert report.top1 == report.top5 == report.loss == 0.0
    assert report.confusion == [[0, 0, 0]] * 3
    json.dumps(report.summary(), allow_nan=False)
