"""The transfer demonstration: verdicts computed from the numbers, cached bases, a quick run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bit_core.recipe import build_model
from demos.transfer import bases, transfer
from demos.transfer.bases import BaseSpec, Pretrained
from demos.transfer.downstream import FULL, LINEAR, METHODS, PRETRAINED_METHODS
from demos.transfer.glyphs import build_class_set, generate
from demos.transfer.glyphs.fonts import INSTALL_HINT, missing_packages
from demos.transfer.report import TARGETS, Scores, target_gaps, write_report
from demos.transfer.verdicts import claim_verdict, gap

pytest.importorskip("sklearn")  # the `demo` extra ships the downstream digits
needs_fonts = pytest.mark.skipif(
    bool(missing_packages()), reason=f"the glyph upstream needs Debian's fonts: `{INSTALL_HINT}`"
)


# --- verdicts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("better", "baseline", "target", "claim"),
    [
        ([0.80, 0.82, 0.78], [0.60, 0.61, 0.59], "PASS", "holds"),  # wide and steady
        ([0.95, 0.60, 0.80], [0.60, 0.61, 0.59], "MISS", "not shown"),  # wide, too spread
        ([0.66, 0.66, 0.66], [0.60, 0.60, 0.60], "MISS", "holds"),  # steady, too narrow
        ([0.50, 0.51, 0.49], [0.80, 0.81, 0.79], "MISS", "reversed"),
    ],
)
def test_a_gap_passes_only_when_wide_and_beyond_twice_the_larger_spread(
    better: list[float], baseline: list[float], target: str, claim: str
):
    measured = gap(better, baseline)
    assert measured.target == target and measured.claim == claim


def test_exactly_ten_points_pass_and_a_claim_needs_every_comparison():
    assert gap([0.7, 0.7], [0.6, 0.6]).target == "PASS"  # "at least 10 points"
    holds, no = gap([0.8, 0.8], [0.6, 0.6]), gap([0.6, 0.7], [0.6, 0.7])
    assert claim_verdict([holds, holds]) == "SUPPORTED"
    assert claim_verdict([holds, no]) == "PARTLY SUPPORTED"
    assert claim_verdict([no, no]) == claim_verdict([]) == "NOT SHOWN"


def fake_bases(setup: transfer.Setup) -> list[Pretrained]:
    plan = bases.plan_for(setup.upstream(setup.upstream_per_class), 1000, 10)
    summary = {
        "images": 1000,
        "classes": 10,
        "content_sha256": "0" * 64,
        "plan": plan.to_dict(),
        "loss_first": 2.3,
        "loss_last": 1.0,
        "loss_window": 5,
        "held_out_top1": 0.5,
        "held_out_images": 100,
        "seconds": 60.0,
        "made": "2026-01-01 00:00 UTC",
    }
    return [
        Pretrained(spec, Path("base"), "0" * 64, summary, cached=False) for spec in setup.specs()
    ]


def test_the_report_reads_its_verdicts_off_the_scores_either_way(tmp_path: Path):
    setup = transfer.Setup(shots=(1, 5), seeds=3)
    made = fake_bases(setup)
    main, small, bn = (base.spec.name for base in made)
    scores: Scores = {}
    for shots in setup.shots:
        for method in METHODS:
            # Pre-training wins widely at 5 shots, not at all at 1.
            lift = 0.2 if method in PRETRAINED_METHODS and shots == 5 else 0.01
            scores[main, method, shots] = [0.5 + lift, 0.51 + lift, 0.49 + lift]
        for method in PRETRAINED_METHODS:
            scores[small, method, shots] = [0.3, 0.31, 0.29]  # less data: worse everywhere
            scores[bn, method, shots] = [0.9, 0.1, 0.5]  # BatchNorm: all over the place
    verdicts = {(k, m): g.target for k, m, _, g in target_gaps(scores, main, setup.shots)}
    assert verdicts == {(1, FULL): "MISS", (1, LINEAR): "MISS", (5, FULL): "PASS"} | {
        (5, LINEAR): "PASS"
    }
    seconds = {"glyph data": 1.0, "pre-training": 2.0, "downstream": 6.0, "total": 9.0}
    seconds["glyph data, generating"] = 60.0
    text = write_report(
        tmp_path / "report.md",
        setup=setup,
        made=made,
        scores=scores,
        seconds=seconds,
        argv=[],
        test_size=500,
        pool_size=1297,
        jobs=1,
    )
    assert text == (tmp_path / "report.md").read_text()
    assert "**2 of 4 targets missed**" in text
    assert "| 5 | pretrained + full fine-tune vs from scratch | +19.00 |" in text
    # A run from an empty cache: data, then the BatchNorm base beside the other two.
    assert "from an empty cache: 4.1 min" in text
    assert "More upstream data transfers better: **SUPPORTED**" in text
    assert "GN+WS beats BatchNorm at a small per-device batch: **NOT SHOWN**" in text
    assert "by +0.0/+19.0 points of top-1" in text  # the headline quotes the gaps


# --- the upstream half -------------------------------------------------------------------------


@needs_fonts
@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_a_base_is_pre_trained_once_then_taken_from_the_cache(tmp_path: Path, norm: str):
    classes = build_class_set(6)
    generate(tmp_path / "data", classes=classes, per_class=4, size=16, workers=1)
    generate(tmp_path / "held", classes=classes, per_class=1, size=16, workers=1, seed=1)
    upstream = bases.Upstream(
        "R14x0.5", 6, 4, 16, steps=3, batch=8, lr=0.01, decays=(0.5,), crop_min_area=1.0
    )
    spec = BaseSpec(f"tiny {norm}", upstream, norm, micro_batch=4 if norm == "bn" else None)
    made = bases.pretrain_base(spec, tmp_path / "data", tmp_path / "held", tmp_path / "cache")
    again = bases.pretrain_base(spec, tmp_path / "data", tmp_path / "held", tmp_path / "cache")
    assert not made.cached and again.cached and again.sha256 == made.sha256
    assert again.summary == made.summary and made.summary["plan"]["total_steps"] == 3
    assert made.summary["held_out_images"] == 6
    assert not (made.path.parent / "state.safetensors").exists()  # dropped once saved
    # Fine-tuning starts from the base's weights (BatchNorm's running statistics too).
    base = made.base_model()
    model = build_model(base, 10)
    assert model.num_classes == 10 and not model.head.conv.weight.any()
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert has_bn == (norm == "bn") and base.weights_sha256() == made.sha256
    if norm == "bn":
        saved = load_file(str(made.path))
        key = next(k for k in saved if k.endswith("running_var"))
        assert saved[key].ne(1.0).any()  # statistics were gathered
        assert torch.equal(model.state_dict()[key], saved[key])


# --- the quick run ---------------------------------------------------------------------------


@needs_fonts
@pytest.mark.slow
def test_quick_run_reports_every_method_shot_target_and_claim(tmp_path: Path):
    out = tmp_path / "report.md"
    argv = ["--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert transfer.main(argv) == 0
    text = out.read_text()
    assert "python -m demos.transfer.transfer --quick" in text
    shots = transfer.QUICK.shots
    table = text.split("## Accuracy\n", 1)[1]
    for method in METHODS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        cells = re.findall(r"(\d+\.\d) ± (\d+\.\d)", row)
        assert len(cells) == len(shots)  # one mean ± std per shot count
        assert all(0.0 <= float(mean) <= 100.0 for mean, _ in cells)
    for k in shots:
        for better, baseline in TARGETS:
            row = re.escape(f"| {k} | {better} vs {baseline} | ")
            assert re.search(rf"{row}[-+]\d+\.\d\d \| \d+\.\d\d \| \*\*(PASS|MISS)\*\*", text)
    assert len(re.findall(r"\*\*(PASS|MISS)\*\*", text)) == 2 * len(shots)
    for claim in ("More upstream data transfers better", "GN+WS beats BatchNorm"):
        verdict = r"\*\*(SUPPORTED|PARTLY SUPPORTED|NOT SHOWN)\*\*"
        assert re.search(rf"{re.escape(claim)}.*: {verdict}", text)
    assert "targets met" in text or "targets missed" in text
