"""The per-rank program of a pre-training run, launched by torchrun:

    torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
        -m bit_core.pretrain_run RUN_DIR

RUN_DIR holds `spec.json` (written by `write_spec`). Rank 0 appends progress to
`progress.jsonl`, checkpoints to `state.safetensors`, and finally writes the base model as
an official-format `model.npz`, with what made it in `provenance.json` (the .npz layout has
no room for it). A file named `cancel` in RUN_DIR stops every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bit_core.checkpoint import sha256_file
from bit_core.npz import load_bit_npz, save_bit_npz
from bit_core.pretrain import distributed_context, pretrain
from bit_core.registry import create_model
from bit_core.reproducibility import weights_generator
from bit_core.shards import ShardSet
from bit_core.train import Progress, RunConfig
from bit_core.upstream import UpstreamPlan
from bit_core.upstream_data import UpstreamImages

SPEC, PROGRESS, STATE, RESULT, CANCEL, PROVENANCE = (
    "spec.json",
    "progress.jsonl",
    "state.safetensors",
    "model.npz",
    "cancel",
    "provenance.json",
)


def write_spec(
    run_dir: Path,
    *,
    arch: str,
    data: str,
    plan: UpstreamPlan,
    config: RunConfig,
    init_npz: str | None = None,
) -> Path:
    """Describe a run for `pretrain_run`; `data` is an ImageFolder or a .csv/.jsonl manifest."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "arch": arch,
        "data": data,
        "plan": plan.to_dict(),
        "config": asdict(config),
        "init_npz": init_npz,
    }
    (run_dir / SPEC).write_text(json.dumps(spec, indent=2))
    return run_dir / SPEC


def load_data(source: str) -> UpstreamImages | ShardSet:
    """A manifest file, a folder of tar shards, or an ImageFolder."""
    path = Path(source)
    if path.is_file():
        return UpstreamImages.from_manifest(path)
    if any(path.glob("*.tar")):
        return ShardSet.from_dir(path)
    return UpstreamImages.from_folder(path)


def append_progress(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / PROGRESS, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter: equal on all ranks iff data parallelism kept them in sync."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(run_dir: Path) -> int:
    spec = json.loads((run_dir / SPEC).read_text())
    rank, world, _ = distributed_context()
    # The supervisor finds each rank's process here (e.g. to report or stop a single rank).
    (run_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    plan = UpstreamPlan.from_dict(spec["plan"])
    config = RunConfig(**spec["config"])
    data = load_data(spec["data"])
    # Every rank draws the same weights from the seed (data parallelism also broadcasts
    # rank 0's), so a run from scratch repeats; a warm start then loads all but the head.
    model = create_model(spec["arch"], len(data.classes), generator=weights_generator(config.seed))
    init_npz = spec.get("init_npz")
    if init_npz:
        load_bit_npz(model, init_npz, load_head=False)
    origin = {
        "base_model": Path(init_npz).stem if init_npz else None,
        "base_sha256": sha256_file(init_npz) if init_npz else None,
        "data": spec["data"],
    }

    def on_progress(progress: Progress) -> None:
        append_progress(run_dir, {"time": time.time(), "world": world, **asdict(progress)})

    result = pretrain(
        model,
        data,
        plan,
        config,
        checkpoint_path=run_dir / STATE,
        on_progress=on_progress,
        should_stop=(run_dir / CANCEL).exists,
        origin=origin,
    )
    (run_dir / f"rank{rank}.sha256").write_text(weights_digest(model))
    if rank == 0:
        outcome = "cancelled" if result.cancelled else "finished"
        if not result.cancelled:
            save_bit_npz(model.cpu(), run_dir / RESULT)
            provenance = {**(result.provenance or {}), "npz_sha256": sha256_file(run_dir / RESULT)}
            (run_dir / PROVENANCE).write_text(json.dumps(provenance, indent=2))
        append_progress(
            run_dir, {"time": time.time(), "outcome": outcome, "step": result.steps_done}
        )
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
