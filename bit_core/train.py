"""The one training loop, for fine-tuning (and, later, pre-training) alike.

Sections: device & precision · resume · the step (micro-batches, OOM back-off) · checkpoint
· progress & validation. Resume order: this run's own checkpoint if it exists → the
weights already in the model the caller passed (e.g. a BiT base) → its initialisation.
A step's batch and augmentation depend only on (seed, step), the checkpoint holds model,
momentum, step and plan, so a resumed run ends bit-identical to an uninterrupted one (CPU;
on a GPU in deterministic mode, `RunConfig.deterministic`). The initial weights come from
the seed too (`bit_core.reproducibility`), so two runs of one seed end identical as well.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from bit_core import augment
from bit_core.checkpoint import load_training_state, restore_training_state, save_training_state
from bit_core.data import LabeledImages, StepSampler, iterate_batches
from bit_core.device import autocast_for, resolve_device, to_device_layout, use_channels_last
from bit_core.evaluate import evaluate
from bit_core.hyperrule import Plan
from bit_core.reproducibility import deterministic_mode
from bit_core.resnetv2 import ResNetV2


class Schedule(Protocol):
    """What the loop needs of a plan: a per-step learning rate and the optimizer's knobs."""

    momentum: float
    weight_decay: float

    @property
    def total_steps(self) -> int: ...

    def lr_at(self, step: int) -> float | None: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass
class RunConfig:
    """How to run a plan (not what to learn): device, precision, checkpoints, validation."""

    seed: int = 0  # initial weights of a from-scratch model, batches, augmentation, MixUp
    # PyTorch's deterministic algorithms and cuDNN's deterministic kernels (GPU runs
    # repeat, at some speed; bit_core.reproducibility). CPU runs repeat without it.
    deterministic: bool = False
    device: str = "auto"  # "auto" picks CUDA when available
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; or "fp32"/"bf16"
    micro_batch_size: int | None = None  # None: the whole batch, halved on CUDA OOM
    compile: bool = False
    checkpoint_every: int = 50
    eval_every: int = 0  # 0: validate only at the end
    num_workers: int = 0
    stop_after: int | None = None  # run at most this many steps in this call, then checkpoint


@dataclass(frozen=True)
class Progress:
    """One finished step, as reported to the progress callback."""

    step: int  # steps completed so far
    total_steps: int
    loss: float
    lr: float
    images_per_s: float
    eta_s: float


@dataclass
class TrainResult:
    model: torch.nn.Module
    steps_done: int
    resumed_from: int
    cancelled: bool
    micro_batch_size: int
    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] | None = None  # as the checkpoint keeps it


ProgressCallback = Callable[[Progress], None]
StopCheck = Callable[[], bool]
EvalHook = Callable[[int], dict[str, Any] | None]
ValidationHook = Callable[[int, dict[str, Any]], None]
CheckpointHook = Callable[[Path], None]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed softmax cross-entropy against (possibly mixed) class distributions."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum()


def _accumulate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    targets: torch.Tensor,
    micro: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
) -> torch.Tensor:
    """Gradients of the batch-mean loss, accumulated over micro-batches of `micro` images."""
    total = torch.zeros((), device=images.device)
    batch = images.shape[0]
    for start in range(0, batch, micro):
        with autocast():
            logits = forward(images[start : start + micro])
        loss = loss_fn(logits, targets[start : start + micro])
        (loss / batch).backward()
        total += loss.detach()
    return total / batch


def train_loop(
    model: torch.nn.Module,
    schedule: Schedule,
    batches: Callable[[range], Iterable[tuple[int, torch.Tensor, torch.Tensor]]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    config: RunConfig,
    *,
    checkpoint_path: str | Path | None = None,
    checkpoint_meta: dict[str, Any] | None = None,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    on_eval: EvalHook | None = None,
    image_side: int = 0,
    wrap: Callable[[torch.nn.Module], Callable[[torch.Tensor], torch.Tensor]] | None = None,
    writes_checkpoints: bool = True,
    on_checkpoint: CheckpointHook | None = None,
    provenance: dict[str, Any] | None = None,
) -> TrainResult:
    """Run `schedule` on `model`, resuming from `checkpoint_path` when it exists.

    The caller chooses deterministic mode (`deterministic_mode(config.deterministic)`
    around this call, as `finetune` and `pretrain` do).

    Args:
        model: the network, with its starting weights.
        schedule: learning rate per step and total steps (a HyperRule `Plan`, or upstream).
        batches: given the steps still to run, yields (step, float images, dense targets).
        loss_fn: (logits, targets) -> summed loss over the micro-batch.
        config: device, precision, micro-batching, checkpoint and validation cadence.
        checkpoint_path: resumable state file; read if present, written every
            `config.checkpoint_every` steps, on cancel and at the end.
        checkpoint_meta: JSON data to keep in the checkpoint (and to check on resume).
        on_progress: called after every step.
        should_stop: polled between steps; True stops cleanly (cooperative cancel).
        on_eval: called with the step count every `eval_every` steps and at the end;
            returns validation metrics to record.
        image_side: training crop size; picks the memory layout (`use_channels_last`).
        wrap: builds the forward callable from the placed model (e.g. DistributedDataParallel).
        writes_checkpoints: False on data-parallel ranks other than 0 (they only read).
        on_checkpoint: called with the checkpoint's path after each write (e.g. to copy it
            to shared storage, so another host can resume the run).
        provenance: what made this run (`bit_core.provenance`), kept in the checkpoint's
            meta; unlike `checkpoint_meta` not compared on resume (another host may resume).
    """
    device = resolve_device(config.device)
    model.to(device)
    if use_channels_last(device, image_side):
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.0, momentum=schedule.momentum, weight_decay=schedule.weight_decay
    )
    meta = {"plan": schedule.to_dict(), **(checkpoint_meta or {})}

    # --- resume ---------------------------------------------------------------------------
    start = 0
    history: list[dict[str, float]] = []
    evaluations: list[dict[str, Any]] = []
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        state = load_training_state(checkpoint_path)
        for key, value in meta.items():
            if state.meta.get(key) != value:
                raise ValueError(
                    f"{checkpoint_path}: the checkpoint's {key} differs from this run's; "
                    "resume with the same settings, or delete the checkpoint to start afresh"
                )
        restore_training_state(state, model, optimizer)
        start = state.step
        history = state.meta.get("history", [])
        evaluations = state.meta.get("evaluations", [])

    micro = config.micro_batch_size or 0
    forward: Callable[[torch.Tensor], torch.Tensor] = model if wrap is None else wrap(model)
    if config.compile:
        forward = torch.compile(forward)

    def autocast() -> contextlib.AbstractContextManager[Any]:
        return autocast_for(device, config.precision)

    # What the state on disk holds: the final save is skipped when the cadence already
    # wrote that very state (each write may be copied to remote storage as well).
    saved: tuple[int, int] | None = None

    def checkpoint(steps_done: int) -> None:
        nonlocal saved
        if checkpoint_path is None or not writes_checkpoints:
            return
        if saved != (steps_done, len(evaluations)):
            saved = (steps_done, len(evaluations))
            save_training_state(
                checkpoint_path,
                model,
                optimizer,
                steps_done,
                {
                    **meta,
                    "history": history,
                    "evaluations": evaluations,
                    **({"provenance": provenance} if provenance is not None else {}),
                },
            )
            if on_checkpoint is not None:
                on_checkpoint(Path(checkpoint_path))

    def validate(steps_done: int) -> None:
        if on_eval is not None:
            metrics = on_eval(steps_done)
            if metrics is not None:
                evaluations.append({"step": steps_done, **metrics})

    total = schedule.total_steps
    end = total if config.stop_after is None else min(total, start + config.stop_after)
    steps_done, cancelled = start, False
    began, images_seen = time.perf_counter(), 0
    for step, images, targets in batches(range(start, end)):
        if should_stop is not None and should_stop():
            cancelled = True
            break
        lr = schedule.lr_at(step)
        if lr is None:
            break
        images = to_device_layout(images, device)
        # --- the step: micro-batches, backing off on CUDA out-of-memory -------------------
        while True:
            micro = micro or images.shape[0]
            optimizer.zero_grad(set_to_none=True)
            try:
                loss = _accumulate(forward, loss_fn, images, targets, micro, autocast)
                break
            except torch.OutOfMemoryError:
                if micro == 1:
                    raise
                micro = max(1, micro // 2)  # keeps the effective batch: only the split changes
                torch.cuda.empty_cache()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        steps_done = step + 1
        images_seen += images.shape[0]

        # --- checkpoint, progress, validation ---------------------------------------------
        loss_value = float(loss)
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}; lower base_lr")
        history.append({"step": steps_done, "loss": loss_value, "lr": lr})
        if config.checkpoint_every and steps_done % config.checkpoint_every == 0:
            checkpoint(steps_done)
        if on_progress is not None:
            elapsed = time.perf_counter() - began
            rate = images_seen / elapsed if elapsed > 0 else 0.0
            per_step = elapsed / (steps_done - start)
            on_progress(
                Progress(steps_done, total, loss_value, lr, rate, per_step * (total - steps_done))
            )
        if config.eval_every and steps_done % config.eval_every == 0 and steps_done < total:
            validate(steps_done)
    if steps_done >= total and not cancelled:
        validate(steps_done)
    checkpoint(steps_done)
    return TrainResult(
        model=model,
        steps_done=steps_done,
        resumed_from=start,
        cancelled=cancelled,
        micro_batch_size=micro,
        history=history,
        evaluations=evaluations,
        provenance=provenance,
    )


def finetune(
    model: ResNetV2,
    train: LabeledImages,
    plan: Plan,
    config: RunConfig | None = None,
    *,
    val: LabeledImages | None = None,
    checkpoint_path: str | Path | None = None,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    on_checkpoint: CheckpointHook | None = None,
    on_validation: ValidationHook | None = None,
    provenance: dict[str, Any] | None = None,
) -> TrainResult:
    """Fine-tune `model` on `train` with a BiT-HyperRule plan (full mode).

    Args:
        model: a ResNetV2 whose head has len(train.classes) outputs (zero-initialised).
        train: the labeled training images.
        plan: from `bit_core.hyperrule`.
        config: how to run it (seed, device, micro-batching, checkpoints).
        val: optional validation images, evaluated every `config.eval_every` steps and at
            the end (top-1, per-class metrics).
        checkpoint_path: resumable state; an existing file resumes the run.
        on_progress / should_stop: progress callback and cooperative cancel check.
        on_checkpoint: called with the checkpoint's path after each write.
        on_validation: called with (steps done, metrics) after each validation on `val`,
            as it happens (e.g. to draw the validation curve while the run goes on).
        provenance: kept in the checkpoint (`bit_core.provenance.run_provenance`).

    Returns:
        The TrainResult; `result.model` holds the trained weights.
    """
    config = config or RunConfig()
    if model.num_classes != len(train.classes):
        raise ValueError(
            f"the model's head has {model.num_classes} outputs but the data has "
            f"{len(train.classes)} classes; create the model with num_classes={len(train.classes)}"
        )
    device = resolve_device(config.device)
    sampler = StepSampler(len(train), plan.batch_size, config.seed)
    num_classes = len(train.classes)

    def batches(steps: range) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        source = iterate_batches(
            train, sampler, plan.precrop, steps, num_workers=config.num_workers, device=device
        )
        for step, pixels, labels in source:
            rng = augment.step_generator(config.seed, step)
            images = augment.train_batch(pixels, plan.crop, rng)
            targets = F.one_hot(labels, num_classes).float()
            if plan.mixup_alpha > 0:
                images, partner, lam = augment.mixup(images, plan.mixup_alpha, rng)
                targets = lam * targets + (1.0 - lam) * targets[partner]
            yield step, images, targets

    def on_eval(steps_done: int) -> dict[str, Any] | None:
        if val is None:
            return None
        report = evaluate(model, val, plan.crop, device=device, precision=config.precision)
        model.train()
        summary = report.summary()
        if on_validation is not None:
            on_validation(steps_done, summary)
        return summary

    with deterministic_mode(config.deterministic):
        return train_loop(
            model,
            plan,
            batches,
            soft_cross_entropy,
            config,
            checkpoint_path=checkpoint_path,
            checkpoint_meta={"sampler": sampler.state_dict(), "classes": list(train.classes)},
            on_progress=on_progress,
            should_stop=should_stop,
            on_eval=on_eval,
            image_side=plan.crop,
            on_checkpoint=on_checkpoint,
            provenance=provenance,
        )
