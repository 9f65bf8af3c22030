"""The digits estimate demonstration: a smoke run that writes its table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("sklearn")  # the `demo` extra ships the digits

from demos.quality import digits_estimate


@pytest.mark.slow
def test_quick_run_reports_an_estimate_beside_the_test_accuracy(tmp_path: Path):
    out = tmp_path / "report.md"
    argv = ["--quick", "--out", str(out), "--shots", "1", "5", "--test-size", "60"]
    assert digits_estimate.main(argv) == 0
    lines = out.read_text().splitlines()
    one = next(line for line in lines if line.startswith("| 1 |"))
    assert "none" in one  # 1 image per class: no honest estimate, and it says so
    five = next(line for line in lines if line.startswith("| 5 |"))
    estimate, test = (float(m) for m in re.findall(r"(\d+\.\d) ± \d+\.\d", five))
    assert 10.0 < estimate <= 100.0 and 10.0 < test <= 100.0
    assert "k-fold, 5 folds" in five
