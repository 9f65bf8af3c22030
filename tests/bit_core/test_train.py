"""The training loop: it learns, resumes bit-identically, cancels cleanly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import bit_core
from bit_core.checkpoint import load_training_state
from bit_core.data import LabeledImages
from bit_core.evaluate import evaluate
from bit_core.train import Progress, RunConfig, TrainResult, finetune

ARCH = "R14x0.5"


def small_plan(data: LabeledImages, **overrides: object) -> bit_core.Plan:
    settings: dict[str, object] = dict(
        batch_size=12, total_steps=12, base_lr=0.01, precrop=40, crop=32
    )
    settings.update(overrides)
    return bit_core.hyperrule(len(data), data.typical_hw(), arch=ARCH, **settings)


def fresh_model(seed: int = 0) -> bit_core.resnetv2.ResNetV2:
    torch.manual_seed(seed)
    return bit_core.create_model(ARCH, 3)


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.mark.slow
def test_small_model_learns_separable_task_well_above_chance(train_folder: Path, val_folder: Path):
    train = LabeledImages.from_folder(train_folder)
    val = LabeledImages.from_folder(val_folder, classes=train.classes)
    plan = small_plan(train, total_steps=25, batch_size=16)
    seen: list[Progress] = []
    result = finetune(
        fresh_model(), train, plan, RunConfig(seed=3), val=val, on_progress=seen.append
    )
    report = evaluate(result.model, val, plan.crop)
    assert report.top1 >= 0.9, report.summary()  # chance is 1/3
    assert [p.step for p in seen] == list(range(1, 26))
    assert seen[-1].eta_s == 0 and seen[0].lr == 0.0  # warmup starts at 0, as the official code
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.evaluations[-1]["step"] == 25 and result.evaluations[-1]["top1"] == report.top1


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="plain"),
        pytest.param({"mixup_alpha": 0.1}, id="mixup"),
        pytest.param({"batch_size": 24}, id="with-replacement"),  # 18 images < batch 24
        # Large images train in channels_last on CPU too (device.use_channels_last).
        pytest.param({"batch_size": 4, "precrop": 272, "crop": 256}, id="channels-last"),
    ],
)
def test_resume_is_bit_identical(train_folder: Path, tmp_path: Path, overrides: dict):
    train = LabeledImages.from_folder(train_folder)
    plan = small_plan(train, total_steps=8, **overrides)
    config = RunConfig(seed=5, checkpoint_every=2)
    one_go = finetune(fresh_model(), train, plan, config)

    checkpoint = tmp_path / "state.safetensors"
    first = finetune(
        fresh_model(),
        train,
        plan,
        RunConfig(seed=5, checkpoint_every=2, stop_after=3),
        checkpoint_path=checkpoint,
    )
    assert first.steps_done == 3 and load_training_state(checkpoint).step == 3
    # A different initialisation must not matter: the checkpoint wins (resume order).
    resumed = finetune(fresh_model(seed=99), train, plan, config, checkpoint_path=checkpoint)
    assert resumed.resumed_from == 3 and resumed.steps_done == 8
    assert weights_equal(one_go.model, resumed.model)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in one_go.history]


def test_each_checkpoint_is_handed_on_once(train_folder: Path, tmp_path: Path):
    """on_checkpoint sees every saved state (a store copies it for other hosts), and the
    final save is not repeated when the cadence already wrote that step."""
    train = LabeledImages.from_folder(train_folder)
    plan = small_plan(train, total_steps=6)
    checkpoint = tmp_path / "state.safetensors"
    seen: list[int] = []
    finetune(
        fresh_model(),
        train,
        plan,
        RunConfig(seed=2, checkpoint_every=3),
        checkpoint_path=checkpoint,
        on_checkpoint=lambda path: seen.append(load_training_state(path).step),
    )
    assert seen == [3, 6]


def test_micro_batches_keep_the_effective_batch(train_folder: Path):
    train = LabeledImages.from_folder(train_folder)
    plan = small_plan(train, total_steps=5)
    whole = finetune(fresh_model(), train, plan, RunConfig(seed=1))
    split = finetune(fresh_model(), train, plan, RunConfig(seed=1, micro_batch_size=4))
    assert split.micro_batch_size == 4
    for a, b in zip(whole.model.parameters(), split.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cancel_stops_between_steps_and_checkpoints(train_folder: Path, tmp_path: Path):
    train = LabeledImages.from_folder(train_folder)
    plan = small_plan(train, total_steps=6)
    checkpoint = tmp_path / "state.safetensors"
    steps: list[int] = []
    result = finetune(
        fresh_model(),
        train,
        plan,
        RunConfig(checkpoint_every=0),
        checkpoint_path=checkpoint,
        on_progress=lambda p: steps.append(p.step),
        should_stop=lambda: len(steps) >= 2,
    )
    assert result.cancelled and result.steps_done == 2
    assert load_training_state(checkpoint).step == 2


def test_resume_refuses_a_checkpoint_of_another_plan(train_folder: Path, tmp_path: Path):
    train = LabeledImages.from_folder(train_folder)
    checkpoint = tmp_path / "state.safetensors"
    finetune(
        fresh_model(),
        train,
        small_plan(train, total_steps=6),
        RunConfig(stop_after=1),
        checkpoint_path=checkpoint,
    )
    with pytest.raises(ValueError, match="plan differs"):
        finetune(fresh_model(), train, small_plan(train, total_steps=7), checkpoint_path=checkpoint)


def test_head_size_must_match_the_classes(train_folder: Path):
    train = LabeledImages.from_folder(train_folder)
    with pytest.raises(ValueError, match="num_classes=3"):
        finetune(bit_core.create_model(ARCH, 5), train, small_plan(train))


def test_diverging_loss_is_reported(train_folder: Path):
    train = LabeledImages.from_folder(train_folder)
    plan = small_plan(train, total_steps=6, base_lr=1e30, supports=[1, 2, 3, 4, 5])
    with pytest.raises(FloatingPointError, match="lower base_lr"):
        finetune(fresh_model(), train, plan)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_step(
    train_folder: Path, monkeypatch: pytest.MonkeyPatch
):
    """A CUDA OOM cannot be provoked on CPU; simulate one above 3 images per micro-batch."""
    import bit_core.train as train_module

    original = train_module._accumulate
    tried: list[int] = []

    def tight_memory(forward, loss_fn, images, targets, micro, autocast):
        tried.append(micro)
        if micro > 3:
            raise torch.OutOfMemoryError("simulated")
        return original(forward, loss_fn, images, targets, micro, autocast)

    monkeypatch.setattr(train_module, "_accumulate", tight_memory)
    train = LabeledImages.from_folder(train_folder)
    plan = small_plan(train, total_steps=5)
    result = finetune(fresh_model(), train, plan, RunConfig(seed=1))
    reference = finetune(fresh_model(), train, plan, RunConfig(seed=1, micro_batch_size=3))
    assert tried[:3] == [12, 6, 3] and set(tried[3:]) == {3}  # backs off once, then stays
    assert result.micro_batch_size == 3 and result.steps_done == 5
    assert weights_equal(result.model, reference.model)


def test_periodic_validation_is_recorded(train_folder: Path, val_folder: Path):
    train = LabeledImages.from_folder(train_folder)
    val = LabeledImages.from_folder(val_folder, classes=train.classes)
    result = finetune(
        fresh_model(), train, small_plan(train, total_steps=6), RunConfig(eval_every=2), val=val
    )
    assert [e["step"] for e in result.evaluations] == [2, 4, 6]
    assert all(0.0 <= e["top1"] <= 1.0 and len(e["confusion"]) == 3 for e in result.evaluations)


@pytest.mark.gpu
def test_cuda_fast_path_trains_in_bf16_channels_last(train_folder: Path):
    train = LabeledImages.from_folder(train_folder)
    result = finetune(
        fresh_model(), train, small_plan(train, total_steps=5), RunConfig(device="cuda")
    )
    assert next(result.model.parameters()).is_cuda and result.steps_done == 5
    assert result.model.root.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(math.isfinite(h["loss"]) for h in result.history)


@pytest.mark.gpu
def test_a_real_cuda_out_of_memory_backs_off_to_a_micro_batch_that_fits(train_folder: Path):
    """The memory cap is three times what a micro-batch of 2 needed: 16 cannot fit, 4 can."""
    train = LabeledImages.from_folder(train_folder)
    device = torch.device("cuda")

    def run(batch: int, micro: int | None) -> TrainResult:
        plan = small_plan(train, batch_size=batch, total_steps=5, precrop=512, crop=480)
        model = bit_core.create_model(ARCH, len(train.classes))
        return finetune(model, train, plan, RunConfig(device="cuda", micro_batch_size=micro))

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    run(2, 2)
    cap = 3 * torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    try:
        result = run(16, None)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
    assert result.steps_done == 5 and 1 < result.micro_batch_size < 16
