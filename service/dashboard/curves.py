"""Precision-recall curves and reliability diagrams as geometry for inline SVG.

Like the heat map, every colour and coordinate is an SVG attribute, so the dashboard's
Content-Security-Policy needs no 'unsafe-inline'. The page's script (static/model.js)
redraws the PR polyline for another class with the same mapping, read from the SVG's
data- attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    """A unit square (0..1 on both axes) drawn in a `width` x `height` SVG."""

    width: int = 380
    height: int = 300
    left: int = 48  # room for the y tick labels
    top: int = 12
    right: int = 14
    bottom: int = 42  # room for the x tick labels and the axis title

    @property
    def plot_w(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_h(self) -> int:
        return self.height - self.top - self.bottom

    def x(self, value: float) -> float:
        return round(self.left + min(1.0, max(0.0, value)) * self.plot_w, 1)

    def y(self, value: float) -> float:
        return round(self.top + (1 - min(1.0, max(0.0, value))) * self.plot_h, 1)

    def ticks(self) -> list[tuple[float, float, float, str]]:
        """(x, y, value, label) of the five ticks 0, 0.25, ..., 1 shared by both axes."""
        return [(self.x(v), self.y(v), v, f"{v:g}") for v in (0.0, 0.25, 0.5, 0.75, 1.0)]


PR_BOX = Box()
RELIABILITY_BOX = Box()


def pr_points(precision: Sequence[float], recall: Sequence[float], box: Box = PR_BOX) -> str:
    """A polyline's `points` for one class: recall on x, precision on y."""
    return " ".join(f"{box.x(r)},{box.y(p)}" for p, r in zip(precision, recall, strict=False))


def value_at(curve: dict[str, Sequence[float]], threshold: float) -> tuple[float | None, float]:
    """(precision, recall) at `threshold`, read off a stored PR curve.

    The value is that of the smallest stored threshold >= `threshold` (scores at or above
    a threshold are predicted positive, as in scikit-learn). Above every stored threshold
    nothing is predicted: recall 0 and precision undefined (None). static/model.js reads
    the curve the same way.
    """
    best: int | None = None
    thresholds = curve.get("thresholds") or []
    for i, t in enumerate(thresholds):
        if t >= threshold and (best is None or t < thresholds[best]):
            best = i
    if best is None:
        return None, 0.0
    return float(curve["precision"][best]), float(curve["recall"][best])


@dataclass(frozen=True)
class Bar:
    """One reliability bin: the accuracy bar over the bin, and its mean confidence."""

    x: float
    width: float
    y: float  # top of the accuracy bar
    height: float
    confidence_y: float
    count: int
    title: str


def reliability_bars(bins: Sequence[dict[str, float]], box: Box = RELIABILITY_BOX) -> list[Bar]:
    """Bars of accuracy per confidence bin; empty bins are left out (nothing to show)."""
    bars = []
    for b in bins:
        count = int(b.get("count") or 0)
        if count == 0:
            continue
        lower, upper = float(b["lower"]), float(b["upper"])
        accuracy, confidence = float(b["accuracy"]), float(b["confidence"])
        x0, x1 = box.x(lower), box.x(upper)
        top = box.y(accuracy)
        bars.append(
            Bar(
                x=x0 + 1,
                width=max(1.0, round(x1 - x0 - 2, 1)),
                y=top,
                height=round(box.y(0.0) - top, 1),
                confidence_y=box.y(confidence),
                count=count,
                title=f"confidence {lower:.2f}–{upper:.2f}: {count} images, "
                f"mean confidence {confidence:.0%}, accuracy {accuracy:.0%}",
            )
        )
    return bars
