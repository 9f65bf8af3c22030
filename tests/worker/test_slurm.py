"""Pre-training on Slurm, under fake sbatch/srun/scancel/squeue/scontrol (no cluster, no
training): a cancel, a lost lease and a shutdown scancel the cluster job; a redelivered job
scancels the one its killed worker left; every launch rendezvous under its own id and port."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import worker.pretrain
import worker.shutdown
from bit_core.upstream import upstream_plan
from service.db.artifacts import store_for
from service.db.models import Job
from service.db.session import session_scope
from service.settings import Settings
from tests.polling import wait_for
from tests.worker.conftest import job_row
from worker.pretrain import SLURM_JOB_ID, run_dir_of, run_pretrain_job

COMMANDS = Path(__file__).parent / "fake_slurm" / "commands.py"


@dataclass
class FakeSlurm:
    root: Path

    def calls(self, command: str | None = None) -> list[dict[str, Any]]:
        log = self.root / "calls.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        entries = [json.loads(line) for line in lines]
        return [e for e in entries if command is None or e["cmd"] == command]

    def steps(self, count: int = 1) -> list[dict[str, Any]]:
        """Wait until `count` job steps (srun) run: the jobs are running on the 'cluster'."""
        return wait_for(lambda: len(self.calls("srun")) >= count and self.calls("srun"), 15, "srun")

    def queued_job(self) -> str:
        """A job left running on the cluster by a worker that no longer watches it."""
        (self.root / "jobs" / "999").mkdir(parents=True)
        return "999"


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSlurm:
    bin_dir, root = tmp_path / "fake-bin", tmp_path / "fake-slurm"
    bin_dir.mkdir()
    root.mkdir()
    for name in ("sbatch", "srun", "scancel", "squeue", "scontrol"):
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{COMMANDS}" {name} "$@"\n')
        wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(root))
    return FakeSlurm(root)


@pytest.fixture
def slurm_settings(
    sqlite_settings: Settings, fake_slurm: FakeSlurm, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    monkeypatch.setattr(worker.pretrain, "POLL_S", 0.05)
    monkeypatch.setattr(worker.pretrain, "STOP_GRACE_S", 0.0)  # the fake job never stops itself
    monkeypatch.setattr(worker.shutdown, "_requested", threading.Event())  # no shutdown yet
    return sqlite_settings.model_copy(update={"pretrain_launcher": "slurm", "heartbeat_s": 0.1})


def make_pretrain_job(settings: Settings) -> int:
    plan = upstream_plan(48, 3, total_steps=10, global_batch=8)
    with session_scope(settings.database_url) as session:
        job = Job(
            tenant="acme",
            kind="pretrain",
            status="queued",
            base_model="R14x0.5",
            mode="pretrain",
            total_steps=plan.total_steps,
            params={
                "arch": "R14x0.5",
                "data": str(settings.home / "never-read"),
                "plan": plan.to_dict(),
                "nnodes": 2,
                "nproc_per_node": 1,
                "max_restarts": 0,
                "name": None,
                "config": {"seed": 0, "device": "cpu", "checkpoint_every": 5},
            },
        )
        session.add(job)
        session.flush()
        return job.id


def update_job(settings: Settings, job_id: int, **values: Any) -> None:
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        for name, value in values.items():
            setattr(job, name, value)


@dataclass
class Run:
    thread: threading.Thread
    outcome: list[str]

    def result(self) -> list[str]:
        self.thread.join(timeout=20)
        return self.outcome


def start(settings: Settings, job_id: int, owner: str = "w1") -> Run:
    outcome: list[str] = []
    thread = threading.Thread(
        target=lambda: outcome.append(run_pretrain_job(settings, job_id, owner)), daemon=True
    )
    thread.start()
    return Run(thread, outcome)


@pytest.fixture
def run_cleanup(fake_slurm: FakeSlurm) -> Iterator[None]:
    yield
    for entry in fake_slurm.calls("sbatch"):  # a failed test leaves no fake job running
        (fake_slurm.root / "jobs" / entry["job_id"] / "cancelled").touch()


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.usefixtures("run_cleanup")
def test_a_cancel_scancels_the_slurm_job(slurm_settings: Settings, fake_slurm: FakeSlurm):
    job_id = make_pretrain_job(slurm_settings)
    run = start(slurm_settings, job_id)
    (step,) = fake_slurm.steps()
    update_job(slurm_settings, job_id, cancel_requested=True, status="cancelling")
    assert run.result() == ["cancelled"]
    assert [c["argv"] for c in fake_slurm.calls("scancel")] == [[step["job_id"]]]
    (submitted,) = fake_slurm.calls("sbatch")
    assert submitted["argv"][:2] == ["--parsable", "--wait"]
    assert not alive(submitted["pid"]) and not alive(step["pid"])
    assert job_row(slurm_settings, job_id).status == "cancelled"


@pytest.mark.usefixtures("run_cleanup")
def test_a_lost_lease_scancels_the_slurm_job(
    slurm_settings: Settings, fake_slurm: FakeSlurm, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("FAKE_SLURM_CLUSTER", "gpu")  # sbatch prints "id;gpu"
    job_id = make_pretrain_job(slurm_settings)
    run = start(slurm_settings, job_id)
    (step,) = fake_slurm.steps()
    update_job(slurm_settings, job_id, lease_owner="w2")  # the reconciler gave it away
    assert run.result() == ["lease_lost"]
    assert [c["argv"] for c in fake_slurm.calls("scancel")] == [["--clusters=gpu", step["job_id"]]]
    job = job_row(slurm_settings, job_id)
    assert job.status == "running" and job.lease_owner == "w2"  # left to the new owner


@pytest.mark.usefixtures("run_cleanup")
def test_a_shutdown_scancels_and_requeues(slurm_settings: Settings, fake_slurm: FakeSlurm):
    job_id = make_pretrain_job(slurm_settings)
    run = start(slurm_settings, job_id)
    (step,) = fake_slurm.steps()
    worker.shutdown.request_shutdown()
    assert run.result() == ["requeued"]
    assert [c["argv"] for c in fake_slurm.calls("scancel")] == [[step["job_id"]]]
    job = job_row(slurm_settings, job_id)
    assert job.status == "queued" and job.lease_owner is None


@pytest.mark.usefixtures("run_cleanup")
def test_a_redelivered_job_scancels_the_earlier_slurm_job_first(
    slurm_settings: Settings, fake_slurm: FakeSlurm
):
    job_id = make_pretrain_job(slurm_settings)
    run_dir = run_dir_of(store_for(slurm_settings), job_row(slurm_settings, job_id))
    earlier = fake_slurm.queued_job()
    (run_dir / SLURM_JOB_ID).write_text(f"{earlier}\n")  # as the killed worker's sbatch left it
    run = start(slurm_settings, job_id)
    (step,) = fake_slurm.steps()
    order = [(c["cmd"], c["argv"]) for c in fake_slurm.calls() if c["cmd"] != "scontrol"]
    assert order[0] == ("scancel", [earlier])
    assert order[1] == ("squeue", order[1][1]) and f"--jobs={earlier}" in order[1][1]
    assert order[2][0] == "sbatch" and step["job_id"] != earlier
    assert (run_dir / SLURM_JOB_ID).read_text().strip() == step["job_id"]
    update_job(slurm_settings, job_id, cancel_requested=True, status="cancelling")
    assert run.result() == ["cancelled"]


@pytest.mark.usefixtures("run_cleanup")
def test_two_jobs_rendezvous_apart_on_free_ports(slurm_settings: Settings, fake_slurm: FakeSlurm):
    jobs = [make_pretrain_job(slurm_settings) for _ in range(2)]
    runs = [start(slurm_settings, job_id) for job_id in jobs]
    steps = fake_slurm.steps(2)
    rdzv_ids = {option(step["argv"], "--rdzv-id") for step in steps}
    assert rdzv_ids == {f"bit-job{job_id}-a1" for job_id in jobs}  # all nodes share one
    for step in steps:
        host, port = option(step["argv"], "--rdzv-endpoint").rsplit(":", 1)
        assert host == "node-a" and port.isdigit() and int(port) != 29500
        with socket.socket() as probe:
            probe.bind(("", int(port)))  # free on the node the script ran on
    for job_id in jobs:
        update_job(slurm_settings, job_id, cancel_requested=True, status="cancelling")
    assert [run.result() for run in runs] == [["cancelled"], ["cancelled"]]
