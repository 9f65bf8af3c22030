"""benchmarks/backend_speed.py and many_models.py, end to end in --quick mode on a tiny
architecture: each writes its section, naming every backend and every figure."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bit_core.backends import BACKENDS, onnxruntime_installed

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
# A tiny model and no waiting for a quiet machine: this checks the report, not the speed.
SMOKE = [
    "--quick",
    "--arch",
    "R14x0.5",
    "--crop",
    "32",
    "--max-load",
    "1000",
    "--load-retries",
    "0",
    "--block-waits",
    "0",
    "--max-redo",
    "0",
]
NUMBER = r"[0-9]+(?:\.[0-9]+)?"

pytestmark = pytest.mark.slow  # each script starts live API processes


def run_script(name: str, out: Path, *extra: str) -> str:
    """Run a benchmark script with --out `out`; the section it wrote."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *SMOKE, *extra, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out.read_text()


def rows(section: str) -> dict[str, list[str]]:
    """Table rows by their first cell."""
    found = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            found[cells[0]] = cells[1:]
    return found


def test_backend_speed_reports_every_backend_and_figure(tmp_path):
    section = run_script("backend_speed.py", tmp_path / "B.md")
    table = rows(section)
    header = table.pop("backend")
    for figure in (
        "model b1 p50 ms",
        "model b1 p99 ms",
        "model b8 images/s",
        "model b64 images/s",
        "service c=1 p50 ms",
        "service c=1 p99 ms",
        "c=1 overhead",
        "service c=8 images/s",
        "service c=64 images/s",
    ):
        assert figure in header
    installed = [b for b in BACKENDS if b != "onnxruntime" or onnxruntime_installed()]
    for backend in installed:
        cells = table[backend]
        assert all(re.fullmatch(NUMBER, cell) for cell in cells[:6] + cells[7:9]), cells
        assert re.fullmatch(r"[+-]" + NUMBER + "%", cells[6]), cells[6]
        assert cells[9] == "0"  # no failed requests
        assert f"c=1 service overhead, {backend}:" in section
    if "onnxruntime" in installed:
        ratio = table["**onnxruntime ÷ torch** (speed-up)"]
        assert re.fullmatch(r"\*\*" + NUMBER + r"×\*\*", ratio[0]), ratio
    assert "`BIT_INFERENCE_BACKEND=auto` resolves to" in section


def test_many_models_reports_every_variant_and_figure(tmp_path):
    section = run_script("many_models.py", tmp_path / "B.md", "--models", "4")
    table = rows(section)
    header = table.pop("API")
    for figure in ("images/s", "p50 ms", "p99 ms", "VmRSS after warm-up MB", "VmRSS at end MB"):
        assert figure in header
    for variant, models in (("single model", "1"), ("after:", "4"), ("before: whole models", "4")):
        (cells,) = [cells for name, cells in table.items() if name.startswith(variant)]
        assert cells[0] == models
        answered, sent = cells[2].split(" / ")
        assert answered == sent != "0"
        assert all(re.fullmatch(NUMBER, cell) for cell in cells[3:9]), cells
        if variant != "single model":  # seconds from registration to the first answer
            assert re.match(NUMBER + r" \(", cells[9]), cells[9]
    for line in (
        "- Throughput, after ÷ single model:",
        "- Resident memory at the end, after (4 models) ÷ one model:",
        "- Before (4 whole models) → after (4 models): images/s",
        "- Before, each whole model cached beyond the first held",
    ):
        assert line in section
