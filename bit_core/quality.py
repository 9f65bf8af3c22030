"""Quality of a classifier on held-out images: PR curves, AP, calibration, thresholds.

NumPy and torch only. `precision_recall_curve` and `average_precision` compute exactly
what scikit-learn's functions of the same names compute (tests compare them, ties
included), so a figure here can be checked against the reference a reader knows.

Scores are per-class probabilities; a class is "predicted" at threshold t when its
score >= t (scikit-learn's convention, and predict's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

CALIBRATION_BINS = 15  # equal-width confidence bins, the usual choice for ECE
# Temperatures are searched within these bounds: below, a net is made arbitrarily sharp
# by a few separable held-out images; above, every answer becomes a coin toss.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
TEMPERATURE_ITERATIONS = 100


def _as_numpy(values: Any, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=dtype)


def _binary_counts(scores: Any, positives: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positives, true positives, thresholds) at each distinct score, highest first."""
    y_score = _as_numpy(scores).ravel()
    y_true = _as_numpy(positives, bool).ravel()
    if y_score.shape != y_true.shape:
        raise ValueError(f"{y_score.size} scores for {y_true.size} positives flags")
    if y_score.size == 0:
        raise ValueError("no scores given: a curve needs at least one image")
    order = np.argsort(-y_score, kind="stable")
    y_score, y_true = y_score[order], y_true[order]
    # The last index of each run of equal scores: tied images cross a threshold together.
    last_of_run = np.r_[np.nonzero(np.diff(y_score))[0], y_true.size - 1]
    true_positives = np.cumsum(y_true, dtype=np.float64)[last_of_run]
    false_positives = 1.0 + last_of_run - true_positives
    return false_positives, true_positives, y_score[last_of_run]


def precision_recall_curve(
    scores: Any, positives: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at every distinct score, as scikit-learn computes them.

    Args:
        scores: (N,) scores of one class (higher: more likely positive).
        positives: (N,) bools, True where the image belongs to the class.

    Returns:
        (precision, recall, thresholds): thresholds ascending; precision and recall have
        one more entry, the end point (precision 1, recall 0) with no threshold. With no
        positive image, recall is 1 everywhere (scikit-learn's choice, with its warning).
    """
    false_positives, true_positives, thresholds = _binary_counts(scores, positives)
    predicted = true_positives + false_positives
    precision = np.divide(
        true_positives, predicted, out=np.zeros_like(true_positives), where=predicted != 0
    )
    if true_positives[-1] == 0:
        recall = np.ones_like(true_positives)
    else:
        recall = true_positives / true_positives[-1]
    return (
        np.r_[precision[::-1], 1.0],
        np.r_[recall[::-1], 0.0],
        thresholds[::-1].copy(),
    )


def average_precision(scores: Any, positives: Any) -> float:
    """Step-wise area under the PR curve: sum of (R_n - R_{n-1}) P_n, as scikit-learn's
    `average_precision_score`; 0.0 when there is no positive image."""
    precision, recall, _ = precision_recall_curve(scores, positives)
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def calibration(probabilities: Any, labels: Any, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Expected calibration error of the top-1 confidence, and a reliability diagram.

    Bins are equal-width over the confidence (lower, upper]; the first also holds 0.
    ECE = sum over bins of (count / N) * |accuracy - confidence|.

    Returns:
        {"ece": float, "bins": [{"lower", "upper", "count", "confidence", "accuracy"}]};
        an empty bin has count 0 and confidence and accuracy None.
    """
    probs = _as_numpy(probabilities)
    targets = _as_numpy(labels, np.int64).ravel()
    count = targets.size
    confidence = probs.max(axis=1) if count else np.zeros(0)
    correct = (probs.argmax(axis=1) == targets) if count else np.zeros(0, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # np.digitize with right=True puts c in (edges[i-1], edges[i]]; clip folds 0 into bin 1.
    index = np.clip(np.digitize(confidence, edges, right=True), 1, bins) - 1
    ece, rows = 0.0, []
    for b in range(bins):
        members = index == b
        n = int(members.sum())
        row: dict[str, Any] = {
            "lower": float(edges[b]),
            "upper": float(edges[b + 1]),
            "count": n,
            "confidence": None,
            "accuracy": None,
        }
        if n:
            row["confidence"] = float(confidence[members].mean())
            row["accuracy"] = float(correct[members].mean())
            ece += n / count * abs(row["accuracy"] - row["confidence"])
        rows.append(row)
    return {"ece": float(ece), "bins": rows}


def fit_temperature(logits: Any, labels: Any) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on held-out images.

    L-BFGS over log T (positive by construction), then clipped to
    [MIN_TEMPERATURE, MAX_TEMPERATURE]. The NLL is convex in 1/T, so it has one minimum
    along log T and clipping the unconstrained optimum gives the bounded one.

    Args:
        logits: (N, C) logits of held-out images (not probabilities).
        labels: (N,) their true classes.
    """
    z = torch.as_tensor(_as_numpy(logits))
    y = torch.as_tensor(_as_numpy(labels, np.int64))
    if z.shape[0] == 0:
        raise ValueError("no images given: fitting a temperature needs held-out images")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], max_iter=TEMPERATURE_ITERATIONS, line_search_fn="strong_wolfe"
    )
    low, high = float(np.log(MIN_TEMPERATURE)), float(np.log(MAX_TEMPERATURE))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        # Clamped inside too: on separable data the optimum runs off to T -> 0.
        scaled = z / log_t.clamp(low - 1.0, high + 1.0).exp()
        loss = torch.nn.functional.cross_entropy(scaled, y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(np.exp(np.clip(float(log_t.detach()), low, high)))


def scaled_probabilities(logits: torch.Tensor, temperature: float | None) -> torch.Tensor:
    """softmax(logits / T): the probabilities predict serves for a model.

    Args:
        logits: (N, C) logits.
        temperature: the model's fitted T; None (not calibrated) means 1.
    """
    return torch.softmax(logits.float() / (temperature or 1.0), dim=-1)


def _operating_point(
    precision: float, recall: float, threshold: float | None
) -> dict[str, float | None]:
    total = precision + recall
    f1 = 2 * precision * recall / total if total > 0 else 0.0
    return {"threshold": threshold, "precision": precision, "recall": recall, "f1": f1}


def suggest_thresholds(
    scores: Any, positives: Any, target_precision: float = 0.9
) -> dict[str, Any]:
    """Two suggested thresholds for one class.

    Returns:
        {"best_f1": {"threshold", "precision", "recall", "f1"}: the threshold of highest
        F1 (the highest such threshold on ties), "target_precision": the same keys plus
        "target" for the lowest threshold whose precision reaches `target_precision` (the
        most recall at that precision), or None when no threshold reaches it}. Without a
        positive image nothing can be suggested: best_f1's threshold is None (all zeros).
    """
    positive = _as_numpy(positives, bool).ravel()
    if not positive.any():
        return {"best_f1": _operating_point(0.0, 0.0, None), "target_precision": None}
    precision, recall, thresholds = precision_recall_curve(scores, positive)
    precision, recall = precision[:-1], recall[:-1]  # drop the end point: it has no threshold
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    best = int(np.flatnonzero(f1 == f1.max())[-1])  # thresholds ascend: last = highest
    reached = np.flatnonzero(precision >= target_precision)
    target = None
    if reached.size:
        at = int(reached[0])
        point = _operating_point(float(precision[at]), float(recall[at]), float(thresholds[at]))
        target = {**point, "target": target_precision}
    return {
        "best_f1": _operating_point(
            float(precision[best]), float(recall[best]), float(thresholds[best])
        ),
        "target_precision": target,
    }


def _decimate(length: int, max_points: int) -> np.ndarray:
    """Evenly spaced indices into a curve of `length` points, its two ends always kept."""
    if length <= max_points:
        return np.arange(length)
    return np.unique(np.round(np.linspace(0, length - 1, max(2, max_points))).astype(np.int64))


def classification_report(
    probabilities: Any,
    labels: Any,
    classes: Sequence[str],
    *,
    target_precision: float = 0.9,
    max_curve_points: int = 200,
) -> dict[str, Any]:
    """Everything the product reports about a classifier on labelled images.

    Args:
        probabilities: (N, C) class probabilities, columns in `classes` order.
        labels: (N,) true class indices.
        classes: the class names.
        target_precision: for each class's suggested "target precision" threshold.
        max_curve_points: PR curves are thinned to at most this many points (ends kept).

    Returns:
        {"count", "classes", "top1", "top5" (top-min(5, C)), "per_class": {name:
        {"precision", "recall", "f1", "support", "ap", "pr_curve": {"precision", "recall",
        "thresholds"}, "thresholds": suggest_thresholds(...)}}, "map", "macro_f1",
        "confusion" (confusion[true][predicted], predictions by argmax), "calibration"}.
        Precision, recall and F1 follow scikit-learn's `precision_recall_fscore_support`
        with zero_division=0. A class without a positive image has AP 0.0 (as scikit-learn
        returns) and an empty curve, and is left out of the mAP (which scikit-learn's macro
        average would count as 0); macro F1 averages the classes that are either present or
        predicted, as scikit-learn's macro average does.
    """
    probs = _as_numpy(probabilities)
    targets = _as_numpy(labels, np.int64).ravel()
    num_classes, count = len(classes), int(targets.size)
    if probs.shape != (count, num_classes):
        raise ValueError(
            f"probabilities of shape {probs.shape} for {count} labels and {num_classes} classes"
        )
    predicted = probs.argmax(axis=1) if count else np.zeros(0, np.int64)
    confusion = np.bincount(
        targets * num_classes + predicted, minlength=num_classes * num_classes
    ).reshape(num_classes, num_classes)
    k = min(5, num_classes)
    top_k = np.argsort(-probs, axis=1, kind="stable")[:, :k] if count else np.zeros((0, k))
    top5 = float((top_k == targets[:, None]).any(axis=1).mean()) if count else 0.0

    true_positive = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted_count = confusion.sum(axis=0)
    per_class: dict[str, Any] = {}
    aps, f1s = [], []
    for c, name in enumerate(classes):
        tp, n_pred, n_true = true_positive[c], predicted_count[c], support[c]
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        denominator = n_pred + n_true  # 2TP + FP + FN
        f1 = 2 * tp / denominator if denominator else 0.0
        if n_true or n_pred:
            f1s.append(f1)
        curve: dict[str, list[float]] = {"precision": [], "recall": [], "thresholds": []}
        ap = 0.0
        if n_true:
            positives = targets == c
            ap = average_precision(probs[:, c], positives)
            aps.append(ap)
            p, r, t = precision_recall_curve(probs[:, c], positives)
            keep = _decimate(len(t), max_curve_points - 1)
            curve = {
                "precision": [*p[keep].tolist(), 1.0],
                "recall": [*r[keep].tolist(), 0.0],
                "thresholds": t[keep].tolist(),
            }
        per_class[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(n_true),
            "ap": ap,
            "pr_curve": curve,
            "thresholds": suggest_thresholds(
                probs[:, c] if count else np.zeros(0), targets == c, target_precision
            ),
        }
    return {
        "count": count,
        "classes": list(classes),
        "top1": float((predicted == targets).mean()) if count else 0.0,
        "top5": top5,
        "per_class": per_class,
        "map": float(np.mean(aps)) if aps else 0.0,
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "confusion": confusion.tolist(),
        "calibration": calibration(probs, targets),
    }
