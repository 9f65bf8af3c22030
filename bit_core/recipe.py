"""Fine-tuning end to end: base weights -> model -> HyperRule plan -> train -> saved model.

The CLI and the service's worker both call `run_finetune`; neither re-implements it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bit_core import quality as quality_metrics
from bit_core.checkpoint import BaseStore, ModelInfo, save_model, save_shared_linear, sha256_file
from bit_core.data import LabeledImages
from bit_core.device import resolve_device
from bit_core.evaluate import metrics_from_logits, predict_logits
from bit_core.holdout import CV_LABEL, cross_validate_linear
from bit_core.hyperrule import Plan
from bit_core.linear import extract_features, fit_linear
from bit_core.npz import load_bit_npz
from bit_core.provenance import run_provenance
from bit_core.registry import ARCHITECTURES, OFFICIAL_MODELS, create_model
from bit_core.reproducibility import deterministic_mode, weights_generator
from bit_core.resnetv2 import ResNetV2
from bit_core.train import (
    CheckpointHook,
    ProgressCallback,
    RunConfig,
    StopCheck,
    TrainResult,
    ValidationHook,
    finetune,
)
from bit_core.weights import default_weights_dir, find, infer_npz_architecture


class BaseModelNotInstalled(LookupError):
    """An official base model was asked for but its weights are not in the weights dir."""


# Builds a base's model for a number of classes: its weights loaded, a fresh zero head.
ModelFactory = Callable[[int], ResNetV2]


@dataclass(frozen=True)
class BaseModel:
    """Where a fine-tuning run starts: an architecture and, usually, pre-trained weights.

    The weights come from `npz_path` (the official layout), or from `factory` for a model
    that layout cannot hold (e.g. a BatchNorm baseline with its running statistics); then
    `sha256` must name those weights, for the run's provenance.
    """

    name: str
    arch: str
    npz_path: Path | None  # None (and no factory): random initialisation, from scratch
    sha256: str | None = None  # of the weights file, as the weights index records it
    factory: ModelFactory | None = None

    def __post_init__(self) -> None:
        if self.factory is not None and (self.npz_path is not None or not self.sha256):
            raise ValueError(
                f"base model '{self.name}': a factory base takes no npz_path and needs the "
                "sha256 of its weights"
            )

    def weights_sha256(self) -> str | None:
        """The weights file's sha256 (recorded, else computed); None from scratch."""
        if self.factory is not None:
            return self.sha256
        if self.npz_path is None:
            return None
        return self.sha256 or sha256_file(self.npz_path)


def resolve_base(name: str, weights_dir: str | os.PathLike[str] | None = None) -> BaseModel:
    """Resolve `--base`: an installed weights name, an `.npz` path, or a bare architecture.

    A bare architecture ('R26x1') means training from scratch; an official name that is
    not installed raises BaseModelNotInstalled saying how to install it.
    """
    entry = find(name, weights_dir)
    if entry is not None:
        return BaseModel(name, entry.arch, entry.path, entry.sha256)
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


@dataclass(frozen=True)
class QualityOptions:
    """How a run measures the quality of what it trained (never on its training images).

    Attributes:
        eval_every: validate on `val` every this many steps of a full run (0: at the end);
            fills `TrainResult.evaluations`, the validation curve.
        calibrate: fit a temperature on `val` (temperature scaling); saved in the model.
        cv: without `val`, cross-validate a linear head on frozen features of the base.
        seed: fixes the cross-validation folds (the run's seed, as `RunConfig.seed`).
    """

    eval_every: int = 0
    calibrate: bool = False
    cv: bool = True
    seed: int = 0


NO_QUALITY_LABEL = "no held-out images and too few to cross-validate"


def build_model(base: BaseModel, num_classes: int, *, seed: int = 0) -> ResNetV2:
    """The base's architecture with its pre-trained weights and a fresh zero head; a base
    without weights is initialised from `seed` (the same seed, the same weights)."""
    if base.factory is not None:
        return base.factory(num_classes)
    if base.npz_path is None:
        return create_model(base.arch, num_classes, generator=weights_generator(seed))
    model = create_model(base.arch, num_classes)  # every weight but the head is loaded next
    load_bit_npz(model, base.npz_path, load_head=False)
    return model


def _holdout_quality(
    model: ResNetV2,
    val: LabeledImages,
    plan: Plan,
    config: RunConfig,
    options: QualityOptions,
) -> tuple[dict[str, Any], dict[str, Any], float | None]:
    """(quality, the validation summary, temperature) measured on the held-out `val`."""
    device = resolve_device(config.device)
    logits = predict_logits(model, val, plan.crop, device=device, precision=config.precision)
    labels = torch.tensor(val.labels, dtype=torch.long)
    summary = metrics_from_logits(logits, labels, list(val.classes)).summary()
    temperature = None
    if options.calibrate:
        temperature = quality_metrics.fit_temperature(logits, labels)
    # The report is on the probabilities predict will serve (calibrated, if calibrated),
    # so that its PR curves and suggested thresholds apply to predict's answers.
    report = quality_metrics.classification_report(
        quality_metrics.scaled_probabilities(logits, temperature), labels, list(val.classes)
    )
    quality: dict[str, Any] = {
        "kind": "holdout",
        "top1": report["top1"],
        "top5": report["top5"],
        "count": report["count"],
        "label": f"measured on {report['count']} held-out images that never trained",
        "report": report,
    }
    if temperature is not None:
        before = quality_metrics.calibration(torch.softmax(logits, dim=-1), labels)
        quality["calibration"] = {
            "temperature": temperature,
            "ece_before": before["ece"],
            "ece_after": report["calibration"]["ece"],
            # Fitted and measured on the same images: ECE after is optimistic.
            "fitted_on": "the held-out images",
        }
    return quality, summary, temperature


def _cross_validated_quality(
    features: tuple[torch.Tensor, torch.Tensor],
    classes: list[str],
    options: QualityOptions,
    *,
    mode: str,
) -> dict[str, Any]:
    """The cross-validated estimate on (images then mirrors) features, or kind "none"."""
    rows, labels = features
    count = labels.numel() // 2  # extract_features: the images, then their mirrored copies
    estimate = cross_validate_linear(
        rows[:count],
        labels[:count],
        len(classes),
        seed=options.seed,
        mirrors=rows[count:],
        classes=classes,
    )
    if estimate is None:
        return {"kind": "none", "label": NO_QUALITY_LABEL}
    if mode == "full":
        estimate["label"] = (
            f"{CV_LABEL} of the base model: an estimate of a linear head's quality, "
            "not of this fully fine-tuned model"
        )
    return estimate


def run_finetune(
    train: LabeledImages,
    base: BaseModel,
    plan: Plan,
    out_dir: str | os.PathLike[str],
    *,
    config: RunConfig | None = None,
    val: LabeledImages | None = None,
    quality: QualityOptions | None = None,
    checkpoint_path: str | Path | None = None,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    on_checkpoint: CheckpointHook | None = None,
    on_validation: ValidationHook | None = None,
    dataset_version: dict[str, Any] | None = None,
    data: str | None = None,
    bases: BaseStore | None = None,
) -> tuple[TrainResult, ModelInfo | None]:
    """Train per `plan.mode`, measure its quality on images that did not train, save it.

    Every random draw comes from `config.seed` (initial weights of a base without weights,
    batches, augmentation, MixUp; `quality.seed` fixes the folds), so on a CPU two runs of
    one seed save the same weights; `config.deterministic` makes GPU runs repeat too.

    Args:
        train: the training images; nothing else trains.
        val: held-out images (same classes): validated on during a full run (every
            `quality.eval_every` steps) and at the end; the model's quality is measured
            on them, and a temperature fitted on them when `quality.calibrate`.
        quality: how to measure quality (default `QualityOptions()`).
        on_validation: called with (steps done, metrics) after each periodic validation.
        bases: where a linear model from pre-trained weights stores its backbone once; the
            model's directory then holds only its head and a reference to the base. None:
            the model is saved whole.
        dataset_version: the dataset version the images are, where one exists; recorded
            in the model's provenance, as `data` (where the images came from) is.

    Returns:
        (the training result, the saved model's info) — info is None when the run was
        cancelled or stopped early (`config.stop_after`), and nothing is saved then.
        `info.metrics["quality"]` is kind "holdout" (with `val`), "cross_validated" (a
        k-fold or leave-one-out estimate on frozen features of the training images) or
        "none"; `info.metrics["train_loss"]` is a training figure, not quality.
        `info.provenance` (also in the checkpoint) says what made the model.
    """
    config = config or RunConfig()
    with deterministic_mode(config.deterministic):
        return _run_finetune(
            train,
            base,
            plan,
            out_dir,
            config=config,
            val=val,
            quality=quality,
            checkpoint_path=checkpoint_path,
            on_progress=on_progress,
            should_stop=should_stop,
            on_checkpoint=on_checkpoint,
            on_validation=on_validation,
            provenance=run_provenance(
                seed=config.seed,
                plan=plan.to_dict(),
                device=resolve_device(config.device),
                precision=config.precision,
                deterministic=config.deterministic,
                base_model=base.name,
                base_sha256=base.weights_sha256(),
                dataset_version=dataset_version,
                data=data,
            ),
            bases=bases,
        )


def _run_finetune(
    train: LabeledImages,
    base: BaseModel,
    plan: Plan,
    out_dir: str | os.PathLike[str],
    *,
    config: RunConfig,
    val: LabeledImages | None,
    quality: QualityOptions | None,
    checkpoint_path: str | Path | None,
    on_progress: ProgressCallback | None,
    should_stop: StopCheck | None,
    on_checkpoint: CheckpointHook | None,
    on_validation: ValidationHook | None,
    provenance: dict[str, Any],
    bases: BaseStore | None,
) -> tuple[TrainResult, ModelInfo | None]:
    options = quality or QualityOptions()
    if options.eval_every:
        config = dataclasses.replace(config, eval_every=options.eval_every)
    model = build_model(base, len(train.classes), seed=config.seed)
    features: tuple[torch.Tensor, torch.Tensor] | None = None

    def keep_features(rows: torch.Tensor, labels: torch.Tensor) -> None:
        nonlocal features
        features = (rows, labels)

    if plan.mode == "linear":
        result = fit_linear(
            model,
            train,
            plan.crop,
            config,
            on_progress=on_progress,
            should_stop=should_stop,
            on_features=keep_features if val is None and options.cv else None,
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
            on_validation=on_validation,
            provenance=provenance,
        )
    finished = plan.mode == "linear" or result.steps_done >= plan.total_steps
    if result.cancelled or not finished:
        return result, None
    metrics: dict[str, object] = {"train_loss": result.history[-1]["loss"]}
    temperature = None
    if val is not None:
        metrics["quality"], summary, temperature = _holdout_quality(
            result.model,  # type: ignore[arg-type]
            val,
            plan,
            config,
            options,
        )
        metrics["validation"] = result.evaluations[-1] if result.evaluations else summary
    elif options.cv:
        if features is None:  # full mode: the base's features, extracted once, now
            device = resolve_device(config.device)
            # A base without weights is re-drawn from the seed: the weights training began at.
            probe = build_model(base, len(train.classes), seed=config.seed).to(device)
            features = extract_features(
                probe,
                train,
                plan.crop,
                device=device,
                precision=config.precision,
                should_stop=should_stop,
            )
            del probe
            if features is None:
                result.cancelled = True
                return result, None
        metrics["quality"] = _cross_validated_quality(
            features, list(train.classes), options, mode=plan.mode
        )
    else:
        metrics["quality"] = {
            "kind": "none",
            "label": "no held-out images, and cross-validation was turned off",
        }
    info = ModelInfo(
        arch=base.arch,
        classes=list(train.classes),
        crop=plan.crop,
        plan=plan.to_dict(),
        metrics=metrics,
        base_model=base.name,
        temperature=temperature,
        provenance=provenance,
    )
    trained: ResNetV2 = result.model.cpu()  # type: ignore[assignment]
    if bases is not None and plan.mode == "linear" and base.npz_path is not None:
        # Only the head was fitted: the backbone is the base's, byte for byte.
        shared = bases.put(trained, arch=base.arch, name=base.name)
        return result, save_shared_linear(out_dir, trained, info, shared)
    return result, save_model(out_dir, trained, info)
