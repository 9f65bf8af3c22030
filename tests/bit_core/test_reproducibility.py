"""Same seed, same model: runs from scratch repeat bit for bit on a CPU, whatever else the
process drew; a killed run resumes to the same weights; the model records what made it.

`pytest -s` prints the sha256 pairs compared."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bit_core
from bit_core.checkpoint import load_training_state, read_model_info, sha256_file
from bit_core.cli import main as bit_main
from bit_core.provenance import _git, run_provenance
from bit_core.recipe import BaseModel, build_model
from bit_core.reproducibility import (
    deterministic_from_env,
    deterministic_mode,
    weights_generator,
)
from tests.factories import make_bit_npz
from tests.polling import wait_for

ARCH = "R14x0.5"
# A from-scratch run small enough for seconds on a CPU (18 images, batch 8, 32 px crops).
TINY = ["--steps", "12", "--batch-size", "8", "--lr", "0.01", "--precrop", "40", "--crop", "32"]


def finetune_args(data: Path, out: Path, seed: int, *extra: str) -> list[str]:
    return [
        "finetune",
        str(data),
        "--base",
        ARCH,
        *TINY,
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--workers",
        "0",
        "--quiet",
        *extra,
    ]


def disturb_global_rng() -> None:
    """What other code in the process might do between two runs."""
    torch.manual_seed(123)
    torch.rand(1000)


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


# --- the initial weights -------------------------------------------------------------------


def test_initial_weights_come_from_the_seed_not_the_global_generator():
    first = bit_core.create_model(ARCH, 3, generator=weights_generator(7))
    disturb_global_rng()
    again = bit_core.create_model(ARCH, 3, generator=weights_generator(7))
    other = bit_core.create_model(ARCH, 3, generator=weights_generator(8))
    assert state_equal(first, again)
    assert not torch.equal(first.root.conv.weight, other.root.conv.weight)
    # Every kernel is drawn anew (none left as the constructor drew it from the global one).
    unseeded = bit_core.create_model(ARCH, 3)
    kernels = [n for n, p in first.named_parameters() if p.dim() == 4 and not n.startswith("head")]
    params = dict(unseeded.named_parameters())
    assert all(not torch.equal(dict(first.named_parameters())[n], params[n]) for n in kernels)


def test_a_new_head_is_the_same_whatever_the_global_generator(tmp_path: Path):
    """BiT's downstream head starts at zero, on a seeded model, a resized head and a
    pre-trained base alike: nothing about it depends on random state."""
    npz = make_bit_npz(tmp_path / "base.npz", ARCH, num_classes=10)
    base = BaseModel("house", ARCH, npz)
    first = build_model(base, 4, seed=1)
    disturb_global_rng()
    again = build_model(base, 4, seed=2)  # the seed draws nothing when weights are loaded
    assert state_equal(first, again)
    model = bit_core.create_model(ARCH, 3, generator=weights_generator(5))
    disturb_global_rng()
    model.reset_head(6)
    assert model.head.conv.weight.shape[0] == 6
    assert not model.head.conv.weight.any() and not model.head.bias.any()
    scratch = BaseModel(ARCH, ARCH, None)
    assert state_equal(build_model(scratch, 3, seed=9), build_model(scratch, 3, seed=9))


# --- whole runs ------------------------------------------------------------------------------


def test_two_cli_runs_from_scratch_of_one_seed_save_the_same_weights(
    train_folder: Path, tmp_path: Path
):
    runs: dict[str, str] = {}
    for name, seed in (("a", 2), ("b", 2), ("c", 3)):
        out = tmp_path / name
        assert bit_main(finetune_args(train_folder, out, seed)) == 0
        runs[name] = read_model_info(out).sha256
        assert runs[name] == sha256_file(out / "weights.safetensors")
        disturb_global_rng()  # what else the process does between runs changes nothing
    print(f"\nCLI from scratch, seed 2 twice: {runs['a']} {runs['b']}; seed 3: {runs['c']}")
    assert runs["a"] == runs["b"]
    assert runs["c"] != runs["a"]


def test_the_model_and_its_checkpoint_record_their_provenance(
    train_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    npz = make_bit_npz(tmp_path / "base.npz", ARCH, num_classes=10)
    out = tmp_path / "model"
    monkeypatch.setenv("BIT_DETERMINISTIC", "1")
    assert bit_main(finetune_args(train_folder, out, 4, "--mode", "linear")) == 0
    scratch = read_model_info(out).provenance
    assert scratch["seed"] == 4 and scratch["plan"]["mode"] == "linear"
    assert scratch["base_model"] == ARCH and scratch["base_sha256"] is None
    assert scratch["data"] == str(train_folder.resolve()) and scratch["dataset_version"] is None
    assert scratch["torch_version"] == torch.__version__ and scratch["bit_service_version"]
    assert scratch["device"].startswith("cpu") and scratch["precision"] == "fp32"
    assert scratch["deterministic"] is True  # from BIT_DETERMINISTIC
    assert scratch["git_commit"] is None or len(scratch["git_commit"]) == 40
    assert not torch.are_deterministic_algorithms_enabled()  # the mode ended with the run

    monkeypatch.delenv("BIT_DETERMINISTIC")
    out = tmp_path / "full"
    assert bit_main(finetune_args(train_folder, out, 4, "--base", str(npz))) == 0
    provenance = read_model_info(out).provenance
    assert provenance["base_sha256"] == sha256_file(npz) and provenance["deterministic"] is False
    checkpoint = load_training_state(out.with_name("full.ckpt.safetensors"))
    assert checkpoint.meta["provenance"] == provenance


def test_deterministic_mode_is_on_inside_only(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    with deterministic_mode(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert run_provenance(seed=0, plan={}, device=torch.device("cpu"), precision="auto")[
            "deterministic"
        ]
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    assert deterministic_from_env({"BIT_DETERMINISTIC": "true"})
    assert not deterministic_from_env({})
    with pytest.raises(ValueError, match="BIT_DETERMINISTIC='maybe'"):
        deterministic_from_env({"BIT_DETERMINISTIC": "maybe"})


def test_provenance_never_fails_where_git_cannot_answer(tmp_path: Path):
    assert _git(tmp_path, "rev-parse", "HEAD") is None  # not a checkout
    assert _git(tmp_path / "missing", "rev-parse", "HEAD") is None


# --- resume after kill -9 --------------------------------------------------------------------

# `bit finetune`, stalling before step STALL_AT (after the checkpoint of step 4 is written)
# until the test kills it: the kill always lands mid-run, with step 5's work unsaved.
STALL_AT = 5
STALLING_BIT = """
import pathlib, sys, time
import bit_core.augment as augment
from bit_core.cli import main

real = augment.step_generator

def stalling(seed, step):
    if step == {stall_at}:
        pathlib.Path({ready!r}).write_text(str(step))
        time.sleep(3600)  # until the test's SIGKILL
    return real(seed, step)

augment.step_generator = stalling
sys.exit(main(sys.argv[1:]))
"""


def run_bit(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "bit_core", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(train_folder: Path, tmp_path: Path):
    extra = ("--checkpoint-every", "2")
    run_bit(finetune_args(train_folder, tmp_path / "whole", 6, *extra), tmp_path)

    ready = tmp_path / "stalled"
    killed_args = finetune_args(train_folder, tmp_path / "killed", 6, *extra)
    script = STALLING_BIT.format(stall_at=STALL_AT, ready=str(ready))
    process = subprocess.Popen(
        [sys.executable, "-c", script, *killed_args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(ready.exists, 300, f"the run to reach step {STALL_AT}", interval=0.05)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    checkpoint = tmp_path / "killed.ckpt.safetensors"
    assert load_training_state(checkpoint).step == 4 and not (tmp_path / "killed").exists()

    run_bit(killed_args, tmp_path)  # the same command again: resumes from step 4
    whole = read_model_info(tmp_path / "whole").sha256
    resumed = read_model_info(tmp_path / "killed").sha256
    print(f"\nuninterrupted vs killed at step {STALL_AT} and resumed: {whole} {resumed}")
    assert resumed == whole
    assert load_training_state(checkpoint).step == 12


# --- pre-training on 2 gloo ranks ----------------------------------------------------------


@pytest.mark.slow
def test_pretraining_on_two_gloo_ranks_repeats_with_its_seed(tmp_path: Path):
    from bit_core.pretrain_run import PROVENANCE, write_spec
    from bit_core.train import RunConfig
    from bit_core.upstream import upstream_plan
    from tests.factories import make_multilabel_manifest
    from tests.torchrun import records, torchrun

    manifest = make_multilabel_manifest(tmp_path / "data")
    plan = upstream_plan(
        64, 8, multi_label=True, global_batch=16, total_steps=6, resolution=32, base_lr=0.03
    )
    digests = []
    for run in ("first", "second"):
        run_dir = tmp_path / run
        write_spec(
            run_dir,
            arch=ARCH,
            data=str(manifest),
            plan=plan,
            config=RunConfig(seed=11, checkpoint_every=3, device="cpu"),
        )
        process = torchrun(run_dir)
        try:
            assert process.wait(timeout=600) == 0, (run_dir / "torchrun.log").read_text()[-3000:]
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        assert records(run_dir)[-1]["outcome"] == "finished"
        rank0 = (run_dir / "rank0.sha256").read_text()
        assert rank0 == (run_dir / "rank1.sha256").read_text()  # the ranks stayed in sync
        state = load_training_state(run_dir / "state.safetensors")
        provenance = json.loads((run_dir / PROVENANCE).read_text())
        assert state.step == 6 and state.meta["provenance"]["seed"] == 11
        assert provenance["seed"] == 11 and provenance["world"] == 2
        assert provenance["npz_sha256"] == sha256_file(run_dir / "model.npz")
        digests.append(rank0)
    print(f"\npre-training, 2 gloo ranks, seed 11 twice: {digests[0]} {digests[1]}")
    assert digests[0] == digests[1]


# --- GPU: deterministic mode ---------------------------------------------------------------


@pytest.mark.gpu
def test_two_deterministic_gpu_runs_of_one_seed_save_the_same_weights(
    train_folder: Path, tmp_path: Path
):
    shas = []
    for name in ("a", "b"):
        out = tmp_path / name
        args = finetune_args(train_folder, out, 2, "--device", "cuda", "--deterministic")
        assert bit_main(args) == 0
        info = read_model_info(out)
        assert info.provenance["deterministic"] and info.provenance["device"].startswith("cuda")
        shas.append(info.sha256)
    print(f"\nGPU, deterministic, seed 2 twice: {shas[0]} {shas[1]}")
    assert shas[0] == shas[1]
