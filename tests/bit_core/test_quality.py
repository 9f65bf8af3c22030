"""bit_core.quality against scikit-learn on the same predictions, and hand-checked cases."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from bit_core import quality

metrics = pytest.importorskip("sklearn.metrics")


def _random_case(rng: np.random.Generator, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(1, 60))
    scores = rng.integers(0, 6, n) / 5.0 if ties else rng.random(n)
    return scores, rng.random(n) < rng.random()


@pytest.mark.parametrize("ties", [False, True])
def test_pr_curve_and_ap_equal_sklearn(ties: bool):
    rng = np.random.default_rng(7)
    for _ in range(200):
        scores, positives = _random_case(rng, ties)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns when there is no positive
            expected = metrics.precision_recall_curve(positives, scores)
            expected_ap = metrics.average_precision_score(positives, scores)
        ours_curve = quality.precision_recall_curve(scores, positives)
        for ours, theirs in zip(ours_curve, expected, strict=True):
            np.testing.assert_array_equal(ours, theirs)
        assert quality.average_precision(scores, positives) == pytest.approx(expected_ap, abs=1e-12)


def _digits_probabilities() -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of a deliberately weak classifier on digits: errors and near-ties."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    rng = np.random.default_rng(0)
    train = rng.permutation(len(y))[:60]  # 6-ish per class: a few-shot linear model
    x_t = torch.tensor(x[train], dtype=torch.float32)
    from bit_core.linear import fit_head

    weight, bias, _ = fit_head(x_t, torch.tensor(y[train]), 10, l2=1.0)
    logits = torch.tensor(x, dtype=torch.float32) @ weight.T + bias
    # Rounded to 2 decimals: many tied scores, as a real report meets them.
    return np.round(torch.softmax(logits, 1).numpy().astype(np.float64), 2), y


def test_report_equals_sklearn_on_digits():
    probabilities, labels = _digits_probabilities()
    classes = [str(c) for c in range(10)]
    report = quality.classification_report(probabilities, labels, classes, max_curve_points=10**6)
    predicted = probabilities.argmax(1)
    assert 0.3 < report["top1"] < 0.99  # a weak model: the comparison meets real errors
    assert report["confusion"] == metrics.confusion_matrix(labels, predicted).tolist()
    assert report["top1"] == pytest.approx(metrics.accuracy_score(labels, predicted))
    # Top-5 among tied scores is a tie-break convention (ours matches argmax: lowest
    # index first; sklearn's differs), so it is compared on scores without ties.
    untied = probabilities + np.arange(10) * 1e-9
    assert quality.classification_report(untied, labels, classes)["top5"] == pytest.approx(
        metrics.top_k_accuracy_score(labels, untied, k=5)
    )
    p, r, f, s = metrics.precision_recall_fscore_support(labels, predicted, zero_division=0)
    for c, name in enumerate(classes):
        row = report["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p[c], r[c], f[c]))
        assert row["support"] == s[c]
        positives = labels == c
        assert row["ap"] == pytest.approx(
            metrics.average_precision_score(positives, probabilities[:, c])
        )
        curve = metrics.precision_recall_curve(positives, probabilities[:, c])
        for key, expected in zip(("precision", "recall", "thresholds"), curve, strict=True):
            np.testing.assert_allclose(row["pr_curve"][key], expected)
    assert report["map"] == pytest.approx(
        metrics.average_precision_score(np.eye(10)[labels], probabilities, average="macro")
    )
    assert report["macro_f1"] == pytest.approx(metrics.f1_score(labels, predicted, average="macro"))
    json.dumps(report, allow_nan=False)


def test_report_shape_decimation_and_an_absent_class():
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(3), size=500)
    labels = rng.integers(0, 2, 500)  # class "c" never occurs
    report = quality.classification_report(
        probabilities, labels, ["a", "b", "c"], max_curve_points=20
    )
    assert set(report) == {
        "count", "classes", "top1", "top5", "per_class", "map", "macro_f1", "confusion",
        "calibration",
    }  # fmt: skip
    a = report["per_class"]["a"]
    assert set(a) == {"precision", "recall", "f1", "support", "ap", "pr_curve", "thresholds"}
    curve = a["pr_curve"]
    assert len(curve["precision"]) == len(curve["recall"]) <= 20
    assert len(curve["thresholds"]) == len(curve["precision"]) - 1
    assert curve["precision"][-1] == 1.0 and curve["recall"][-1] == 0.0
    assert curve["recall"][0] == 1.0  # the lowest threshold is kept: full recall
    absent = report["per_class"]["c"]
    assert absent["support"] == 0 and absent["ap"] == 0.0 and absent["pr_curve"]["thresholds"] == []
    assert report["map"] == pytest.approx((a["ap"] + report["per_class"]["b"]["ap"]) / 2)
    assert report["top5"] == 1.0  # capped at 3 classes


def test_calibration_by_hand():
    # Confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.3 on a 4-class row (wrong).
    probabilities = np.array(
        [[0.9, 0.1, 0, 0], [0.9, 0.1, 0, 0], [0.4, 0.6, 0, 0], [0.3, 0.25, 0.25, 0.2]]
    )
    labels = np.array([0, 1, 1, 3])
    result = quality.calibration(probabilities, labels, bins=10)
    # Bin (0.8, 0.9]: conf 0.9, acc 0.5; (0.5, 0.6]: conf 0.6, acc 1; (0.2, 0.3]: 0.3, 0.
    expected = 2 / 4 * 0.4 + 1 / 4 * 0.4 + 1 / 4 * 0.3
    assert result["ece"] == pytest.approx(expected)
    counts = [b["count"] for b in result["bins"]]
    assert counts == [0, 0, 1, 0, 0, 1, 0, 0, 2, 0]
    assert result["bins"][8] == {
        "lower": pytest.approx(0.8), "upper": pytest.approx(0.9), "count": 2,
        "confidence": pytest.approx(0.9), "accuracy": 0.5,
    }  # fmt: skip
    assert result["bins"][0]["confidence"] is None
    perfect = quality.calibration(np.eye(3), np.arange(3))
    assert perfect["ece"] == 0.0 and perfect["bins"][-1]["count"] == 3


def test_fit_temperature_recovers_a_known_temperature():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=generator) * 2.0
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator).squeeze(1)
    # A model whose logits are 3x too sharp: the fitted temperature should undo it.
    fitted = quality.fit_temperature(true_logits * 3.0, labels)
    assert fitted == pytest.approx(3.0, rel=0.08)
    before = quality.calibration(torch.softmax(true_logits * 3.0, 1), labels)["ece"]
    after = quality.calibration(torch.softmax(true_logits * 3.0 / fitted, 1), labels)["ece"]
    assert after < before / 2
    # Separable held-out images push T towards 0 (sharper): it stays within the bounds.
    separable = quality.fit_temperature(torch.eye(3) * 10, torch.arange(3))
    assert quality.MIN_TEMPERATURE <= separable < 1.0
    # Labels opposite to the logits push T up: capped.
    opposed = quality.fit_temperature(torch.eye(3) * 50, torch.tensor([1, 2, 0]))
    assert quality.MAX_TEMPERATURE / 2 < opposed <= quality.MAX_TEMPERATURE


def test_suggested_thresholds():
    scores = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2])
    positives = np.array([1, 1, 0, 1, 1, 0, 0, 0], bool)
    result = quality.suggest_thresholds(scores, positives, target_precision=0.9)
    # At >= 0.6: 4 TP, 1 FP -> P 0.8, R 1, F1 8/9; the best F1 of all.
    assert result["best_f1"] == {
        "threshold": 0.6, "precision": 0.8, "recall": 1.0, "f1": pytest.approx(8 / 9)
    }  # fmt: skip
    # Precision >= 0.9 first holds at 0.9 (2 TP, 0 FP), the lowest such threshold.
    assert result["target_precision"] == {
        "threshold": 0.9, "precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3),
        "target": 0.9,
    }  # fmt: skip
    assert quality.suggest_thresholds(scores, ~positives & False, 0.9)["target_precision"] is None
    # The top score is a negative: precision is 0 then 0.5, never 0.99.
    unreachable = quality.suggest_thresholds([0.9, 0.8], [False, True], target_precision=0.99)
    assert unreachable["target_precision"] is None
    assert unreachable["best_f1"]["threshold"] == 0.8
