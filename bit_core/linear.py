"""Linear mode: extract pre-logit features once, fit only the head with L-BFGS.

A few-shot model is ready in seconds on a CPU, since the backbone runs forward once per
image (plus its mirror image) instead of hundreds of SGD steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bit_core import augment
from bit_core.data import LabeledImages, SquareImages
from bit_core.device import autocast_for, resolve_device, to_device_layout
from bit_core.resnetv2 import ResNetV2
from bit_core.train import Progress, RunConfig, StopCheck, TrainResult

# L2 penalty on the head weights (on the mean loss). Features come out of GroupNorm+ReLU
# and average pooling, so they are of unit scale; this keeps a 1-shot fit from diverging.
DEFAULT_L2 = 1e-3
LBFGS_ITERATIONS = 200
FEATURE_BATCH = 64  # images per forward pass while extracting (twice that with mirrors)


# no_grad, not inference_mode: the features feed the autograd-driven head fit.
@torch.no_grad()
def extract_features(
    model: ResNetV2,
    images: LabeledImages,
    crop: int,
    *,
    device: torch.device,
    precision: str = "auto",
    batch_size: int = FEATURE_BATCH,
    mirror: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
    should_stop: StopCheck | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Pre-logit features (N or 2N, F) and labels; `mirror` adds flipped copies.

    Returns:
        (features, labels): with `mirror`, rows 0..N-1 are the images in order and rows
        N..2N-1 their mirrored copies, in the same order (so `features[:N]` is one row per
        image, as cross-validation needs). None if `should_stop` asked to stop.
    """
    model.eval()
    decoded = SquareImages(images, crop)
    features, mirrored = [], []
    batches = range(0, len(images), batch_size)
    for done, start in enumerate(batches, 1):
        if should_stop is not None and should_stop():
            return None
        end = min(start + batch_size, len(images))
        batch = augment.to_unit_range(torch.stack([decoded[i][0] for i in range(start, end)]))
        batch = torch.cat([batch, batch.flip(-1)]) if mirror else batch
        with autocast_for(device, precision):
            out = model.pre_logits(to_device_layout(batch.to(device), device)).float().cpu()
        features.append(out[: end - start])
        mirrored.append(out[end - start :])
        if on_batch is not None:
            on_batch(done, len(batches))
    labels = torch.tensor(images.labels, dtype=torch.long)
    if not mirror:
        return torch.cat(features), labels
    return torch.cat(features + mirrored), torch.cat([labels, labels])


def fit_head(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, l2: float = DEFAULT_L2
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Multinomial logistic regression by L-BFGS; returns (weight (C, F), bias (C,), loss)."""
    weight = torch.zeros(num_classes, features.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=LBFGS_ITERATIONS, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        logits = features @ weight.T + bias
        return F.cross_entropy(logits, labels) + 0.5 * l2 * weight.square().sum()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)  # returns the *first* evaluation's loss, not the final one
    with torch.no_grad():
        final_loss = float(objective())
    return weight.detach(), bias.detach(), final_loss


def fit_linear(
    model: ResNetV2,
    train: LabeledImages,
    crop: int,
    config: RunConfig | None = None,
    *,
    l2: float = DEFAULT_L2,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: StopCheck | None = None,
    on_features: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> TrainResult:
    """Fit `model`'s head on frozen features of `train`; the backbone is unchanged.

    Progress counts feature batches, then one step for the fit.

    Args:
        on_features: called with (features, labels) as `extract_features` returns them
            (images, then their mirrored copies), so that a caller can reuse them, e.g.
            to cross-validate, without extracting them again.
    """
    config = config or RunConfig()
    device = resolve_device(config.device)
    model.to(device)
    began = time.perf_counter()
    total = -(-len(train) // FEATURE_BATCH) + 1

    def report(done: int, loss: float = float("nan")) -> None:
        if on_progress is not None:
            elapsed = time.perf_counter() - began
            images = min(done * FEATURE_BATCH, len(train))  # the last feature batch may be short
            rate = images / elapsed if elapsed > 0 else 0.0
            on_progress(Progress(done, total, loss, 0.0, rate, elapsed / done * (total - done)))

    extracted = extract_features(
        model,
        train,
        crop,
        device=device,
        precision=config.precision,
        on_batch=lambda done, _: report(done),
        should_stop=should_stop,
    )
    if extracted is None:
        return TrainResult(model, 0, 0, cancelled=True, micro_batch_size=0)
    if on_features is not None:
        on_features(*extracted)
    weight, bias, loss = fit_head(*extracted, len(train.classes), l2=l2)
    with torch.no_grad():
        model.head.conv.weight.copy_(weight[:, :, None, None].to(device))
        model.head.bias.copy_(bias.to(device))
    report(total, loss)
    return TrainResult(
        model,
        total,
        0,
        cancelled=False,
        micro_batch_size=0,
        history=[{"step": total, "loss": loss}],
    )
