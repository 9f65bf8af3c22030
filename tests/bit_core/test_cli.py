"""The `bit` program, run as a user runs it: finetune a folder, predict, eval, weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import make_bit_npz, make_image_folder


def bit(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bit_core", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BIT_HOME": str(cwd / ".bit"), **(env or {})},
    )


@pytest.mark.slow
def test_finetune_then_predict_then_eval(tmp_path: Path, train_folder: Path, val_folder: Path):
    npz = make_bit_npz(tmp_path / "base.npz", "R14x0.5", 10)
    imported = bit("weights", "import", str(npz), "--name", "house-base", cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert "R14x0.5, 10 classes" in imported.stdout

    trained = bit(
        "finetune",
        str(train_folder),
        "--base",
        "house-base",
        "--val",
        str(val_folder),
        "--out",
        "model",
        "--batch-size",
        "12",
        "--steps",
        "10",
        "--lr",
        "0.01",
        "--precrop",
        "40",
        "--crop",
        "32",
        "--workers",
        "0",
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr
    assert "model saved to model" in trained.stdout and "quality: held-out top-1" in trained.stdout
    assert "base_lr" not in trained.stderr  # lr was given: no scaling note
    assert (tmp_path / "model" / "model.json").exists()

    image = next((val_folder / "blue_disc").iterdir())
    predicted = bit("predict", "model", str(image), "--top-k", "2", "--json", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    rows = json.loads(predicted.stdout)
    assert rows[0]["image"] == str(image) and len(rows[0]["predictions"]) == 2
    assert {p["label"] for p in rows[0]["predictions"]} <= {
        "blue_disc",
        "green_stripes",
        "red_square",
    }

    evaluated = bit("eval", "model", str(val_folder), "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["count"] == 12 and len(report["confusion"]) == 3


def test_linear_mode_from_the_cli(tmp_path: Path, train_folder: Path):
    npz = make_bit_npz(tmp_path / "base.npz", "R14x0.5", 10)
    trained = bit(
        "finetune",
        str(train_folder),
        "--base",
        str(npz),
        "--mode",
        "linear",
        "--out",
        "lin",
        "--crop",
        "32",
        "--precision",
        "bf16",  # features under bf16 autocast, on a CPU too
        "--quiet",
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr
    assert json.loads((tmp_path / "lin" / "model.json").read_text())["plan"]["mode"] == "linear"
    # Nothing held out (6 per class): the quality line is the cross-validated estimate.
    assert "quality: top-1" in trained.stdout and "linear-probe" in trained.stdout

    # --share-base: the head alone in the model folder, the base once in $BIT_HOME/bases.
    args = ["finetune", str(train_folder), "--base", str(npz), "--mode", "linear"]
    shared = bit(*args, "--crop", "32", "--out", "head", "--share-base", "--quiet", cwd=tmp_path)
    assert shared.returncode == 0, shared.stderr
    assert "is shared" in shared.stdout and "bit export --format bundle" in shared.stdout
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == [
        "head.safetensors",
        "model.json",
    ]
    assert len(list((tmp_path / ".bit" / "bases").iterdir())) == 1
    image = str(next((train_folder / "blue_disc").iterdir()))
    answers = {}
    for model in ("lin", "head"):
        for backend in ("torch", "onnxruntime"):
            run = bit("predict", model, image, "--json", "--backend", backend, cwd=tmp_path)
            assert run.returncode == 0, run.stderr
            answers[model, backend] = json.loads(run.stdout)[0]["predictions"]
    for (model, backend), predictions in answers.items():
        reference = answers[model, "torch"]  # each backend answers as torch does
        assert [p["label"] for p in predictions] == [p["label"] for p in reference], backend
        for got, want in zip(predictions, reference, strict=True):
            assert abs(got["probability"] - want["probability"]) <= 1e-4, backend
    elsewhere = bit("predict", "head", image, "--bases-dir", "nowhere", cwd=tmp_path)
    assert elsewhere.returncode == 2 and "bit export --format bundle" in elsewhere.stderr


@pytest.mark.slow
def test_cli_holdout_and_calibrate(tmp_path: Path):
    folder = make_image_folder(tmp_path / "data", per_class=8, seed=2)
    npz = make_bit_npz(tmp_path / "base.npz", "R14x0.5", 10)
    args = ["finetune", str(folder), "--base", str(npz), "--mode", "linear", "--crop", "32"]
    trained = bit(*args, "--holdout", "0.25", "--calibrate", "--quiet", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "6 images held out; they never train" in trained.stderr
    assert "quality: held-out top-1" in trained.stdout and "on 6 images" in trained.stdout
    assert "temperature" in trained.stdout
    info = json.loads((tmp_path / "bit-model" / "model.json").read_text())
    assert info["temperature"] == info["metrics"]["quality"]["calibration"]["temperature"]
    both = bit(*args, "--holdout", "0.2", "--val", str(folder), cwd=tmp_path)
    assert both.returncode == 2 and "not both" in both.stderr
    alone = bit(*args, "--calibrate", cwd=tmp_path)
    assert alone.returncode == 2 and "give --val or --holdout" in alone.stderr


def test_user_errors_are_one_clear_line(tmp_path: Path, train_folder: Path):
    missing = bit("finetune", str(train_folder), "--base", "BiT-M-R50x1", cwd=tmp_path)
    assert missing.returncode == 2
    assert "bit weights pull BiT-M-R50x1" in missing.stderr and "Traceback" not in missing.stderr

    not_a_model = bit("predict", str(tmp_path), str(train_folder), cwd=tmp_path)
    assert not_a_model.returncode == 2 and "model.json" in not_a_model.stderr

    bad = tmp_path / "bad"
    for name in ("cat", "dog"):
        (bad / name).mkdir(parents=True)
        (bad / name / "ok.png").write_bytes((train_folder / "blue_disc" / "0.png").read_bytes())
    (bad / "cat" / "notes.jpg").write_text("hello")
    corrupt = bit("finetune", str(bad), "--base", "R14x0.5", cwd=tmp_path)
    assert corrupt.returncode == 2 and "notes.jpg" in corrupt.stderr
    assert "Traceback" not in corrupt.stderr

    fp16 = bit(
        "finetune", str(train_folder), "--base", "R14x0.5", "--precision", "fp16", cwd=tmp_path
    )
    assert fp16.returncode == 2 and "choose from 'auto', 'fp32', 'bf16'" in fp16.stderr

    listing = bit("weights", "list", cwd=tmp_path)
    assert listing.returncode == 0 and "available  BiT-M-R152x4" in listing.stdout


@pytest.mark.parametrize(
    "command", [[], ["finetune"], ["predict"], ["eval"], ["weights"], ["weights", "pull"]]
)
def test_every_command_has_help(tmp_path: Path, command: list[str]):
    shown = bit(*command, "--help", cwd=tmp_path)
    assert shown.returncode == 0 and "usage: bit" in shown.stdout


def test_pretrain_writes_an_importable_base_model(tmp_path: Path, train_folder: Path):
    done = bit(
        "pretrain",
        str(train_folder),
        "--arch",
        "R14x0.5",
        "--steps",
        "4",
        "--global-batch",
        "6",
        "--resolution",
        "32",
        "--out",
        "base.npz",
        "--run-dir",
        "run",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "softmax loss" in done.stderr and (tmp_path / "run" / "state.safetensors").exists()
    imported = bit("weights", "import", "base.npz", "--name", "mine", cwd=tmp_path)
    assert imported.returncode == 0 and "R14x0.5, 3 classes" in imported.stdout
