"""Verdicts read off the numbers: the issue's targets and the paper's two extra claims.

Pure functions of the per-seed scores (fractions), so a re-run cannot contradict its text:

- a **target** is met (PASS) when method A beats method B by at least TARGET_POINTS
  points of mean top-1 AND by more than twice the larger of their standard deviations
  over seeds; otherwise MISS.
- a **claim** comparison holds when A beats B by more than twice the larger standard
  deviation (the same bar, without a size); it is reversed when B beats A by as much, and
  not shown otherwise. A claim is SUPPORTED when every comparison holds, PARTLY SUPPORTED
  when some do, and NOT SHOWN when none does.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

TARGET_POINTS = 10.0  # the bar: a gap a reader would call "a wide margin"
SPREAD_FACTOR = 2.0  # a gap must exceed this many (larger) standard deviations over seeds
PRECISION = 6  # decimals of a point kept


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Gap:
    """Mean(A) - mean(B), in points, against the spread over seeds."""

    points: float
    bar: float  # SPREAD_FACTOR x the larger standard deviation, in points

    @property
    def target(self) -> str:
        """PASS or MISS, by the issue's target."""
        return "PASS" if self.points >= TARGET_POINTS and self.points > self.bar else "MISS"

    @property
    def claim(self) -> str:
        """'holds', 'reversed' or 'not shown', by the spread alone."""
        if self.points > self.bar:
            return "holds"
        return "reversed" if -self.points > self.bar else "not shown"


def gap(a: Sequence[float], b: Sequence[float]) -> Gap:
    """The gap between two methods' per-seed scores (fractions)."""
    (mean_a, sd_a), (mean_b, sd_b) = mean_std(a), mean_std(b)
    # Rounded far below the report's precision: 0.7 - 0.6 is 9.999... points in floats, and
    # "at least 10 points" must not turn on the last bit.
    return Gap(
        round((mean_a - mean_b) * 100, PRECISION),
        round(SPREAD_FACTOR * max(sd_a, sd_b) * 100, PRECISION),
    )


def claim_verdict(gaps: Sequence[Gap]) -> str:
    """SUPPORTED, PARTLY SUPPORTED or NOT SHOWN, from a claim's comparisons."""
    held = sum(g.claim == "holds" for g in gaps)
    if gaps and held == len(gaps):
        return "SUPPORTED"
    return "PARTLY SUPPORTED" if held else "NOT SHOWN"
