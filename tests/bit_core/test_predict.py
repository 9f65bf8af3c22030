"""Predictor and linear mode: evaluation preprocessing, top-k, a model ready in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bit_core
from bit_core.checkpoint import ModelInfo, save_model
from bit_core.data import LabeledImages
from bit_core.evaluate import evaluate
from bit_core.layers import StdConv2d
from bit_core.linear import extract_features, fit_head, fit_linear
from bit_core.predict import Predictor
from tests.factories import make_bit_npz


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bit_npz(tmp_path_factory.mktemp("w") / "base.npz", "R14x0.5", num_classes=10)


def test_linear_mode_fits_the_head_only_and_separates_the_classes(
    pretrained: Path, train_folder: Path, val_folder: Path
):
    train = LabeledImages.from_folder(train_folder)
    val = LabeledImages.from_folder(val_folder, classes=train.classes)
    model = bit_core.create_model("R14x0.5", 3)
    bit_core.load_bit_npz(model, pretrained, load_head=False)
    backbone = {
        k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.conv")
    }
    result = fit_linear(model, train, crop=48)
    assert not result.cancelled
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in backbone.items())
    assert model.head.conv.weight.abs().sum() > 0
    assert evaluate(model, val, 48).top1 >= 0.9


def test_fit_head_solves_a_separable_problem():
    features = torch.cat([torch.randn(20, 8) + 3, torch.randn(20, 8) - 3])
    labels = torch.cat([torch.zeros(20), torch.ones(20)]).long()
    weight, bias, loss = fit_head(features, labels, 2)
    assert ((features @ weight.T + bias).argmax(1) == labels).all() and loss < 0.1


def test_feature_extraction_can_be_cancelled(pretrained: Path, train_folder: Path):
    model = bit_core.create_model("R14x0.5", 3)
    train = LabeledImages.from_folder(train_folder)
    assert (
        extract_features(model, train, 32, device=torch.device("cpu"), should_stop=lambda: True)
        is None
    )


def test_predictor_matches_evaluation_and_ranks_top_k(
    pretrained: Path, train_folder: Path, tmp_path: Path
):
    train = LabeledImages.from_folder(train_folder)
    model = bit_core.create_model("R14x0.5", 3)
    bit_core.load_bit_npz(model, pretrained, load_head=False)
    fit_linear(model, train, crop=48)
    reference = evaluate(model, train, 48)
    save_model(tmp_path / "m", model, ModelInfo("R14x0.5", list(train.classes), crop=48))

    predictor = Predictor.load(tmp_path / "m", device="cpu", backend="torch")
    backbone = predictor.features.model  # type: ignore[attr-defined]
    assert all(m.standardized for m in backbone.modules() if isinstance(m, StdConv2d))
    results = predictor.predict(list(train.sources), top_k=2)
    assert all(len(r) == 2 and r[0].probability >= r[1].probability for r in results)
    top1 = sum(r[0].label == train.classes[y] for r, y in zip(results, train.labels, strict=True))
    assert top1 / len(train) == pytest.approx(reference.top1)
    assert predictor.info is not None and predictor.info.crop == 48
    probabilities = predictor.probabilities(predictor.preprocess([train.sources[0]]))
    assert probabilities.sum().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        predictor.top_k(probabilities, 0)
    assert len(predictor.top_k(probabilities, 99)[0]) == 3  # capped at the class count


def test_predictor_applies_the_models_temperature(tmp_path: Path, train_folder: Path):
    train = LabeledImages.from_folder(train_folder)
    model = bit_core.create_model("R14x0.5", 3)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([2.0, 0.0, -1.0]))  # a confident, fixed answer
    info = ModelInfo("R14x0.5", list(train.classes), crop=32, temperature=2.0)
    save_model(tmp_path / "m", model, info)
    plain = Predictor.from_model(model, list(train.classes), 32, device="cpu")
    scaled = Predictor.load(tmp_path / "m", device="cpu")
    assert scaled.temperature == 2.0 and plain.temperature is None
    batch = scaled.preprocess([train.sources[0]])
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    expected = torch.softmax(logits / 2.0, dim=-1)
    assert torch.allclose(scaled.probabilities(batch), expected, atol=1e-5)
    assert torch.allclose(plain.probabilities(batch), torch.softmax(logits, -1), atol=1e-5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        Predictor.from_model(model, list(train.classes), 32, device="cpu", temperature=0.0)
