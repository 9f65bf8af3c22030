"""Fine-tuning end to end: base weights -> model -> HyperRule plan -> train -> saved model.

The CLI and the service's worker both call `run_finetune`; neither re-implements it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bit_core.checkpoint import ModelInfo, save_model
from bit_core.data import LabeledImages
from bit_core.device import resolve_device
from bit_core.evaluate import evaluate
from bit_core.hyperrule import Plan
from bit_core.linear import fit_linear
from bit_core.npz import load_bit_npz
from bit_core.registry import ARCHITECTURES, OFFICIAL_MODELS, create_model
from bit_core.resnetv2 import ResNetV2
from bit_core.train import (
    CheckpointHook,
    ProgressCallback,
    RunConfig,
    StopCheck,
    TrainResult,
    finetune,
)
from bit_core.weights import default_weights_dir, find, infer_npz_architecture


class BaseModelNotInstalled(LookupError):
    """An official base model was asked for but its weights are not in the weights dir."""


@dataclass(frozen=True)
class BaseModel:
    """Where a fine-tuning run starts: an architecture and, usually, pre-trained weights."""

    name: str
    arch: str
    npz_path: Path | None  # None: random initialisation (training from scratch)


def resolve_base(name: str, weights_dir: str | os.PathLike[str] | None = None) -> BaseModel:
    """Resolve `--base`: an installed weights name, an `.npz` path, or a bare architecture.

    A bare architecture ('R26x1') means training from scratch; an official name that is
    not installed raises BaseModelNotInstalled saying how to install it.
    """
    entry = find(name, weights_dir)
    if entry is not None:
        return BaseModel(name, entry.arch, entry.path)
    path = Path(name)
    if path.suffix == ".npz" and path.is_file():
        arch, _ = infer_npz_architecture(path)
        return BaseModel(path.stem, arch, path)
    if name in OFFICIAL_MODELS:
        directory = weights_dir or default_weights_dir()
        raise BaseModelNotInstalled(
            f"base model '{name}' is not installed in {directory}; run `bit weights pull {name}`"
            f" (online), or download {OFFICIAL_MODELS[name].url} and run "
            f"`bit weights import FILE --name {name}`"
        )
    if name in ARCHITECTURES:
        return BaseModel(name, name, None)
    raise ValueError(
        f"unknown base model '{name}': give an installed weights name (see `bit weights list`),"
        f" an .npz file, an official name ({', '.join(list(OFFICIAL_MODELS)[:3])}, ...) or an"
        f" architecture to train from scratch ({', '.join(ARCHITECTURES)})"
    )


def build_model(base: BaseModel, num_classes: int) -> ResNetV2:
    """The base's architecture with its pre-trained weights and a fresh zero head."""
    model = create_model(base.arch, num_classes)
    if base.npz_path is not None:
        load_bit_npz(model, base.npz_path, load_head=False)
    return model


def run_finetune(
    train: LabeledImages,
    base: BaseModel,
    plan: Plan,
    out_dir: str | os.PathLike[str],
    *,
    config: RunConfig | None = None,
    val: LabeledImages | None = None,
    checkpoint_path: str | Path | None = None,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    on_checkpoint: CheckpointHook | None = None,
) -> tuple[TrainResult, ModelInfo | None]:
    """Train per `plan.mode` and save the model to `out_dir`.

    Returns:
        (the training result, the saved model's info) — info is None when the run was
        cancelled or stopped early (`config.stop_after`), and nothing is saved then.
    """
    config = config or RunConfig()
    model = build_model(base, len(train.classes))
    if plan.mode == "linear":
        result = fit_linear(
            model, train, plan.crop, config, on_progress=on_progress, should_stop=should_stop
        )
    else:
        result = finetune(
            model,
            train,
            plan,
            config,
            val=val,
            checkpoint_path=checkpoint_path,
            on_progress=on_progress,
            should_stop=should_stop,
            on_checkpoint=on_checkpoint,
        )
    finished = plan.mode == "linear" or result.steps_done >= plan.total_steps
    if result.cancelled or not finished:
        return result, None
    metrics: dict[str, object] = {"train_loss": result.history[-1]["loss"]}
    if result.evaluations:
        metrics["validation"] = result.evaluations[-1]
    elif val is not None:
        device = resolve_device(config.device)
        metrics["validation"] = evaluate(model, val, plan.crop, device=device).summary()
    info = ModelInfo(
        arch=base.arch,
        classes=list(train.classes),
        crop=plan.crop,
        plan=plan.to_dict(),
        metrics=metrics,
        base_model=base.name,
    )
    return result, save_model(out_dir, result.model.cpu(), info)  # type: ignore[arg-type]
