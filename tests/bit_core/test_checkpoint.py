"""Our model files and training state: round trips, integrity, no unpickling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import bit_core
from bit_core.checkpoint import (
    METADATA_FILE,
    WEIGHTS_FILE,
    ModelInfo,
    load_model,
    load_training_state,
    read_model_info,
    restore_training_state,
    save_model,
    save_training_state,
)


def random_model(num_classes: int = 4) -> bit_core.resnetv2.ResNetV2:
    torch.manual_seed(0)
    model = bit_core.create_model("R14x0.5", num_classes)
    torch.nn.init.normal_(model.head.conv.weight)
    return model


def test_model_round_trip_keeps_weights_classes_and_sha(tmp_path: Path):
    model = random_model()
    info = save_model(tmp_path / "m", model, ModelInfo("R14x0.5", ["a", "b", "c", "d"], crop=64))
    assert len(info.sha256) == 64
    loaded, loaded_info = load_model(tmp_path / "m")
    assert loaded_info.classes == ["a", "b", "c", "d"] and loaded_info.sha256 == info.sha256
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # Weights are safetensors: no pickle opcodes, a JSON header first.
    assert (tmp_path / "m" / WEIGHTS_FILE).read_bytes()[8:9] == b"{"


def test_corrupt_weights_are_detected(tmp_path: Path):
    save_model(tmp_path / "m", random_model(), ModelInfo("R14x0.5", list("abcd"), crop=64))
    path = tmp_path / "m" / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_model(tmp_path / "m")


def test_class_names_must_match_the_head(tmp_path: Path):
    with pytest.raises(ValueError, match="3 class names for a 4-class head"):
        save_model(tmp_path / "m", random_model(), ModelInfo("R14x0.5", list("abc"), crop=64))


def test_missing_metadata_says_what_a_model_directory_is(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=METADATA_FILE):
        read_model_info(tmp_path)


def test_training_state_round_trip_restores_momentum(tmp_path: Path):
    model = random_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    save_training_state(tmp_path / "s", model, optimizer, step=7, meta={"plan": {"x": 1}})
    state = load_training_state(tmp_path / "s")
    assert state.step == 7 and state.meta == {"plan": {"x": 1}}

    other = bit_core.create_model("R14x0.5", 4)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    restore_training_state(state, other, other_optimizer)
    for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert torch.equal(
            optimizer.state[a]["momentum_buffer"], other_optimizer.state[b]["momentum_buffer"]
        )


def test_unreadable_training_state_says_how_to_recover(tmp_path: Path):
    (tmp_path / "s").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="delete it to restart"):
        load_training_state(tmp_path / "s")
