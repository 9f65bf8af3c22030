"""Engine speed: BiT training throughput and inference latency, official vs. our fast path.

One run measures, side by side and interleaved round by round (so that a burst of load from
another process hits every row alike), for each resolution:

* training images/s: "official" (plain fp32 eager NCHW, Weight Standardization on every
  forward, CrossEntropyLoss, SGD momentum 0.9, micro-batches accumulated as in the official
  BiT PyTorch `train.py`) against `bit_core.train.train_loop` as it runs on this device, and
  candidate fast-path variants (channels_last, bf16 autocast, torch.compile);
* inference: batch-1 latency (median, p90) and batch-8 throughput, "official" (eval mode,
  `torch.no_grad()`, standardizing on every forward) against
  `bit_core.predict.Predictor.probabilities` (kernels standardized once, inference_mode),
  and variants (channels_last, bf16 autocast, oneDNN prepacked convs, TorchScript freeze,
  torch.compile of the prepared model);
* timm's `resnetv2_50x1_bit` (R50x1) or `resnetv2_101x1_bit` (R101x1), when timm is
  importable.

torch.compile rows run in a child process with a fresh inductor cache (so the compile time
is a cold one) and a hard time limit. Rows whose warm-up is more than SLOW_FACTOR times
slower than the official row get one timed iteration and are skipped at larger resolutions.

Usage:
    python benchmarks/engine_speed.py                      # full run (~10 min on 2 CPU cores)
    python benchmarks/engine_speed.py --quick              # short run, no compile rows
    python benchmarks/engine_speed.py --out BENCHMARKS.md  # also write/update a section there
    python benchmarks/engine_speed.py --device cuda        # GPU run (bf16 + channels_last path)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.mkldnn
from common import (
    RoundPolicy,
    _num,
    cpu_model,
    log,
    quiet_gate,
    script_parser,
    wait_for_quiet,
    write_section,
)
from flops import device_peak, flops_per_image
from torch import nn

from bit_core import create_model
from bit_core.backends import PreLogits, TorchFeatures
from bit_core.layers import StdConv2d
from bit_core.predict import Predictor
from bit_core.resnetv2 import ResNetV2
from bit_core.train import RunConfig, soft_cross_entropy, train_loop

NUM_CLASSES = 10  # head size: irrelevant to speed; a CIFAR-10-like downstream task
LR = 0.003  # BiT-HyperRule base lr (the value does not change the speed)
SEED = 0
SLOW_FACTOR = 4.0  # warm-up slower than this x official: one timed iteration, skip larger px
TIMM_NAMES = {"R50x1": "resnetv2_50x1_bit", "R101x1": "resnetv2_101x1_bit"}


# --- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """Iteration counts for one resolution on one device."""

    micro: int  # training micro-batch
    accum: int  # micro-batches per optimizer step (gradient accumulation, as batch_split)
    train_rounds: int  # interleaved rounds; each round times `train_steps` steps of every row
    train_steps: int
    warmup_b1: int  # inference warm-up calls (batch 1 / batch 8)
    warmup_b8: int
    infer_rounds: int  # interleaved rounds; each times `b1_runs` + `b8_runs` calls per row
    b1_runs: int
    b8_runs: int


def counts_for(device: torch.device, resolution: int, quick: bool) -> Counts:
    """Small counts on CPU (R50x1 at 480 px is seconds per micro-batch on 2 cores)."""
    large = resolution > 224
    if device.type == "cuda":
        return Counts(
            micro=32 if large else 128,
            accum=2,
            train_rounds=2 if quick else 5,
            train_steps=1 if quick else 2,
            warmup_b1=10,
            warmup_b8=5,
            infer_rounds=2 if quick else 5,
            b1_runs=10 if quick else 20,
            b8_runs=5 if quick else 10,
        )
    if large:
        return Counts(
            micro=4,
            accum=2,
            train_rounds=1 if quick else 3,
            train_steps=1,
            warmup_b1=2,
            warmup_b8=1,
            infer_rounds=1 if quick else 3,
            b1_runs=3 if quick else 4,
            b8_runs=1,
        )
    return Counts(
        micro=16,
        accum=2,
        train_rounds=1 if quick else 4,
        train_steps=1,
        warmup_b1=2,
        warmup_b8=1,
        infer_rounds=2 if quick else 4,
        b1_runs=3 if quick else 5,
        b8_runs=1 if quick else 2,
    )


@dataclass(frozen=True)
class Row:
    """One measured path."""

    key: str
    label: str
    isolated: bool = False  # run in a child process (torch.compile)


def _timm_name(arch: str) -> str:
    return TIMM_NAMES.get(arch, "(none)")


def training_rows(device: torch.device, arch: str) -> list[Row]:
    if device.type == "cuda":
        return [
            Row("official", "official: fp32 eager NCHW, WS every forward"),
            Row("fast", "fast = train_loop on cuda: bf16 autocast + channels_last"),
            Row("fast_fp32", "train_loop fp32 + channels_last"),
            Row("fast_compile", "fast + torch.compile (inductor)", isolated=True),
            Row("timm", f"timm {_timm_name(arch)}, official-style loop"),
        ]
    return [
        Row("official", "official: fp32 eager NCHW, WS every forward"),
        Row("fast", "fast = train_loop on cpu: fp32 eager NCHW"),
        Row("fast_cl", "train_loop + channels_last"),
        Row("fast_bf16", "train_loop + bf16 autocast"),
        Row("fast_compile", "train_loop + torch.compile (inductor)", isolated=True),
        Row("timm", f"timm {_timm_name(arch)}, official-style loop"),
    ]


def inference_rows(device: torch.device, arch: str) -> list[Row]:
    if device.type == "cuda":
        return [
            Row("official", "official: eval + no_grad, WS every forward"),
            Row("fast", "fast = Predictor on cuda: bf16 + channels_last"),
            Row("fast_fp32", "Predictor fp32 + channels_last"),
            Row("fast_compile", "Predictor + torch.compile", isolated=True),
            Row("timm", f"timm {_timm_name(arch)}, eval + no_grad"),
        ]
    return [
        Row("official", "official: eval + no_grad, WS every forward"),
        Row("fast", "fast = Predictor on cpu: WS once, fp32 NCHW"),
        Row("fast_cl", "Predictor + channels_last"),
        Row("fast_bf16", "Predictor + bf16 autocast"),
        Row("fast_mkldnn", "Predictor + oneDNN prepacked convs"),
        Row("fast_jit", "Predictor + TorchScript freeze/optimize"),
        Row("fast_compile", "Predictor + torch.compile (inductor freezing)", isolated=True),
        Row("timm", f"timm {_timm_name(arch)}, eval + no_grad"),
    ]


# --- models and inputs -----------------------------------------------------------------------


def timm_module() -> Any | None:
    try:
        import timm  # type: ignore[import-not-found]
    except ImportError:
        return None
    return timm


def make_model(arch: str) -> ResNetV2:
    """Seeded random weights; the head is re-initialised N(0, 0.01) (BiT zero-inits it) so
    that outputs and gradients are not trivially constant. Values do not change the speed."""
    torch.manual_seed(SEED)
    model = create_model(arch, NUM_CLASSES)
    with torch.no_grad():
        nn.init.normal_(model.head.conv.weight, std=0.01)
    return model


class OfficialStdConv2d(StdConv2d):
    """The official BiT PyTorch code's StdConv2d, op for op: var_mean, subtract, divide."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=[1, 2, 3], keepdim=True, unbiased=False)
        weight = (self.weight - mean) / torch.sqrt(var + self.eps)  # eps: the official 1e-10
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def make_official_model(arch: str) -> ResNetV2:
    """`make_model` with the official code's weight standardization in every conv.

    bit_core's own standardization is one fused batch-norm call; the official rows must
    time the official arithmetic, not ours.
    """
    model = make_model(arch)
    for module in model.modules():
        if type(module) is StdConv2d:
            module.__class__ = OfficialStdConv2d
    return model


def make_timm_model(arch: str) -> nn.Module:
    timm = timm_module()
    if timm is None:
        raise RuntimeError("timm is not installed")
    if arch not in TIMM_NAMES:
        raise RuntimeError(f"no timm counterpart for {arch}")
    torch.manual_seed(SEED)
    return timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=NUM_CLASSES)


def make_images(batch: int, resolution: int, salt: int = 0) -> torch.Tensor:
    """Uniform random images in [-1, 1] (N, 3, H, W), the same in every process."""
    generator = torch.Generator().manual_seed(SEED * 1_000_003 + resolution * 1009 + batch + salt)
    return torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1


def make_labels(batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED + 7)
    return torch.randint(0, NUM_CLASSES, (batch,), generator=generator)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def official_cudnn(device: torch.device) -> Iterator[None]:
    """The official train.py sets cudnn.benchmark = True; our engine leaves the default."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


# --- training runners ------------------------------------------------------------------------


class OfficialTrainer:
    """The official BiT PyTorch loop: per micro-batch forward, CE loss, read the loss
    (`c_num = float(c)`), `(c / batch_split).backward()`; SGD step after `batch_split`."""

    def __init__(self, model: nn.Module, device: torch.device, counts: Counts, res: int):
        self.device = device
        self.model = model.to(device).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=0.9)
        self.criterion = nn.CrossEntropyLoss()
        self.micro, self.accum = counts.micro, counts.accum
        batch = counts.micro * counts.accum
        self.images = make_images(batch, res).to(device)
        self.labels = make_labels(batch).to(device)

    def run(self, steps: int, *, warmup: int = 0) -> list[float]:
        """Per-step seconds; the first `warmup` steps are a single micro-batch."""
        durations = []
        with official_cudnn(self.device):
            for step in range(steps):
                accum = 1 if step < warmup else self.accum
                began = time.perf_counter()
                for index in range(accum):
                    part = slice(index * self.micro, (index + 1) * self.micro)
                    logits = self.model(self.images[part])
                    loss = self.criterion(logits, self.labels[part])
                    float(loss.detach())  # c_num = float(c.data.cpu().numpy())
                    (loss / accum).backward()
                for group in self.optimizer.param_groups:
                    group["lr"] = LR
                self.optimizer.step()
                self.optimizer.zero_grad()
                synchronize(self.device)
                durations.append(time.perf_counter() - began)
        return durations

    def images_per_step(self, warmup: bool = False) -> int:
        return self.micro * (1 if warmup else self.accum)


@dataclass
class _Schedule:
    """The `train_loop` Schedule protocol with a constant learning rate."""

    steps: int
    momentum: float = 0.9
    weight_decay: float = 0.0

    @property
    def total_steps(self) -> int:
        return self.steps

    def lr_at(self, step: int) -> float | None:
        return LR

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}


class LoopTrainer:
    """`bit_core.train.train_loop` itself, timed from its progress callback."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        counts: Counts,
        res: int,
        *,
        precision: str = "auto",
        channels_last: bool = False,
        compile: bool = False,
    ):
        self.device = device
        self.model = model.to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.config = RunConfig(
            seed=SEED,
            device=str(device),
            precision=precision,
            micro_batch_size=counts.micro,
            compile=compile,
            checkpoint_every=0,
        )
        self.micro, self.accum = counts.micro, counts.accum
        batch = counts.micro * counts.accum
        # On CUDA train_loop turns the batch channels_last itself (to_device_layout).
        images = make_images(batch, res).to(device)
        self.images = images.contiguous(memory_format=self.memory_format)
        self.targets = F.one_hot(make_labels(batch), NUM_CLASSES).float().to(device)

    def run(self, steps: int, *, warmup: int = 0) -> list[float]:
        """Per-step seconds over one `train_loop` call; its first `warmup` steps are one
        micro-batch (the same micro-batch shape: a compiled graph is reused).

        Each call builds a new optimizer (momentum buffers are allocated on its first step,
        ~1% of a 128 px step) and, with `compile`, a new torch.compile wrapper, which reuses
        the code compiled by the first call."""
        stamps: list[float] = []

        def batches(todo: range) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
            for index, step in enumerate(todo):
                size = self.micro if index < warmup else self.micro * self.accum
                if not stamps:
                    stamps.append(time.perf_counter())
                yield step, self.images[:size], self.targets[:size]

        def on_progress(_: Any) -> None:
            synchronize(self.device)
            stamps.append(time.perf_counter())

        train_loop(
            self.model,
            _Schedule(steps),
            batches,
            soft_cross_entropy,
            self.config,
            on_progress=on_progress,
        )
        return durations_of(stamps)

    def images_per_step(self, warmup: bool = False) -> int:
        return self.micro * (1 if warmup else self.accum)


def durations_of(stamps: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(stamps)]


Trainer = OfficialTrainer | LoopTrainer


def build_trainer(key: str, arch: str, device: torch.device, counts: Counts, res: int) -> Trainer:
    if key == "official":
        return OfficialTrainer(make_official_model(arch), device, counts, res)
    if key == "timm":
        return OfficialTrainer(make_timm_model(arch), device, counts, res)
    model = make_model(arch)
    if key == "fast":
        return LoopTrainer(model, device, counts, res)
    if key == "fast_cl":
        return LoopTrainer(model, device, counts, res, channels_last=True)
    if key == "fast_bf16":
        return LoopTrainer(model, device, counts, res, precision="bf16")
    if key == "fast_fp32":
        return LoopTrainer(model, device, counts, res, precision="fp32")
    if key == "fast_compile":
        return LoopTrainer(model, device, counts, res, compile=True)
    raise ValueError(f"unknown training row {key}")


# --- inference runners -----------------------------------------------------------------------

Infer = Callable[[torch.Tensor], torch.Tensor]


def official_infer(model: nn.Module, device: torch.device) -> Infer:
    """Eval mode, `torch.no_grad()`, kernels standardized inside every forward."""
    model = model.to(device).eval()

    def infer(batch: torch.Tensor) -> torch.Tensor:
        with official_cudnn(device), torch.no_grad():
            logits = model(batch.to(device, non_blocking=True))
            return torch.softmax(logits.float(), dim=-1).cpu()

    return infer


def _predictor(arch: str, device: torch.device, res: int, precision: str = "auto") -> Predictor:
    classes = [f"class{index}" for index in range(NUM_CLASSES)]
    return Predictor.from_model(
        make_model(arch), classes, res, device=str(device), precision=precision, backend="torch"
    )


def _backbone(predictor: Predictor) -> TorchFeatures:
    """The predictor's torch backbone, whose `graph` the variants below replace."""
    assert isinstance(predictor.features, TorchFeatures)
    return predictor.features


def _jit_infer(predictor: Predictor) -> Infer:
    """Trace per input shape, then torch.jit.freeze + optimize_for_inference."""
    backbone = _backbone(predictor)
    prepared = PreLogits(backbone.model).eval()
    traced: dict[tuple[int, ...], Any] = {}

    def infer(batch: torch.Tensor) -> torch.Tensor:
        shape = tuple(batch.shape)
        if shape not in traced:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                example = batch.to(predictor.device)
                module = torch.jit.freeze(torch.jit.trace(prepared, example).eval())
                traced[shape] = torch.jit.optimize_for_inference(module)
        backbone.graph = traced[shape]
        return predictor.probabilities(batch)

    return infer


def build_infer(key: str, arch: str, device: torch.device, res: int) -> Infer:
    if key == "official":
        return official_infer(make_official_model(arch), device)
    if key == "timm":
        return official_infer(make_timm_model(arch), device)
    if key == "fast":
        return _predictor(arch, device, res).probabilities
    if key == "fast_fp32":
        return _predictor(arch, device, res, precision="fp32").probabilities
    if key == "fast_bf16":
        return _predictor(arch, device, res, precision="bf16").probabilities
    if key == "fast_cl":
        predictor = _predictor(arch, device, res)
        _backbone(predictor).model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        # On CPU Predictor leaves the layout alone: convert inside the timed call, as the
        # engine would have to.
        return lambda batch: predictor.probabilities(
            batch.contiguous(memory_format=torch.channels_last)
        )
    if key == "fast_mkldnn":
        predictor = _predictor(arch, device, res)
        # Valid only because Predictor froze the standardized kernels into the weights.
        backbone = _backbone(predictor)
        backbone.graph = torch.utils.mkldnn.to_mkldnn(backbone.model).pre_logits
        return predictor.probabilities
    if key == "fast_jit":
        return _jit_infer(_predictor(arch, device, res))
    if key == "fast_compile":
        if device.type == "cpu":
            # Inductor's CPU inference setting: weights become constants, convs are
            # prepacked for oneDNN and fused with their pointwise neighbours.
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
        predictor = _predictor(arch, device, res)
        backbone = _backbone(predictor)
        compiled = torch.compile(PreLogits(backbone.model), dynamic=False)
        backbone.graph = compiled  # type: ignore[assignment]
        return predictor.probabilities
    raise ValueError(f"unknown inference row {key}")


def timed(infer: Infer, batch: torch.Tensor, runs: int) -> tuple[list[float], torch.Tensor]:
    durations, out = [], torch.empty(0)
    for _ in range(runs):
        began = time.perf_counter()
        out = infer(batch)
        durations.append(time.perf_counter() - began)
    return durations, out


# --- results ---------------------------------------------------------------------------------


@dataclass
class TrainResult:
    row: str
    label: str
    res: int
    micro: int = 0
    accum: int = 0
    images: int = 0
    seconds: float = 0.0
    round_rates: list[float] = field(default_factory=list)
    warmup_s: float = 0.0
    note: str = ""
    fast_ref: float | None = None  # images/s of eager `fast`, same child process (isolated)
    peak_bytes: int = 0  # CUDA: most memory allocated during a timed step (0: not measured)

    @property
    def images_per_s(self) -> float | None:
        """Median over rounds: robust to a burst of load from another process."""
        return statistics.median(self.round_rates) if self.round_rates else None


@dataclass
class InferResult:
    row: str
    label: str
    res: int
    b1: list[float] = field(default_factory=list)
    b8: list[float] = field(default_factory=list)
    max_dp: float | None = None  # max |probability difference| vs official, batch 8
    warmup_b1_s: float = 0.0
    note: str = ""
    fast_ref: InferResult | None = None  # eager `fast`, same child process (isolated rows)

    @property
    def b1_median_ms(self) -> float | None:
        return 1000 * statistics.median(self.b1) if self.b1 else None

    @property
    def b1_p90_ms(self) -> float | None:
        if not self.b1:
            return None
        if len(self.b1) == 1:
            return 1000 * self.b1[0]
        return 1000 * statistics.quantiles(self.b1, n=10, method="inclusive")[-1]

    @property
    def b8_images_per_s(self) -> float | None:
        """8 / median batch-8 latency."""
        return 8 / statistics.median(self.b8) if self.b8 else None


# --- measuring ------------------------------------------------------------------------------


def measure_training_eager(
    rows: list[Row],
    arch: str,
    device: torch.device,
    res: int,
    counts: Counts,
    slow: dict[str, str],
    policy: RoundPolicy,
) -> list[TrainResult]:
    """Warm every row up with one micro-batch, then interleave timed rounds."""
    results: dict[str, TrainResult] = {}
    trainers: dict[str, Trainer] = {}
    for row in rows:
        result = TrainResult(row.key, row.label, res, counts.micro, counts.accum)
        results[row.key] = result
        if row.key in slow:
            result.note = slow[row.key]
            continue
        try:
            trainer = build_trainer(row.key, arch, device, counts, res)
            log(f"train {res}px {row.key}: warm-up")
            result.warmup_s = sum(trainer.run(1, warmup=1))
            trainers[row.key] = trainer
        except Exception as error:  # report and go on with the other rows
            result.note = f"error: {type(error).__name__}: {error}"[:160]
    # Against the fastest warm-up (the first row's also pays for process start-up).
    reference = min((results[key].warmup_s for key in trainers), default=0.0)
    slow_now = {
        key
        for key in trainers
        if key != "official" and reference > 0 and results[key].warmup_s > SLOW_FACTOR * reference
    }
    for key in slow_now:
        # One step of a single micro-batch is enough to time a path this much slower; it
        # also confirms the warm-up (a burst of load elsewhere can slow any one call).
        log(f"train {res}px {key}: slow warm-up; one more micro-batch")
        (seconds,) = trainers[key].run(1, warmup=1)
        factor = min(seconds, results[key].warmup_s) / reference
        if factor <= SLOW_FACTOR:
            continue
        trainer = trainers.pop(key)
        result = results[key]
        result.images, result.seconds, result.accum = trainer.images_per_step(True), seconds, 1
        result.round_rates = [result.images / seconds]
        result.note = f"{factor:.0f}x slower than the fastest warm-up: 1 micro-batch timed"
        slow[key] = f"skipped: {factor:.0f}x slower at {res} px"
    order = list(trainers)

    def one_round(round_index: int) -> dict[str, tuple[int, float, int]]:
        log(f"train {res}px: round {round_index + 1}")
        shift = round_index % max(1, len(order))
        data = {}
        for key in order[shift:] + order[:shift]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = sum(trainers[key].run(counts.train_steps))
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
            data[key] = (trainers[key].images_per_step() * counts.train_steps, seconds, peak)
        return data

    for data in policy.run(counts.train_rounds, one_round):
        for key, (images, seconds, peak) in data.items():
            result = results[key]
            result.images += images
            result.seconds += seconds
            result.round_rates.append(images / seconds)
            result.peak_bytes = max(result.peak_bytes, peak)
    return [results[row.key] for row in rows]


def measure_inference_eager(
    rows: list[Row],
    arch: str,
    device: torch.device,
    res: int,
    counts: Counts,
    slow: dict[str, str],
    policy: RoundPolicy,
) -> list[InferResult]:
    results: dict[str, InferResult] = {}
    infers: dict[str, Infer] = {}
    one, eight = make_images(1, res), make_images(8, res)
    reference: torch.Tensor | None = None
    for row in rows:
        result = InferResult(row.key, row.label, res)
        results[row.key] = result
        if row.key in slow:
            result.note = slow[row.key]
            continue
        try:
            infer = build_infer(row.key, arch, device, res)
            log(f"infer {res}px {row.key}: warm-up")
            durations, _ = timed(infer, one, counts.warmup_b1)
            result.warmup_b1_s = min(durations)
            infers[row.key] = infer
        except Exception as error:
            result.note = f"error: {type(error).__name__}: {error}"[:160]
    fastest_warm = min((results[key].warmup_b1_s for key in infers), default=0.0)
    for key in list(infers):
        factor = results[key].warmup_b1_s / fastest_warm if fastest_warm > 0 else 0.0
        result = results[key]
        if key != "official" and factor > SLOW_FACTOR:
            log(f"infer {res}px {key}: slow warm-up; two more batch-1 runs")
            b1, _ = timed(infers[key], one, 2)
            factor = min(result.warmup_b1_s, *b1) / fastest_warm
        if key != "official" and factor > SLOW_FACTOR:
            infer = infers.pop(key)
            result.b1 = b1
            result.b8, out = timed(infer, eight, 1)
            result.note = f"{factor:.0f}x slower than the fastest warm-up: 2 + 1 runs"
            slow[key] = f"skipped: {factor:.0f}x slower at {res} px"
            result.max_dp = _parity(out, reference)
            continue
        _, out = timed(infers[key], eight, counts.warmup_b8)
        if key == "official":
            reference = out
        # timm initialises its own random weights: its outputs are not comparable.
        result.max_dp = None if key == "timm" else _parity(out, reference)
    order = list(infers)

    def one_round(round_index: int) -> dict[str, tuple[list[float], list[float]]]:
        log(f"infer {res}px: round {round_index + 1}")
        shift = round_index % max(1, len(order))
        data = {}
        for key in order[shift:] + order[:shift]:
            b1, _ = timed(infers[key], one, counts.b1_runs)
            b8, _ = timed(infers[key], eight, counts.b8_runs)
            data[key] = (b1, b8)
        return data

    for data in policy.run(counts.infer_rounds, one_round):
        for key, (b1, b8) in data.items():
            results[key].b1 += b1
            results[key].b8 += b8
    return [results[row.key] for row in rows]


def _parity(out: torch.Tensor, reference: torch.Tensor | None) -> float | None:
    if reference is None or out.shape != reference.shape:
        return None
    return float((out.float() - reference.float()).abs().max())


# --- isolated rows (torch.compile): a child process, a fresh cache, a hard limit -------------


def worker_main(spec: dict[str, Any]) -> None:
    """Child-process side: measure one isolated row and, interleaved with it round by round,
    the eager `fast` row as a same-window reference; print `RESULT <json>`."""
    device = torch.device(spec["device"])
    res, arch, limit = spec["res"], spec["arch"], spec["compile_limit"]
    counts = Counts(**spec["counts"])
    policy = RoundPolicy(spec["max_others"], spec["max_redo"])
    out: dict[str, Any] = {}
    if spec["task"] == "train":
        trainer = build_trainer(spec["row"], arch, device, counts, res)
        (out["compile_s"],) = trainer.run(1, warmup=1)  # compiles forward and backward
        if out["compile_s"] > limit:
            print("RESULT " + json.dumps(out), flush=True)
            return
        eager = build_trainer("fast", arch, device, counts, res)
        eager.run(1, warmup=1)

        def train_round(round_index: int) -> dict[str, float]:
            pair = [("row", trainer), ("fast", eager)]
            rates = {}
            for name, runner in pair if round_index % 2 == 0 else pair[::-1]:
                seconds = sum(runner.run(counts.train_steps))
                rates[name] = runner.images_per_step() * counts.train_steps / seconds
            return rates

        kept = policy.run(counts.train_rounds, train_round)
        out["round_rates"] = [rates["row"] for rates in kept]
        out["fast_images_per_s"] = statistics.median(rates["fast"] for rates in kept)
    else:
        infer = build_infer(spec["row"], arch, device, res)
        one, eight = make_images(1, res), make_images(8, res)
        (out["compile_s"],), _ = timed(infer, one, 1)
        if out["compile_s"] > limit:
            print("RESULT " + json.dumps(out), flush=True)
            return
        (out["compile_b8_s"],), _ = timed(infer, eight, 1)
        eager = build_infer("fast", arch, device, res)
        for runner in (infer, eager):
            timed(runner, one, counts.warmup_b1)
            _, probabilities = timed(runner, eight, counts.warmup_b8)
            if runner is infer:
                reference = official_infer(make_official_model(arch), device)(eight)
                out["max_dp"] = _parity(probabilities, reference)

        def infer_round(round_index: int) -> dict[str, tuple[list[float], list[float]]]:
            pair = [("row", infer), ("fast", eager)]
            data = {}
            for name, runner in pair if round_index % 2 == 0 else pair[::-1]:
                data[name] = (
                    timed(runner, one, counts.b1_runs)[0],
                    timed(runner, eight, counts.b8_runs)[0],
                )
            return data

        kept = policy.run(counts.infer_rounds, infer_round)
        out["b1"] = [t for data in kept for t in data["row"][0]]
        out["b8"] = [t for data in kept for t in data["row"][1]]
        out["fast_b1"] = [t for data in kept for t in data["fast"][0]]
        out["fast_b8"] = [t for data in kept for t in data["fast"][1]]
    out["policy"] = policy.summary()
    out["others"] = statistics.mean(policy.others) if policy.others else None
    print("RESULT " + json.dumps(out), flush=True)


def run_isolated(spec: dict[str, Any], timeout_s: float) -> tuple[dict[str, Any] | None, str]:
    """Run `worker_main` in a child with a fresh inductor cache; kill its group on timeout."""
    cache = tempfile.mkdtemp(prefix="engine_speed_inductor_")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return None, f"not done within {timeout_s:.0f} s (killed)"
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :]), ""
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"failed (exit {process.returncode}): {tail}"[:160]


def _child_note(out: dict[str, Any]) -> str:
    others = out.get("others")
    note = "" if others is None else f"; others {others:.2f} cores"
    return note + (f", {out['policy']}" if out.get("policy") else "")


def measure_training_isolated(
    row: Row, arch: str, device: torch.device, res: int, counts: Counts, args: argparse.Namespace,
    official: TrainResult,
) -> TrainResult:  # fmt: skip
    result = TrainResult(row.key, row.label, res, counts.micro, counts.accum)
    per_micro = counts.micro / official.images_per_s if official.images_per_s else 10.0
    micro_batches = 2 + 2 * counts.accum * counts.train_rounds * counts.train_steps
    budget = args.compile_limit + 60 + 3 * per_micro * micro_batches
    spec = {
        "task": "train", "row": row.key, "arch": arch, "device": str(device), "res": res,
        "counts": asdict(counts), "compile_limit": args.compile_limit,
        "max_others": args.max_others, "max_redo": args.max_redo,
    }  # fmt: skip
    log(f"train {res}px {row.key}: child process (limit {budget:.0f} s)")
    out, error = run_isolated(spec, budget)
    if out is None:
        result.note = f"compile limit {args.compile_limit:.0f} s: {error}"
        return result
    result.warmup_s = out["compile_s"]
    if "round_rates" not in out:
        result.note = f"too slow to compile: {out['compile_s']:.0f} s > {args.compile_limit:.0f} s"
        return result
    result.round_rates = out["round_rates"]
    result.images = len(result.round_rates)  # marks the row as measured
    result.fast_ref = out["fast_images_per_s"]
    result.note = (
        f"compile + 1st micro-batch {out['compile_s']:.0f} s (cold cache); child process: "
        f"× fast against eager fast there ({result.fast_ref:.2f} images/s), × official chained"
        + _child_note(out)
    )
    return result


def measure_inference_isolated(
    row: Row, arch: str, device: torch.device, res: int, counts: Counts, args: argparse.Namespace,
    official: InferResult,
) -> InferResult:  # fmt: skip
    result = InferResult(row.key, row.label, res)
    b1_s = (official.b1_median_ms or 1000.0) / 1000
    b8_s = 8 / official.b8_images_per_s if official.b8_images_per_s else 8.0
    runs_b1 = 2 * (counts.warmup_b1 + counts.infer_rounds * counts.b1_runs)
    runs_b8 = 2 * (1 + counts.warmup_b8 + counts.infer_rounds * counts.b8_runs)
    budget = 2 * args.compile_limit + 60 + 3 * (runs_b1 * b1_s + runs_b8 * b8_s)
    spec = {
        "task": "infer", "row": row.key, "arch": arch, "device": str(device), "res": res,
        "counts": asdict(counts), "compile_limit": args.compile_limit,
        "max_others": args.max_others, "max_redo": args.max_redo,
    }  # fmt: skip
    log(f"infer {res}px {row.key}: child process (limit {budget:.0f} s)")
    out, error = run_isolated(spec, budget)
    if out is None:
        result.note = f"compile limit {args.compile_limit:.0f} s: {error}"
        return result
    if "b1" not in out:
        result.note = f"too slow to compile: {out['compile_s']:.0f} s > {args.compile_limit:.0f} s"
        return result
    result.b1, result.b8, result.max_dp = out["b1"], out["b8"], out["max_dp"]
    result.fast_ref = InferResult("fast", "fast", res, out["fast_b1"], out["fast_b8"])
    result.note = (
        f"compile {out['compile_s']:.0f} s (batch 1) + {out['compile_b8_s']:.0f} s (batch 8), "
        f"cold cache; child process: × fast against eager fast there "
        f"({_num(result.fast_ref.b1_median_ms)} ms, {_num(result.fast_ref.b8_images_per_s, 2)} "
        "images/s), × official chained" + _child_note(out)
    )
    return result


# --- report -----------------------------------------------------------------------------------


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "—"
    return f"{value / reference:.2f}×"


def _speedup(value: float | None, reference: float | None) -> str:
    """Latency speed-up: reference / value (> 1 is faster)."""
    if not value or reference is None:
        return "—"
    return f"{reference / value:.2f}×"


def _chained(
    value: float | None, same_window_fast: float | None, fast: float | None, official: float | None
) -> float | None:
    """An isolated row's value in units of the main run: row/fast measured side by side in
    the child, times fast/official measured side by side in the main run."""
    if value is None or not same_window_fast or fast is None or not official:
        return None
    return value / same_window_fast * fast / official


def row_precision(device: torch.device, row: str) -> str:
    """The precision a training row computes in: bf16 for autocast rows, else fp32."""
    fast_is_bf16 = device.type == "cuda" and row in ("fast", "fast_compile")
    return "bf16" if "bf16" in row or fast_is_bf16 else "fp32"


def mfu(result: TrainResult, arch: str, device: torch.device) -> str:
    """Model FLOPs utilisation of a training row, against its precision's peak."""
    peak = device_peak(device, row_precision(device, result.row))
    if result.images_per_s is None or peak is None:
        return "—"
    used = result.images_per_s * flops_per_image(arch, result.res, training=True)
    return f"{used / peak.flops:.1%}"


def mfu_note(arch: str, device: torch.device, resolutions: list[int]) -> str:
    """What the MFU column is measured against, for the header."""
    per_image = ", ".join(
        f"{flops_per_image(arch, res, training=True) / 1e9:.1f} GFLOP at {res} px"
        for res in resolutions
    )
    peaks = {p: device_peak(device, p) for p in ("fp32", "bf16")}
    sources = "; ".join(
        f"{precision} rows: {peak.source}" for precision, peak in peaks.items() if peak
    )
    return (
        f"- MFU: images/s × {arch} forward + backward FLOPs per image (convolutions and "
        f"matrix products, FlopCounterMode: {per_image}) ÷ the peak of the row's precision. "
        f"{sources or 'Peak: unknown device'}."
    )


def _gib(size: int) -> str:
    return f"{size / 1024**3:.2f}" if size else "—"


def training_table(results: list[TrainResult], arch: str, device: torch.device) -> str:
    memory = device.type == "cuda"  # peak memory: a GPU figure (CPU RAM is not the limit)
    lines = [
        "| px | path | micro × accum | images/s | rounds min–max | × official | × fast | MFU "
        + ("| peak GPU memory GiB " if memory else "")
        + "| notes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if memory else "") + "---|",
    ]
    by = {(r.res, r.row): r for r in results}
    for r in results:
        official = by.get((r.res, "official"))
        fast = by.get((r.res, "fast"))
        spread = (
            f"{min(r.round_rates):.1f}–{max(r.round_rates):.1f}" if len(r.round_rates) > 1 else "—"
        )
        batch = f"{r.micro} × {r.accum}" if r.images else "—"
        vs_official = _ratio(r.images_per_s, official.images_per_s if official else None)
        if r.fast_ref is not None and fast is not None and official is not None:
            chained = _chained(r.images_per_s, r.fast_ref, fast.images_per_s, official.images_per_s)
            vs_official = "—" if chained is None else f"{chained:.2f}×"
        lines.append(
            f"| {r.res} | {r.label} | {batch} | {_num(r.images_per_s, 2)} | {spread} "
            f"| {vs_official} "
            f"| {_ratio(r.images_per_s, r.fast_ref or (fast.images_per_s if fast else None))} "
            f"| {mfu(r, arch, device)} "
            + (f"| {_gib(r.peak_bytes)} " if memory else "")
            + f"| {r.note} |"
        )
    return "\n".join(lines)


def inference_table(results: list[InferResult]) -> str:
    lines = [
        "| px | path | b1 median ms | b1 p90 ms | b1 × official | b1 × fast "
        "| b8 images/s | b8 × official | b8 × fast | max abs Δp vs official | notes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    by = {(r.res, r.row): r for r in results}
    for r in results:
        official = by.get((r.res, "official"))
        fast = r.fast_ref or by.get((r.res, "fast"))
        dp = "—" if r.max_dp is None else f"{r.max_dp:.1e}"
        b1_official = _speedup(r.b1_median_ms, official.b1_median_ms if official else None)
        b8_official = _ratio(r.b8_images_per_s, official.b8_images_per_s if official else None)
        main_fast = by.get((r.res, "fast"))
        if r.fast_ref is not None and main_fast is not None and official is not None:
            # latency: chain the speed-ups (reference / value)
            b1 = _chained(
                r.fast_ref.b1_median_ms,
                r.b1_median_ms,
                official.b1_median_ms,
                main_fast.b1_median_ms,
            )
            b8 = _chained(
                r.b8_images_per_s,
                r.fast_ref.b8_images_per_s,
                main_fast.b8_images_per_s,
                official.b8_images_per_s,
            )
            b1_official = "—" if b1 is None else f"{b1:.2f}×"
            b8_official = "—" if b8 is None else f"{b8:.2f}×"
        lines.append(
            f"| {r.res} | {r.label} | {_num(r.b1_median_ms)} | {_num(r.b1_p90_ms)} "
            f"| {b1_official} "
            f"| {_speedup(r.b1_median_ms, fast.b1_median_ms if fast else None)} "
            f"| {_num(r.b8_images_per_s, 2)} "
            f"| {b8_official} "
            f"| {_ratio(r.b8_images_per_s, fast.b8_images_per_s if fast else None)} "
            f"| {dp} | {r.note} |"
        )
    return "\n".join(lines)


def section_key(args: argparse.Namespace, device: torch.device) -> str:
    if args.section:
        return args.section
    mode = "quick" if args.quick else "full"
    parts = [device.type, f"torch-{torch.__version__}", args.arch, mode]
    if args.resolutions != "128,480":
        parts.append(f"px-{args.resolutions.replace(',', '-')}")
    if args.rows:
        parts.append(f"rows-{args.rows.replace(',', '-')}")
    if args.compile_all:
        parts.append("compile-all")
    return " ".join(parts)


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)  # --device, --out and the load options
    parser.add_argument("--arch", default="R50x1", help="bit_core architecture (default R50x1)")
    parser.add_argument("--resolutions", default="128,480", help="comma-separated (128,480)")
    parser.add_argument("--quick", action="store_true", help="short run; no compile rows")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile rows (default: on in a full run, off with --quick)",
    )
    parser.add_argument(
        "--compile-all",
        action="store_true",
        help="compile rows at every resolution (default: the smallest only; a cold inductor "
        "compile of R50x1 takes minutes on a small CPU)",
    )
    parser.add_argument("--compile-limit", type=float, default=180.0, help="seconds (180)")
    parser.add_argument("--rows", default="", help="only these row keys, e.g. official,fast")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--section", default="", help="section key in --out (default: derived)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"CUDA is not available on this machine (torch {torch.__version__}): no GPU "
            "figures measured. Run on a GPU host, or use --device cpu.",
            file=sys.stderr,
        )
        return 0
    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    if device.type not in ("cpu", "cuda"):
        print(f"unsupported device {device}", file=sys.stderr)
        return 2
    compile_rows = (not args.quick) if args.compile is None else args.compile
    resolutions = [int(v) for v in args.resolutions.split(",") if v.strip()]
    wanted = {v.strip() for v in args.rows.split(",") if v.strip()}
    has_timm = timm_module() is not None

    def keep(row: Row, res: int) -> bool:
        if wanted and row.key not in wanted and row.key != "official":
            return False
        if row.key == "timm" and (not has_timm or args.arch not in TIMM_NAMES):
            return False
        if not row.isolated:
            return True
        return compile_rows and (args.compile_all or res == min(resolutions))

    load, waits, quiet = wait_for_quiet(args.max_load, args.load_retries, args.load_wait)
    started = dt.datetime.now(dt.UTC)
    began = time.perf_counter()
    log(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"load {load:.2f}"
    )
    train_results: list[TrainResult] = []
    infer_results: list[InferResult] = []
    background: list[str] = []
    slow_train: dict[str, str] = {}
    slow_infer: dict[str, str] = {}

    def block_note(name: str, gate: str, policy: RoundPolicy) -> str:
        others = statistics.mean(policy.others) if policy.others else None
        extra = ", ".join(part for part in (policy.summary(), gate) if part)
        return f"{name}: {_num(others, 2)}" + (f" ({extra})" if extra else "")

    for res in resolutions:
        counts = counts_for(device, res, args.quick)
        if not args.skip_training:
            rows = [row for row in training_rows(device, args.arch) if keep(row, res)]
            gate = quiet_gate(f"training {res} px", args.max_others, args.block_waits, 30.0)
            policy = RoundPolicy(args.max_others, args.max_redo)
            eager = measure_training_eager(
                [r for r in rows if not r.isolated],
                args.arch, device, res, counts, slow_train, policy,
            )  # fmt: skip
            official = next(r for r in eager if r.row == "official")
            isolated = [
                measure_training_isolated(row, args.arch, device, res, counts, args, official)
                for row in rows
                if row.isolated
            ]
            train_results += eager + isolated
            background.append(block_note(f"training {res} px", gate, policy))
        if not args.skip_inference:
            rows = [row for row in inference_rows(device, args.arch) if keep(row, res)]
            gate = quiet_gate(f"inference {res} px", args.max_others, args.block_waits, 30.0)
            policy = RoundPolicy(args.max_others, args.max_redo)
            eager_inf = measure_inference_eager(
                [r for r in rows if not r.isolated],
                args.arch, device, res, counts, slow_infer, policy,
            )  # fmt: skip
            official_inf = next(r for r in eager_inf if r.row == "official")
            isolated_inf = [
                measure_inference_isolated(row, args.arch, device, res, counts, args, official_inf)
                for row in rows
                if row.isolated
            ]
            infer_results += eager_inf + isolated_inf
            background.append(block_note(f"inference {res} px", gate, policy))
    elapsed = time.perf_counter() - began

    timm = timm_module()
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    load_line = f"1-min load average {load:.2f} at start" + (
        f" (after waiting {waits} × {args.load_wait:.0f} s)" if waits else ""
    )
    if not quiet:
        load_line += (
            f" — still ≥ {args.max_load} after {args.load_retries} retries: other work was "
            "running, figures may be noisy"
        )
    not_compiled = (
        "" if not compile_rows or args.compile_all or len(resolutions) < 2
        else f" torch.compile rows at {min(resolutions)} px only (`--compile-all` for all)."
    )  # fmt: skip
    body = "\n".join(
        [
            f"### {device.type.upper()} · torch {torch.__version__} · {args.arch} · "
            f"{'quick' if args.quick else 'full'} run",
            "",
            f"- Machine: {cpu_model()}, {os.cpu_count()} logical CPUs{gpu}; "
            f"torch threads {torch.get_num_threads()} (interop "
            f"{torch.get_num_interop_threads()}), default settings",
            f"- torch {torch.__version__}, Python {platform.python_version()}, timm "
            f"{timm.__version__ if timm else 'not installed (timm row skipped)'}",
            f"- Date (UTC): {started:%Y-%m-%d %H:%M}; run took {elapsed / 60:.1f} min",
            f"- Command: `{command}`",
            f"- Load: {load_line}. Other processes' CPU use during the kept timed rounds "
            "(average cores; a round above "
            f"{args.max_others} is re-run, at most {args.max_redo} per block): "
            + "; ".join(background),
            "- Random weights (seed 0), random images in [-1, 1]; "
            f"{NUM_CLASSES}-class head. Rows are interleaved round by round "
            "(order rotated). torch.compile rows run afterwards in a child process (fresh "
            "inductor cache), interleaved there with eager `fast`: their × fast is against "
            "that, their × official is chained (row/fast there × fast/official here)."
            f"{not_compiled}",
            "",
            "#### Training throughput (forward + loss + backward + SGD step)",
            "",
            "images/s: median over the timed rounds (warm-up excluded) of one step of "
            "`micro × accum` images "
            "(the optimizer step is amortized over `accum` micro-batches, not over 512).",
            mfu_note(args.arch, device, resolutions),
            "",
            training_table(train_results, args.arch, device) if train_results else "(not measured)",
            "",
            "#### Inference",
            "",
            "Speed-ups: official latency / row latency, and row throughput / official "
            "throughput (> 1 is faster). Δp: max abs difference in softmax probabilities "
            "against the official path on the batch-8 input.",
            "",
            inference_table(infer_results) if infer_results else "(not measured)",
        ]
    )
    print(body)
    if args.out:
        write_section(args.out, "engine_speed", section_key(args, device), body)
        log(f"wrote section '{section_key(args, device)}' in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
