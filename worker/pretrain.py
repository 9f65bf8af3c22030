"""Runs one pre-training job by id: launch the distributed run, supervise it, register
the result as a base model.

The launcher is torchrun (c10d rendezvous, elastic restarts from the last checkpoint) on
this host, or the same torchrun command submitted to Slurm (`sbatch --parsable --wait`)
across nodes. Either way the ranks share the run directory: progress, checkpoints and the
result flow through it, so supervision is the same.

Each launch rendezvous under its own id and on a free port, so two jobs on one node never
join each other's run. A Slurm job outlives the `sbatch --wait` that watches it, so its id is
kept in the run directory: a cancel, a lost lease, a shutdown or any other way out of
supervision `scancel`s it, and a redelivered job cancels the one an earlier (killed) worker
left behind before it submits again.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from sqlalchemy.orm import Session

from bit_core import weights
from bit_core.pretrain_run import CANCEL, PROGRESS, PROVENANCE, RESULT, SPEC, STATE, write_spec
from bit_core.train import RunConfig
from bit_core.upstream import UpstreamPlan
from service.db.artifacts import ArtifactStore
from service.db.models import BaseModelRecord, Job, JobMetric
from service.jobs.lifecycle import record_progress
from service.settings import Settings
from worker.job_run import (
    RunState,
    cancel_run,
    finish_succeeded,
    run_job,
    stopped_for_shutdown,
)
from worker.metrics import StepTimer
from worker.shutdown import shutdown_requested

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the supervisor reads progress and checks for a cancel
PR_SET_PDEATHSIG = 1  # linux/prctl.h
SLURM_JOB_ID = "slurm_job_id"  # sbatch --parsable's stdout: "id" or "id;cluster"
# Ranks that see the cancel file stop at their next step and checkpoint, and the Slurm job
# ends by itself; a job still pending in the queue never sees the file, so after this long
# it is scancelled (a lost lease is scancelled at once: another run owns the job now).
STOP_GRACE_S = 20.0
# After scancel, Slurm signals the job's processes and kills them KillWait (30 s by
# default) later; an earlier launch's ranks must be gone before new ones share the run dir.
SLURM_GONE_TIMEOUT_S = 120.0
# Every state but these holds nodes or may still start; squeue lists only these.
SLURM_ACTIVE_STATES = "PENDING,CONFIGURING,RUNNING,SUSPENDED,COMPLETING,STOPPED,RESIZING"


def run_dir_of(store: ArtifactStore, job: Job) -> Path:
    return store.local_dir(f"jobs/{job.id}/pretrain")


def rendezvous_id(job: Job) -> str:
    """Unique per launch: a redelivered job's new ranks never join its old ones, nor two
    jobs each other's (the attempt is counted before the launch)."""
    return f"bit-job{job.id}-a{job.attempts}"


def torchrun_command(
    run_dir: Path,
    *,
    nnodes: int,
    nproc_per_node: int,
    endpoint: str,
    rdzv_id: str,
    max_restarts: int,
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
        rdzv_id,
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
    rdzv_id: str,
    max_restarts: int,
    partition: str = "",
    gpus_per_node: int = 0,
) -> str:
    """An sbatch script: one torchrun per node, rendezvous on a free port of the first node
    (the batch script runs there, so it picks the port)."""
    command = torchrun_command(
        run_dir,
        nnodes=nnodes,
        nproc_per_node=nproc_per_node,
        endpoint="$MASTER_ADDR:$MASTER_PORT",
        rdzv_id=rdzv_id,
        max_restarts=max_restarts,
    )
    pick_port = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
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
        # Released before torchrun binds it: a race, but not with a fixed port every job shares.
        f'MASTER_PORT=$("{sys.executable}" -c "{pick_port}")',
        "export MASTER_ADDR MASTER_PORT",
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


def launch(
    settings: Settings, run_dir: Path, params: dict, *, rdzv_id: str
) -> subprocess.Popen[bytes]:
    nnodes, nproc = int(params["nnodes"]), int(params["nproc_per_node"])
    restarts = int(params.get("max_restarts", 3))
    with ExitStack() as files:  # the child has its own copies of these descriptors
        launcher_log = files.enter_context(open(run_dir / "launcher.log", "ab"))
        stdout = launcher_log
        if settings.pretrain_launcher == "slurm":
            earlier = slurm_job_id(run_dir)
            if earlier is not None:  # a killed worker's sbatch died with it; its job did not
                scancel(earlier)
                _wait_until_gone(earlier)
            script = run_dir / "job.sbatch"
            script.write_text(
                slurm_script(
                    run_dir,
                    nnodes=nnodes,
                    nproc_per_node=nproc,
                    rdzv_id=rdzv_id,
                    max_restarts=restarts,
                    partition=settings.slurm_partition,
                    gpus_per_node=nproc if params.get("gpu") else 0,
                )
            )
            command = ["sbatch", "--parsable", "--wait", str(script)]
            # --parsable prints the id as soon as the job is queued: straight into the run
            # dir, so even a worker killed the next moment leaves it to the next launch.
            stdout = files.enter_context(open(run_dir / SLURM_JOB_ID, "wb"))
        else:
            if nnodes != 1:
                raise ValueError(
                    f"{nnodes} nodes need a cluster launcher: set BIT_PRETRAIN_LAUNCHER=slurm "
                    "(the local launcher runs one node)"
                )
            endpoint = f"127.0.0.1:{_free_port()}"
            command = torchrun_command(
                run_dir,
                nnodes=1,
                nproc_per_node=nproc,
                endpoint=endpoint,
                rdzv_id=rdzv_id,
                max_restarts=restarts,
            )
        return subprocess.Popen(
            command,
            stdout=stdout,
            stderr=launcher_log,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def slurm_job_id(run_dir: Path) -> str | None:
    """The Slurm job of this run dir's latest launch ("id" or "id;cluster"), once sbatch
    has printed it."""
    path = run_dir / SLURM_JOB_ID
    lines = path.read_text().split() if path.exists() else []
    return lines[0] if lines else None


def _slurm_target(job_id: str) -> tuple[str, list[str]]:
    """("123", ["--clusters=gpu"]) for sbatch's "123;gpu" (a federation names the cluster)."""
    number, _, cluster = job_id.partition(";")
    return number, [f"--clusters={cluster}"] if cluster else []


def scancel(job_id: str) -> None:
    """Cancel Slurm job `job_id`; one that already ended is no error. A failure is logged,
    not raised: it must not hide why the run stopped."""
    number, clusters = _slurm_target(job_id)
    try:
        done = subprocess.run(
            ["scancel", *clusters, number], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("scancel %s failed (%s); cancel the Slurm job by hand", job_id, exc)
        return
    if done.returncode != 0:
        log.warning("scancel %s exited %s: %s", job_id, done.returncode, done.stderr.strip())


def _wait_until_gone(job_id: str) -> None:
    """Until squeue no longer lists `job_id` as active (its processes are gone)."""
    number, clusters = _slurm_target(job_id)
    command = ["squeue", "--noheader", f"--states={SLURM_ACTIVE_STATES}", "--format=%T"]
    command += [*clusters, f"--jobs={number}"]
    deadline = time.monotonic() + SLURM_GONE_TIMEOUT_S
    while time.monotonic() < deadline:
        listed = subprocess.run(command, capture_output=True, text=True, timeout=60)
        # With --clusters squeue heads its answer with "CLUSTER: name".
        rows = [r for r in listed.stdout.splitlines() if r.strip() and ":" not in r]
        if (listed.returncode == 0 and not rows) or "Invalid job id" in listed.stderr:
            return  # ended, or ended so long ago that Slurm forgot it
        time.sleep(POLL_S)  # polling interval, bounded by the deadline
    raise RuntimeError(
        f"Slurm job {job_id} of an earlier launch of this job is still active "
        f"{SLURM_GONE_TIMEOUT_S:.0f}s after scancel, and new ranks must not share its run "
        f"directory: check it with squeue, end it, then retry the job"
    )


class ProgressTail:
    """Reads new lines of the run's progress file; writes them to the job row, and times
    the steps (rank 0 stamps each line with its wall time)."""

    def __init__(self, run_dir: Path) -> None:
        self.path, self.offset = run_dir / PROGRESS, 0
        self.outcome: str | None = None
        self.last_loss: float | None = None
        self.steps = StepTimer("pretrain")

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
            if "loss" in record:
                self.steps.note(record["step"], record["time"])
        return [r for r in records if "loss" in r]


def _record(session: Session, job: Job, owner: str, records: list[dict]) -> None:
    if not records:
        return
    last = records[-1]
    record_progress(
        session,
        job,
        owner,
        step=last["step"],
        total_steps=last["total_steps"],
        progress=last["step"] / max(1, last["total_steps"]),
        images_per_s=last["images_per_s"],
        eta_s=last["eta_s"],
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
    slurm = settings.pretrain_launcher == "slurm"
    process = launch(settings, run_dir, job.params, rdzv_id=rendezvous_id(job))
    stopping_since: float | None = None
    scancelled = False
    try:
        while process.poll() is None:
            _record(session, job, owner, tail.read())
            if state.should_stop():
                (run_dir / CANCEL).touch()  # every rank agrees to stop at the next step
                if stopping_since is None:
                    stopping_since = time.monotonic()
                overdue = state.lease_lost or time.monotonic() - stopping_since >= STOP_GRACE_S
                if slurm and overdue and not scancelled:
                    scancelled = _scancel_launched(run_dir)  # False until sbatch printed it
            time.sleep(POLL_S)  # supervision interval
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
        if slurm and process.returncode != 0 and not scancelled:
            # An sbatch --wait that did not see its job succeed (killed, or it lost the
            # controller) leaves a job that may run on without anyone supervising it.
            _scancel_launched(run_dir)
    _record(session, job, owner, tail.read())
    if state.lease_lost:
        return "lease_lost"
    if tail.outcome != "finished" and not state.cancelled and shutdown_requested():
        return stopped_for_shutdown(session, settings, job, owner)  # it resumes elsewhere
    if tail.outcome == "cancelled" or state.cancelled:  # the ranks' outcome, not a status
        return cancel_run(session, job, owner)
    if process.returncode != 0 or tail.outcome != "finished":
        output = (run_dir / "launcher.log").read_text(errors="replace")[-4000:]
        raise RuntimeError(f"the distributed run exited with {process.returncode}:\n{output}")
    digests = {p.read_text() for p in run_dir.glob("rank*.sha256")}
    if len(digests) != 1:
        raise RuntimeError("ranks finished with different weights; the run is not trustworthy")
    return _register(session, settings, job, owner, run_dir, tail.last_loss)


def _scancel_launched(run_dir: Path) -> bool:
    job_id = slurm_job_id(run_dir)
    if job_id is not None:
        scancel(job_id)
    return job_id is not None


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
    metrics = {"base_model": name, "final_loss": final_loss}
    if (run_dir / PROVENANCE).exists():  # what made the base: seed, plan, data, versions
        metrics["provenance"] = json.loads((run_dir / PROVENANCE).read_text())
    job.metrics = metrics
    job.progress = 1.0
    return finish_succeeded(session, job, owner)


def run_pretrain_job(settings: Settings, job_id: int, owner: str) -> str:
    """Run pre-training job `job_id` if it can be claimed (its ranks resume if redelivered)."""
    return run_job(
        settings,
        job_id,
        owner,
        checkpoint_for=lambda store, job: run_dir_of(store, job) / STATE,
        execute=_supervise,
    )
