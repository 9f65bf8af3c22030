"""The transfer demonstration: its upstream generator, and a smoke run that writes a report."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demos.transfer import transfer
from demos.transfer.make_upstream import class_names, generate

pytest.importorskip("sklearn")  # the `demo` extra ships the downstream digits


def test_upstream_classes_are_distinct_and_images_reproducible(tmp_path: Path):
    names = class_names(100)
    assert len(set(names)) == 100
    first = generate(tmp_path / "a", classes=12, per_class=2, size=16)
    again = generate(tmp_path / "b", classes=12, per_class=2, size=16)
    files = sorted(first.rglob("*.png"))
    assert len(files) == 24
    for path in files:
        same = again / path.relative_to(first)
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(same)))
    # Different classes draw different pictures (not one image under many names).
    pictures = {np.asarray(Image.open(path)).tobytes() for path in files}
    assert len(pictures) == 24


def test_class_count_outside_the_combinations_is_refused():
    with pytest.raises(ValueError, match="classes must be between 1 and"):
        class_names(0)


@pytest.mark.slow
def test_quick_run_reports_every_method_and_shot(tmp_path: Path):
    out = tmp_path / "report.md"
    assert transfer.main(["--quick", "--out", str(out), "--shots", "1", "3"]) == 0
    text = out.read_text()
    assert "python -m demos.transfer.transfer --quick" in text
    for method in transfer.METHODS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {method} |"))
        cells = re.findall(r"(\d+\.\d) ± (\d+\.\d)", row)
        assert len(cells) == 2  # one mean ± std per shot count
        assert all(0.0 <= float(mean) <= 100.0 for mean, _ in cells)
    # The verdict is read off the numbers, whichever way they fall.
    assert "**Pre-training on" in text or "**The benefit of pre-training" in text
