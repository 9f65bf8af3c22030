"""Runs one pre-training job by id: launch the distributed run, supervise it, register
the result as a base model.

The launcher is torchrun (c10d rendezvous, elastic restarts from the last checkpoint) on
this host, or the same torchrun command submitted to Slurm (`sbatch --wait`) across nodes.
Either way the ranks share the run directory: progress, checkpoints and the result flow
through it, so supervision is the same.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.orm import Session

from bit_core import weights
from bit_core.pretrain_run import CANCEL, PROGRESS, RESULT, SPEC, STATE, write_spec
from bit_core.train import RunConfig
from bit_core.upstream import UpstreamPlan
from service.db.artifacts import ArtifactStore
from service.db.models import BaseModelRecord, Job, JobMetric
from service.jobs.lifecycle import finish
from service.settings import Settings
from worker.runner import RunState, run_job

POLL_S = 0.5  # how often the supervisor reads progress and checks for a cancel
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def run_dir_of(store: ArtifactStore, job: Job) -> Path:
    return store.local_dir(f"jobs/{job.id}/pretrain")


def torchrun_command(
    run_dir: Path, *, nnodes: int, nproc_per_node: int, endpoint: str, max_restarts: int
) -> list[str]:
    """The per-node launch command; the same on every node of a multi-node run."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nnodes),
        "--nproc-per-node",
        str(nproc_per_node),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        run_dir.name,
        "--max-restarts",
        str(max_restarts),
        "-m",
        "bit_core.pretrain_run",
        str(run_dir),
    ]


def slurm_script(
    run_dir: Path,
    *,
    nnodes: int,
    nproc_per_node: int,
    max_restarts: int,
    partition: str = "",
    gpus_per_node: int = 0,
) -> str:
    """An sbatch script: one torchrun per node, rendezvous on the first node."""
    command = torchrun_command(
        run_dir,
        nnodes=nnodes,
        nproc_per_node=nproc_per_node,
        endpoint="$MASTER_ADDR:29500",
        max_restarts=max_restarts,
    )
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=bit-pretrain-{run_dir.parent.name}",
        f"#SBATCH --nodes={nnodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={run_dir}/slurm-%j.log",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    lines += [
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_ADDR",
        # Double quotes: the arguments are ours (paths, numbers) and $MASTER_ADDR must expand.
        "srun " + " ".join(f'"{argument}"' for argument in command),
    ]
    return "\n".join(lines) + "\n"


def _die_with_parent() -> None:
    """In the launcher child: get SIGTERM when the supervising worker dies (even kill -9),
    so a redelivered job never finds the old run still going (torchrun then stops its
    ranks)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch(settings: Settings, run_dir: Path, params: dict) -> subprocess.Popen[bytes]:
    nnodes, nproc = int(params["nnodes"]), int(params["nproc_per_node"])
    restarts = int(params.get("max_restarts", 3))
    log = open(run_dir / "launcher.log", "ab")  # noqa: SIM115 (the child keeps it open)
    if settings.pretrain_launcher == "slurm":
        script = run_dir / "job.sbatch"
        script.write_text(
            slurm_script(
                run_dir,
                nnodes=nnodes,
                nproc_per_node=nproc,
                max_restarts=restarts,
                partition=settings.slurm_partition,
                gpus_per_node=nproc if params.get("gpu") else 0,
            )
        )
        command = ["sbatch", "--wait", str(script)]
    else:
        if nnodes != 1:
            raise ValueError(
                f"{nnodes} nodes need a cluster launcher: set BIT_PRETRAIN_LAUNCHER=slurm "
                "(the local launcher runs one node)"
            )
        endpoint = f"127.0.0.1:{_free_port()}"
        command = torchrun_command(
            run_dir, nnodes=1, nproc_per_node=nproc, endpoint=endpoint, max_restarts=restarts
        )
    return subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )


class ProgressTail:
    """Reads new lines of the run's progress file; writes them to the job row."""

    def __init__(self, run_dir: Path) -> None:
        self.path, self.offset = run_dir / PROGRESS, 0
        self.outcome: str | None = None
        self.last_loss: float | None = None

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as handle:
            handle.seek(self.offset)
            text = handle.read()
        complete = text[: text.rfind("\n") + 1]  # a line being written is read next time
        self.offset += len(complete.encode())
        records = [json.loads(line) for line in complete.splitlines() if line.strip()]
        for record in records:
            self.outcome = record.get("outcome", self.outcome)
            self.last_loss = record.get("loss", self.last_loss)
        return [r for r in records if "loss" in r]


def _record(session: Session, job: Job, owner: str, records: list[dict]) -> None:
    if not records:
        return
    last = records[-1]
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.lease_owner == owner)
        .values(
            step=last["step"],
            total_steps=last["total_steps"],
            progress=last["step"] / max(1, last["total_steps"]),
            images_per_s=last["images_per_s"],
            eta_s=last["eta_s"],
        )
    )
    session.add_all(
        JobMetric(
            job_id=job.id,
            step=r["step"],
            loss=r["loss"],
            lr=r["lr"],
            images_per_s=r["images_per_s"],
        )
        for r in records[-20:]  # the curve keeps the latest points of a burst
    )
    session.commit()


def _supervise(
    session: Session,
    settings: Settings,
    store: ArtifactStore,
    job: Job,
    owner: str,
    state: RunState,
    checkpoint: Path,
) -> str:
    run_dir = checkpoint.parent
    if not (run_dir / SPEC).exists():
        params = job.params
        write_spec(
            run_dir,
            arch=params["arch"],
            data=params["data"],
            plan=UpstreamPlan.from_dict(params["plan"]),
            config=RunConfig(**params["config"]),
            init_npz=params.get("init_npz"),
        )
    (run_dir / CANCEL).unlink(missing_ok=True)  # a retried job must not stop at once
    tail = ProgressTail(run_dir)
    tail.offset = (run_dir / PROGRESS).stat().st_size if (run_dir / PROGRESS).exists() else 0
    process = launch(settings, run_dir, job.params)
    try:
        while process.poll() is None:
            _record(session, job, owner, tail.read())
            if state.stop.is_set():
                (run_dir / CANCEL).touch()  # every rank agrees to stop at the next step
            time.sleep(POLL_S)  # supervision interval
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
    _record(session, job, owner, tail.read())
    if state.lease_lost:
        return "lease_lost"
    if tail.outcome == "cancelled" or state.cancelled:
        finish(session, job, "cancelled", owner=owner)
        session.commit()
        return "cancelled"
    if process.returncode != 0 or tail.outcome != "finished":
        log = (run_dir / "launcher.log").read_text(errors="replace")[-4000:]
        raise RuntimeError(f"the distributed run exited with {process.returncode}:\n{log}")
    digests = {p.read_text() for p in run_dir.glob("rank*.sha256")}
    if len(digests) != 1:
        raise RuntimeError("ranks finished with different weights; the run is not trustworthy")
    return _register(session, settings, job, owner, run_dir, tail.last_loss)


def _register(
    session: Session,
    settings: Settings,
    job: Job,
    owner: str,
    run_dir: Path,
    final_loss: float | None,
) -> str:
    name = job.params.get("name") or f"pretrained-job{job.id}"
    entry = weights.import_file(run_dir / RESULT, settings.weights_dir, name=name)
    record = session.query(BaseModelRecord).filter_by(name=name).one_or_none()
    if record is None:
        record = BaseModelRecord(name=name)
        session.add(record)
    record.arch, record.source, record.uri = entry.arch, "pretrain", str(entry.path)
    record.sha256, record.job_id = entry.sha256, job.id
    job.metrics = {"base_model": name, "final_loss": final_loss}
    job.progress = 1.0
    if not finish(session, job, "succeeded", owner=owner):
        session.rollback()
        return "lease_lost"
    session.commit()
    return "succeeded"


def run_pretrain_job(settings: Settings, job_id: int, owner: str) -> str:
    """Run pre-training job `job_id` if it can be claimed (its ranks resume if redelivered)."""
    return run_job(
        settings,
        job_id,
        owner,
        checkpoint_for=lambda store, job: run_dir_of(store, job) / STATE,
        execute=_supervise,
    )
