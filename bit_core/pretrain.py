"""Upstream pre-training on the one training loop: one process, or data-parallel ranks
under torchrun (DistributedDataParallel; NCCL on GPUs, gloo on CPUs).

Every rank reads a disjoint slice of each global batch, rank 0 writes the checkpoints and
the result, all ranks resume from the same checkpoint (an elastic restart after a failed
rank lands there), and a stop request is agreed collectively so all ranks stop together.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from bit_core import augment
from bit_core.data import StepSampler, iterate_batches
from bit_core.provenance import run_provenance
from bit_core.reproducibility import deterministic_mode
from bit_core.resnetv2 import ResNetV2
from bit_core.shards import ShardSet, shard_batches
from bit_core.train import (
    ProgressCallback,
    RunConfig,
    StopCheck,
    TrainResult,
    soft_cross_entropy,
    train_loop,
)
from bit_core.upstream import UpstreamPlan
from bit_core.upstream_data import UpstreamImages, inception_crop, sigmoid_cross_entropy

# Images are decoded to this multiple of the training resolution before the inception crop
# (256 for 224), so a batch is one tensor; the crop then picks 5%..100% of that square.
PRECROP_RATIO = 8 / 7


def distributed_context() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def device_for(local_rank: int, requested: str) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def init_process_group(device: torch.device) -> None:
    """Join the job's process group (torchrun's c10d rendezvous set the environment).

    Under torchrun the workers share the agent's store across elastic restarts, and it
    still holds the previous attempt's addresses: a restarted rank would dial the dead
    one. Each attempt therefore gets its own key prefix.
    """
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend=backend)
        return
    rank, world, _ = distributed_context()
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False
    )
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    store = dist.PrefixStore(f"bit/attempt{attempt}", agent_store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)


def agreed_stop(local: StopCheck | None, device: torch.device, world: int) -> StopCheck:
    """A stop check that is True on every rank as soon as it is True on any rank."""

    def check() -> bool:
        wanted = bool(local is not None and local())
        if world == 1:
            return wanted
        flag = torch.tensor([1.0 if wanted else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    return check


def pretrain(
    model: ResNetV2,
    data: UpstreamImages | ShardSet,
    plan: UpstreamPlan,
    config: RunConfig | None = None,
    *,
    checkpoint_path: str | Path | None = None,
    on_progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    origin: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Pre-train `model` on `data` with an upstream plan, on this process's share.

    Its randomness comes from `config.seed` (the caller draws the initial weights from it,
    as `pretrain_run` does); with the same seed, data and world size, a CPU (gloo) run ends
    bit-identical to another.

    Args:
        model: a ResNetV2 with `plan.num_classes` outputs (from scratch or a warm start).
        data: the upstream images and their label sets, or tar shards (each rank reads
            its own shards).
        plan: from `bit_core.upstream.upstream_plan`.
        config: seed, device ("auto": this rank's GPU, else CPU), checkpoint cadence.
        checkpoint_path: shared by all ranks; rank 0 writes it, every rank resumes from it.
        on_progress: called on rank 0 only.
        should_stop: polled on every rank; any rank's True stops all of them.
        origin: what the run starts from, for its provenance (`base_model`, `base_sha256`,
            `data`; see `bit_core.provenance.run_provenance`); kept in the checkpoint and
            returned in `TrainResult.provenance`.
    """
    config = config or RunConfig()
    rank, world, local_rank = distributed_context()
    device = device_for(local_rank, config.device)
    if world > 1:
        init_process_group(device)
    if plan.global_batch % world:
        raise ValueError(f"global batch {plan.global_batch} does not split over {world} ranks")
    sampler = StepSampler(
        len(data) if isinstance(data, UpstreamImages) else data.num_examples,
        plan.global_batch,
        config.seed,
    )
    if model.num_classes != len(data.classes):
        raise ValueError(
            f"the head has {model.num_classes} outputs for {len(data.classes)} classes"
        )
    precrop = round(plan.resolution * PRECROP_RATIO)
    loss_fn = sigmoid_cross_entropy if plan.loss == "sigmoid" else soft_cross_entropy

    def raw_batches(steps: range) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        if isinstance(data, ShardSet):
            return shard_batches(
                data,
                rank=rank,
                world=world,
                batch_size=plan.global_batch // world,
                size=precrop,
                steps=steps,
                seed=config.seed,
                device=device,
            )
        targets = (
            data.multi_hot()
            if plan.loss == "sigmoid"
            else F.one_hot(torch.tensor(data.images.labels), len(data.classes)).float()
        )
        return iterate_batches(
            data.images,
            sampler,
            precrop,
            steps,
            num_workers=config.num_workers,
            device=device,
            targets=targets,
            part=(rank, world),
        )

    def batches(steps: range) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for step, pixels, batch_targets in raw_batches(steps):
            rng = augment.step_generator(config.seed * 1000 + rank, step)
            images = inception_crop(
                augment.to_unit_range(pixels), plan.resolution, rng, min_area=plan.crop_min_area
            )
            yield step, images, batch_targets

    wrap: Callable[[torch.nn.Module], Callable[[torch.Tensor], torch.Tensor]] | None = None
    if world > 1:

        def wrap(placed: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
            ids = [local_rank] if device.type == "cuda" else None
            return DistributedDataParallel(placed, device_ids=ids)

    with deterministic_mode(config.deterministic):
        provenance = run_provenance(
            seed=config.seed,
            plan=plan.to_dict(),
            device=device,
            precision=config.precision,
            deterministic=config.deterministic,
            extra={"world": world},
            **dict(origin or {}),
        )
        return train_loop(
            model,
            plan,
            batches,
            loss_fn,
            config,
            checkpoint_path=checkpoint_path,
            checkpoint_meta={
                "sampler": sampler.state_dict(),
                "classes": list(data.classes),
                "world": world,
            },
            on_progress=on_progress if rank == 0 else None,
            should_stop=agreed_stop(should_stop, device, world),
            image_side=plan.resolution,
            wrap=wrap,
            writes_checkpoints=rank == 0,
            provenance=provenance,
        )
