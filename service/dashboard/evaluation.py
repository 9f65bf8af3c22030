"""What a model page shows about quality: measured on images that did not train, only.

A model's own measurement is `metrics["quality"]`: on held-out images, or a
cross-validated estimate on frozen features, or nothing (said plainly). Stored
evaluations (rows of `evaluations`, run as jobs) carry a full classification report: per
class precision, recall, F1, AP and PR curve, the confusion matrix and the calibration.
Numbers measured on a model's own training images are never shown as its quality.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.dashboard.curves import PR_BOX, pr_points, reliability_bars, value_at
from service.dashboard.heatmap import heatmap, top_confusions
from service.db.models import Model

NONE_LABEL = "no held-out images and too few to cross-validate"
# PR points embedded in one page, all classes together: a 1000-class model's curves are
# thinned so that the page stays small (each curve keeps at least MIN_CURVE_POINTS).
CURVE_BUDGET = 40_000
MIN_CURVE_POINTS = 20
DEFAULT_SLIDER = 0.5  # where the threshold slider starts when the model has no threshold
# The "Run evaluation" form's choices: (split value, label); "" is the whole dataset.
EVALUATION_SPLITS = (
    ("test", "test split"),
    ("val", "val split"),
    ("", "all its images"),
    ("train", "train split"),
)


def model_quality(model: Model) -> dict[str, Any]:
    """The model's quality as stored by its job: kind holdout, cross_validated or none.

    Models trained before `quality` existed carry `validation` when their dataset had a
    validation split (held-out images, so a fair measurement); anything else is "none".
    """
    metrics = model.metrics or {}
    quality = metrics.get("quality")
    if isinstance(quality, dict) and quality.get("kind") in ("holdout", "cross_validated"):
        return quality
    legacy = metrics.get("validation")
    if isinstance(legacy, dict) and legacy.get("top1") is not None:
        return {
            "kind": "holdout",
            "top1": legacy.get("top1"),
            "top5": legacy.get("top5"),
            "count": legacy.get("count"),
            "report": legacy,
        }
    label = quality.get("label") if isinstance(quality, dict) else None
    return {"kind": "none", "label": label or NONE_LABEL}


def training_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The training run's own numbers minus any accuracy: accuracy on the images a model
    trained on says nothing of its quality, so the dashboard never shows it."""
    return {
        name: value
        for name, value in metrics.items()
        if not (name.startswith("train") and any(w in name for w in ("top1", "top5", "acc")))
    }


def cv_recall_rows(quality: dict[str, Any], classes: Sequence[Any]) -> list[tuple[str, float]]:
    """Per-class recall of a cross-validated estimate, keyed by class name or index."""
    names = [str(c) for c in classes]
    rows = []
    for key, recall in (quality.get("per_class_recall") or {}).items():
        name = str(key)
        if name not in names and name.isdigit() and int(name) < len(names):
            name = names[int(name)]
        rows.append((name, float(recall)))
    order = {name: i for i, name in enumerate(names)}
    return sorted(rows, key=lambda row: order.get(row[0], len(order)))


def has_results(results: dict[str, Any] | None) -> bool:
    """Whether a report holds numbers (an evaluation's results stay {} until its job ends)."""
    return bool(results) and results.get("top1") is not None  # type: ignore[union-attr]


def _thin(curve: dict[str, list[float]], points: int) -> dict[str, list[float]]:
    """At most about `points` of a curve's points, evenly spaced, keeping its last point."""
    precision, recall = curve.get("precision") or [], curve.get("recall") or []
    thresholds = curve.get("thresholds") or []
    if len(precision) <= points:
        return {"precision": precision, "recall": recall, "thresholds": thresholds}
    step = -(-len(thresholds) // points)  # ceil
    keep = list(range(0, len(thresholds), step))
    # scikit-learn's curve ends with one point past the last threshold (precision 1, recall 0).
    tail = list(range(len(thresholds), len(precision)))
    return {
        "precision": [precision[i] for i in keep + tail],
        "recall": [recall[i] for i in keep + tail],
        "thresholds": [thresholds[i] for i in keep],
    }


def _curves(classes: list[str], per_class: dict[str, Any]) -> dict[str, Any]:
    """The PR curves the page's script reads: class order, one curve per class."""
    stored = [(per_class.get(name) or {}).get("pr_curve") or {} for name in classes]
    if not any(curve.get("thresholds") for curve in stored):
        return {}
    points = max(MIN_CURVE_POINTS, CURVE_BUDGET // max(1, len(classes)))
    return {"classes": classes, "curves": [_thin(curve, points) for curve in stored]}


def _rows(classes: list[str], report: dict[str, Any]) -> list[dict[str, Any]]:
    per_class = report.get("per_class") or {}
    confusion = report.get("confusion") or []
    rows = []
    for i, name in enumerate(classes):
        entry = per_class.get(name) or {}
        support = entry.get("support")
        if support is None and i < len(confusion):
            support = sum(confusion[i])  # older reports: the row of the confusion matrix
        suggested = entry.get("thresholds") or {}
        rows.append(
            {
                "name": name,
                "precision": entry.get("precision"),
                "recall": entry.get("recall"),
                "f1": entry.get("f1"),
                "support": support,
                "ap": entry.get("ap"),
                "best_f1": suggested.get("best_f1"),
                "target": suggested.get("target_precision"),
            }
        )
    return rows


def report_view(report: dict[str, Any], *, threshold: float | None) -> dict[str, Any]:
    """Everything _report.html draws for one classification report.

    `threshold` is the model's default (the slider starts there, DEFAULT_SLIDER if None).
    """
    classes = [str(c) for c in report.get("classes") or []]
    confusion = report.get("confusion") or []
    curves = _curves(classes, report.get("per_class") or {})
    slider = DEFAULT_SLIDER if threshold is None else threshold
    view: dict[str, Any] = {
        "report": report,
        "classes": classes,
        "rows": _rows(classes, report),
        "heatmap": heatmap(confusion, classes),
        "confusions": top_confusions(confusion, classes),
        "curves": curves,
        "slider": slider,
        "box": PR_BOX,
    }
    if curves:
        first = curves["curves"][0]
        precision, recall = value_at(first, slider)
        view.update(
            selected=classes[0],
            pr_points=pr_points(first["precision"], first["recall"]),
            at_threshold={"precision": precision, "recall": recall},
            # Nothing predicted above every stored threshold: no point on the curve.
            marker=None if precision is None else (PR_BOX.x(recall), PR_BOX.y(precision)),
        )
    calibration = report.get("calibration") or {}
    if calibration.get("bins"):
        view["calibration"] = {
            "ece": calibration.get("ece"),
            "bars": reliability_bars(calibration["bins"]),
        }
    return view
