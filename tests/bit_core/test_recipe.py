"""Base-model resolution and the end-to-end fine-tuning recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import bit_core
import bit_core.linear
import bit_core.train
from bit_core import weights
from bit_core.checkpoint import ModelInfo, load_model, read_model_info, save_model
from bit_core.data import LabeledImages
from bit_core.layers import batch_norm
from bit_core.recipe import (
    BaseModel,
    BaseModelNotInstalled,
    QualityOptions,
    build_model,
    resolve_base,
    run_finetune,
)
from bit_core.resnetv2 import ResNetV2
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


# --- quality: measured on images that never train -------------------------------------------


def _plan(train: LabeledImages, mode: str, steps: int = 6) -> bit_core.Plan:
    return bit_core.hyperrule(
        len(train),
        train.typical_hw(),
        mode=mode,
        batch_size=6,
        total_steps=steps,
        base_lr=0.01,
        precrop=40,
        crop=32,
    )


@pytest.fixture(scope="module")
def base_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bit_npz(tmp_path_factory.mktemp("base") / "base.npz", "R14x0.5", 10)


def _spy_training_inputs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every image that reaches a training step or a linear head's features."""
    seen: list[str] = []
    real_batches, real_features = bit_core.train.iterate_batches, bit_core.linear.extract_features

    def batches(images: LabeledImages, *args: Any, **kwargs: Any) -> Any:
        seen.extend(map(str, images.sources))
        return real_batches(images, *args, **kwargs)

    def features(model: Any, images: LabeledImages, *args: Any, **kwargs: Any) -> Any:
        seen.extend(map(str, images.sources))
        return real_features(model, images, *args, **kwargs)

    monkeypatch.setattr(bit_core.train, "iterate_batches", batches)
    monkeypatch.setattr(bit_core.linear, "extract_features", features)
    return seen


@pytest.mark.parametrize("mode", ["full", "linear"])
def test_with_val_quality_is_measured_on_held_out_images_that_never_train(
    tmp_path: Path,
    train_folder: Path,
    val_folder: Path,
    base_npz: Path,
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
):
    seen = _spy_training_inputs(monkeypatch)
    train = LabeledImages.from_folder(train_folder)
    val = LabeledImages.from_folder(val_folder, classes=train.classes)
    result, info = run_finetune(
        train,
        resolve_base(str(base_npz)),
        _plan(train, mode),
        tmp_path / "model",
        val=val,
        quality=QualityOptions(eval_every=2, calibrate=True),
    )
    assert info is not None
    assert seen and set(seen) <= set(map(str, train.sources))  # val never trained
    quality = info.metrics["quality"]
    assert quality["kind"] == "holdout" and quality["count"] == len(val)
    assert quality["report"]["count"] == len(val) and "held-out" in quality["label"]
    calibration = quality["calibration"]
    assert calibration["temperature"] == info.temperature > 0
    assert calibration["ece_after"] <= calibration["ece_before"] + 1e-9
    assert read_model_info(tmp_path / "model").temperature == info.temperature
    if mode == "full":  # the validation curve: every 2 steps and at the end
        assert [e["step"] for e in result.evaluations] == [2, 4, 6]
        assert info.metrics["validation"]["step"] == 6


@pytest.mark.parametrize("mode", [pytest.param("full", marks=pytest.mark.slow), "linear"])
def test_without_val_quality_is_a_cross_validated_estimate(
    tmp_path: Path, train_folder: Path, base_npz: Path, mode: str
):
    train = LabeledImages.from_folder(train_folder)  # 6 per class: 5-fold
    _, info = run_finetune(
        train, resolve_base(str(base_npz)), _plan(train, mode), tmp_path / "model"
    )
    assert info is not None and info.temperature is None
    quality = info.metrics["quality"]
    assert quality["kind"] == "cross_validated" and quality["method"] == "k-fold"
    assert quality["count"] == len(train) and quality["folds"] == 5
    assert set(quality["per_class_recall"]) == set(train.classes)
    assert "linear-probe" in quality["label"]
    assert ("base model" in quality["label"]) == (mode == "full")
    assert "validation" not in info.metrics  # nothing was held out: no validation figure


def test_too_few_images_or_cv_off_is_said_so(tmp_path: Path, train_folder: Path, base_npz: Path):
    every = LabeledImages.from_folder(train_folder)
    one_shot = every.subset([every.labels.index(c) for c in range(len(every.classes))])
    base = resolve_base(str(base_npz))
    _, info = run_finetune(one_shot, base, _plan(one_shot, "linear"), tmp_path / "a")
    assert info is not None and info.metrics["quality"] == {
        "kind": "none",
        "label": "no held-out images and too few to cross-validate",
    }
    _, info = run_finetune(
        every, base, _plan(every, "linear"), tmp_path / "b", quality=QualityOptions(cv=False)
    )
    assert info is not None and info.metrics["quality"]["kind"] == "none"


def test_old_model_json_without_temperature_loads(tmp_path: Path, train_folder: Path):
    train = LabeledImages.from_folder(train_folder)
    model = bit_core.create_model("R14x0.5", 3)
    save_model(tmp_path / "m", model, ModelInfo("R14x0.5", list(train.classes), crop=32))
    path = tmp_path / "m" / "model.json"
    data = json.loads(path.read_text())
    del data["temperature"]
    path.write_text(json.dumps(data))
    assert read_model_info(tmp_path / "m").temperature is None


# --- a base the .npz layout cannot hold ---------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "linear"])
def test_a_factory_base_fine_tunes_a_model_the_npz_layout_cannot_hold(
    tmp_path: Path, train_folder: Path, val_folder: Path, mode: str
):
    # A BatchNorm baseline: its running statistics must survive into the run.
    pretrained = bit_core.create_model(
        "R14x0.5", 7, conv_layer=torch.nn.Conv2d, norm_layer=batch_norm
    )
    stats = pretrained.root.conv.weight.detach().clone()  # any body weight will do

    def factory(num_classes: int) -> ResNetV2:
        model = bit_core.create_model(
            "R14x0.5", num_classes, conv_layer=torch.nn.Conv2d, norm_layer=batch_norm
        )
        body = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("head.")}
        model.load_state_dict(body, strict=False)
        return model

    base = BaseModel("bn-base", "R14x0.5", None, sha256="ab" * 32, factory=factory)
    train = LabeledImages.from_folder(train_folder)
    val = LabeledImages.from_folder(val_folder, classes=train.classes)
    built = build_model(base, len(train.classes))
    assert torch.equal(built.root.conv.weight, stats) and built.num_classes == 3
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in built.modules())
    result, info = run_finetune(train, base, _plan(train, mode), tmp_path / "model", val=val)
    assert info is not None and info.provenance["base_sha256"] == "ab" * 32
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in result.model.modules())
    frozen = torch.equal(result.model.root.conv.weight.cpu(), stats)
    assert frozen == (mode == "linear")  # linear mode trains the head only


def test_a_factory_base_needs_the_sha256_of_its_weights_and_no_npz(tmp_path: Path):
    def factory(num_classes: int) -> ResNetV2:
        return bit_core.create_model("R14x0.5", num_classes)

    with pytest.raises(ValueError, match="needs the sha256 of its weights"):
        BaseModel("x", "R14x0.5", None, factory=factory)
    with pytest.raises(ValueError, match="takes no npz_path"):
        BaseModel("x", "R14x0.5", tmp_path / "x.npz", sha256="ab" * 32, factory=factory)
    assert BaseModel("x", "R14x0.5", None, sha256="cd" * 32, factory=factory).weights_sha256() == (
        "cd" * 32
    )
