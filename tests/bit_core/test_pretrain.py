"""Upstream pre-training: the recipe table, and 2-process gloo runs under torchrun."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from bit_core.pretrain_run import write_spec
from bit_core.train import RunConfig
from bit_core.upstream import UpstreamPlan, upstream_plan
from bit_core.upstream_data import UpstreamImages, inception_crop
from tests.factories import make_multilabel_manifest
from tests.polling import wait_for
from tests.torchrun import records, torchrun


def test_bit_s_recipe_matches_the_paper():
    plan = upstream_plan(1_281_167, 1000, recipe="bit-s")
    assert plan.global_batch == 4096 and plan.base_lr == pytest.approx(0.03 * 4096 / 256)
    assert plan.momentum == 0.9 and plan.weight_decay == 1e-4 and plan.warmup_steps == 5000
    assert plan.steps_per_epoch == 313 and plan.total_steps == 90 * 313
    assert plan.decay_steps == (30 * 313, 60 * 313, 80 * 313) and plan.loss == "softmax"
    assert plan.lr_at(4999) == pytest.approx(plan.base_lr)
    assert plan.lr_at(30 * 313) == pytest.approx(plan.base_lr * 0.1)
    assert plan.lr_at(80 * 313) == pytest.approx(plan.base_lr * 0.001)
    assert plan.lr_at(plan.total_steps) is None


def test_bit_l_recipe_and_overrides():
    plan = upstream_plan(300_000_000, 18291, recipe="bit-l", multi_label=True)
    assert plan.loss == "sigmoid" and len(plan.decay_steps) == 4 and plan.epochs == 40
    short = upstream_plan(2000, 50, global_batch=64, total_steps=40)
    assert short.total_steps == 40 and short.decay_steps == (13, 27, 36)
    assert short.warmup_steps == 4 and short.base_lr == pytest.approx(0.03 * 64 / 256)
    assert short.overrides == {"global_batch": 64, "total_steps": 40}
    with pytest.raises(ValueError, match="unknown override"):
        upstream_plan(10, 2, momentum=0.5)


def test_the_inception_crop_floor_is_an_override_the_crop_obeys():
    plan = upstream_plan(2000, 50, global_batch=64, total_steps=40, crop_min_area=0.5)
    assert plan.crop_min_area == 0.5 and plan.overrides["crop_min_area"] == 0.5
    assert upstream_plan(2000, 50).crop_min_area == 0.05  # the recipe's
    assert UpstreamPlan.from_dict(plan.to_dict()) == plan
    for wrong in (0.0, 1.5):
        with pytest.raises(ValueError, match="crop_min_area must be in"):
            upstream_plan(2000, 50, crop_min_area=wrong)
    # Left half -1, right half +1: a box of at least 90% of the area always spans the
    # middle; boxes down to 5% often fall on one side only.
    images = torch.ones(256, 1, 32, 32)
    images[..., :16] = -1.0

    def one_sided(min_area: float) -> int:
        crops = inception_crop(images, 16, np.random.default_rng(0), min_area=min_area)
        return int(((crops.amax(dim=(1, 2, 3)) < 0) | (crops.amin(dim=(1, 2, 3)) > 0)).sum())

    assert one_sided(0.9) == 0 and one_sided(0.05) > 10


def test_manifest_reads_label_sets(tmp_path: Path):
    data = UpstreamImages.from_manifest(make_multilabel_manifest(tmp_path))
    assert data.multi_label and len(data.classes) == 8
    assert data.multi_hot().sum(1).max() == 2
    (tmp_path / "bad.jsonl").write_text('{"uri": "x.png"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        UpstreamImages.from_manifest(tmp_path / "bad.jsonl")


def spec(tmp_path: Path, steps: int, checkpoint_every: int = 4) -> Path:
    manifest = make_multilabel_manifest(tmp_path / "data")
    plan = upstream_plan(
        64, 8, multi_label=True, global_batch=16, total_steps=steps, resolution=32, base_lr=0.03
    )
    run_dir = tmp_path / "run"
    write_spec(
        run_dir,
        arch="R14x0.5",
        data=str(manifest),
        plan=plan,
        config=RunConfig(checkpoint_every=checkpoint_every, device="cpu"),
    )
    return run_dir


@pytest.mark.slow
def test_two_gloo_ranks_learn_and_stay_identical(tmp_path: Path):
    run_dir = spec(tmp_path, steps=40)
    process = torchrun(run_dir)
    assert process.wait(timeout=600) == 0, (run_dir / "torchrun.log").read_text()[-3000:]
    steps = [r for r in records(run_dir) if "loss" in r]
    assert [r["world"] for r in steps] == [2] * 40
    # The zero-initialised head starts at exactly 8 classes x ln 2 per image.
    assert steps[0]["loss"] == pytest.approx(8 * np.log(2), rel=1e-4)
    assert np.mean([r["loss"] for r in steps[-5:]]) < 0.8 * 8 * np.log(2)
    assert records(run_dir)[-1]["outcome"] == "finished"
    assert (run_dir / "rank0.sha256").read_text() == (run_dir / "rank1.sha256").read_text()
    assert (run_dir / "model.npz").exists()


@pytest.mark.slow
def test_a_killed_rank_restarts_from_the_checkpoint(tmp_path: Path):
    run_dir = spec(tmp_path, steps=60, checkpoint_every=5)
    process = torchrun(run_dir, max_restarts=1)
    try:
        wait_for(lambda: any(r.get("step", 0) >= 12 for r in records(run_dir)), 300, "step 12")
        first_pid = int((run_dir / "rank1.pid").read_text())
        os.kill(first_pid, signal.SIGKILL)  # one rank dies; torchrun restarts the group
        assert process.wait(timeout=600) == 0, (run_dir / "torchrun.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    logged = [r for r in records(run_dir) if "loss" in r]
    steps = [r["step"] for r in logged]
    # The restart is the longest pause between two logged steps (a new process group
    # starting). The group resumes from its last checkpoint, so its first step repeats
    # logged ones, follows a gap (the kill fell between saving a checkpoint and logging that
    # step) or, when the kill came right after a checkpoint step was logged, follows on.
    pauses = [logged[i]["time"] - logged[i - 1]["time"] for i in range(1, len(logged))]
    restart = 1 + pauses.index(max(pauses))
    assert steps[restart] - 1 in range(10, steps[restart - 1] + 2, 5)  # from a checkpoint
    assert steps[-1] == 60 and records(run_dir)[-1]["outcome"] == "finished"
    assert int((run_dir / "rank1.pid").read_text()) != first_pid
    assert (run_dir / "rank0.sha256").read_text() == (run_dir / "rank1.sha256").read_text()


@pytest.mark.slow
def test_cancel_file_stops_every_rank_together(tmp_path: Path):
    run_dir = spec(tmp_path, steps=400)
    process = torchrun(run_dir)
    try:
        wait_for(lambda: any(r.get("step", 0) >= 3 for r in records(run_dir)), 300, "step 3")
        (run_dir / "cancel").touch()
        assert process.wait(timeout=300) == 0, (run_dir / "torchrun.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    final = records(run_dir)[-1]
    assert final["outcome"] == "cancelled" and final["step"] < 400
    assert not (run_dir / "model.npz").exists()
