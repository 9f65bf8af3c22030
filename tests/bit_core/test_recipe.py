"""Base-model resolution and the end-to-end fine-tuning recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

import bit_core
from bit_core import weights
from bit_core.checkpoint import load_model
from bit_core.data import LabeledImages
from bit_core.recipe import BaseModelNotInstalled, resolve_base, run_finetune
from bit_core.train import RunConfig
from tests.factories import make_bit_npz


def test_resolve_base_kinds(tmp_path: Path):
    npz = make_bit_npz(tmp_path / "mine.npz", "R14x0.5", 5)
    assert resolve_base(str(npz), tmp_path / "w").arch == "R14x0.5"
    weights.import_file(npz, tmp_path / "w", name="house-base")
    installed = resolve_base("house-base", tmp_path / "w")
    assert installed.arch == "R14x0.5" and installed.npz_path is not None
    assert resolve_base("R26x1", tmp_path / "w").npz_path is None  # from scratch
    with pytest.raises(BaseModelNotInstalled, match="bit weights pull BiT-M-R50x1"):
        resolve_base("BiT-M-R50x1", tmp_path / "w")
    with pytest.raises(ValueError, match="unknown base model"):
        resolve_base("ResNet-9000", tmp_path / "w")


@pytest.mark.parametrize("mode", ["full", "linear"])
def test_run_finetune_saves_a_usable_model(
    tmp_path: Path, train_folder: Path, val_folder: Path, mode: str
):
    npz = make_bit_npz(tmp_path / "base.npz", "R14x0.5", 10)
    train = LabeledImages.from_folder(train_folder)
    val = LabeledImages.from_folder(val_folder, classes=train.classes)
    plan = bit_core.hyperrule(
        len(train),
        train.typical_hw(),
        mode=mode,
        batch_size=12,
        total_steps=6,
        base_lr=0.01,
        precrop=40,
        crop=32,
    )
    _, info = run_finetune(
        train,
        resolve_base(str(npz)),
        plan,
        tmp_path / "model",
        val=val,
        checkpoint_path=tmp_path / "state",
    )
    assert info is not None and info.plan["mode"] == mode and info.base_model == "base"
    assert 0.0 <= info.metrics["validation"]["top1"] <= 1.0
    model, loaded = load_model(tmp_path / "model")
    assert loaded.classes == list(train.classes) and model.num_classes == 3


def test_a_stopped_run_saves_no_model(tmp_path: Path, train_folder: Path):
    train = LabeledImages.from_folder(train_folder)
    plan = bit_core.hyperrule(
        len(train), (48, 64), batch_size=6, total_steps=6, precrop=40, crop=32
    )
    result, info = run_finetune(
        train,
        resolve_base("R14x0.5"),
        plan,
        tmp_path / "model",
        config=RunConfig(stop_after=2),
        checkpoint_path=tmp_path / "state",
    )
    assert info is None and result.steps_done == 2 and not (tmp_path / "model").exists()
