"""Figures the reliability suite reports: each test adds counts, the session prints them."""

from __future__ import annotations

from collections import defaultdict

# figure name -> value, summed over the tests that add to it (e.g. "faults injected").
FIGURES: dict[str, float] = defaultdict(float)


def add(name: str, value: float = 1) -> None:
    """Add `value` to the figure `name`; counts accumulate across the whole session."""
    FIGURES[name] += value


def put(name: str, value: float) -> None:
    """Set a figure that is a measurement, not a count (e.g. "load p99 ms")."""
    FIGURES[name] = value
