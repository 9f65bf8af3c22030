"""Faults at random (seeded) moments against a live API and real Celery workers.

After every fault: each job ends succeeded, failed or cancelled exactly once, no job ran
twice at once, every model file's sha256 matches its row, every checkpoint is whole, and
the artifact store keeps no file that no row references (tests/reliability/harness.py).
Builds on tests/e2e (LiveService, and test_faults' kill -9 and Redis-restart cases, which
this does not repeat: here the faults land at chosen moments, several times each).
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from service.db.models import Job
from service.jobs.lifecycle import TERMINAL
from tests.e2e.conftest import service_env
from tests.e2e.live import LiveService, wait_for
from tests.e2e.test_faults import submit
from tests.reliability import figures
from tests.reliability.harness import (
    FileGate,
    check_invariants,
    job_row,
    kill_pid,
    runner_pid,
    wait_no_orphans,
)
from tests.service.conftest import POSTGRES_ADMIN_URL, REDIS_URL

pytestmark = [pytest.mark.slow, pytest.mark.services]

# Small enough for 2 shared cores, long enough to be killed several times (a step is a
# few tenths of a second); a checkpoint every 4 steps.
PLAN = {"batch_size": 16, "total_steps": 24, "base_lr": 0.01, "precrop": 40, "crop": 32}
CHECKPOINT_EVERY = 4
KILLS = 2  # per test: each at its own random moment of the same kind
TERMINAL_STATUSES = tuple(TERMINAL)


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh database on the shared PostgreSQL, so the invariants see this test's rows."""
    name = f"bit_rel_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def fault_env(home: Path, database_url: str, **extra: str) -> dict[str, str]:
    return service_env(
        home,
        BIT_DATABASE_URL=database_url,
        BIT_BROKER_URL=REDIS_URL,
        BIT_BROKER_KEY_PREFIX=f"bit-rel-{uuid.uuid4().hex[:8]}:",
        BIT_CHECKPOINT_EVERY=str(CHECKPOINT_EVERY),
        BIT_LEASE_S="3",
        BIT_MAX_ATTEMPTS="10",
        BIT_ORPHAN_GRACE_S="3",
        BIT_ORPHAN_SWEEP_EVERY_S="1",
        BIT_RATE_LIMIT_PER_MINUTE="0",
        **extra,
    )


def finish_and_check(
    live: LiveService, client: Any, database_url: str, jobs: dict[int, int], timeout: float
) -> None:
    """Wait for `jobs` (id -> total steps) to succeed, then check every invariant."""
    for job_id, steps in jobs.items():
        done = live.wait_job(client, job_id, TERMINAL_STATUSES, timeout=timeout)
        assert done["status"] == "succeeded", done
        assert done["step"] == steps  # the same step count as one uninterrupted run
    artifacts = live.home / "artifacts"
    check_invariants(database_url, artifacts, total_steps=jobs)
    wait_no_orphans(database_url, artifacts, timeout=60)


# --- kill -9 of the worker running a job --------------------------------------------------


def kill_during_training(
    live: LiveService, database_url: str, job_id: int, rng: random.Random, after: int
) -> int:
    """kill -9 at a random step between checkpoints, past step `after`; returns the step."""
    candidates = [s for s in range(after + 1, PLAN["total_steps"] - 2) if s % CHECKPOINT_EVERY]
    target = rng.choice(candidates[:6])

    def reached() -> bool:
        job = job_row(database_url, job_id)
        return bool(job and job.lease_owner and job.step >= target)

    wait_for(reached, 240, f"job {job_id} to reach step {target}")
    kill_pid(live, runner_pid(database_url, job_id))
    job = job_row(database_url, job_id)
    assert job is not None and job.status == "running" and job.step < PLAN["total_steps"]
    return job.step


def kill_at_open(live: LiveService, gate: FileGate, match: Callable[[str], bool], what: str) -> str:
    """kill -9 the worker the moment it opens a file that `match`es; returns the path."""
    killed: list[int] = []

    def kill(pid: int, _: str) -> None:  # the opener is held inside open() meanwhile
        os.killpg(pid, signal.SIGKILL)
        killed.append(pid)

    gate.arm(match, kill)
    path = gate.wait_hit(300, what)
    kill_pid(live, killed[0])
    return path


def kill_during_checkpoint(
    live: LiveService, database_url: str, job_id: int, gate: FileGate, rng: random.Random
) -> None:
    """kill -9 as the worker starts writing a checkpoint (its temporary file created)."""
    nth = rng.randint(1, 2)  # the first or the second checkpoint of this run
    seen = itertools.count(1)

    def match(path: str) -> bool:
        return ".state.safetensors." in path and path.endswith(".partial") and next(seen) == nth

    path = kill_at_open(live, gate, match, f"checkpoint {nth} of job {job_id}'s run")
    job = job_row(database_url, job_id)
    assert job is not None and job.status == "running"
    assert Path(path).stat().st_size == 0  # killed with its temporary file just created


REGISTRATION_MOMENTS = {
    # (what the worker opens, when): the model files being written, then the weights read
    # back for their sha256 just before the model row is inserted.
    "weights written": lambda p: "/model/.weights.safetensors." in p and p.endswith(".partial"),
    "metadata written": lambda p: "/model/.model.json." in p and p.endswith(".partial"),
    "row inserted": lambda p: p.endswith("/model/weights.safetensors"),
}


def kill_during_registration(
    live: LiveService, database_url: str, job_id: int, gate: FileGate, rng: random.Random
) -> str:
    """kill -9 while the finished run saves and registers its model."""
    moment = rng.choice(sorted(REGISTRATION_MOMENTS))
    kill_at_open(live, gate, REGISTRATION_MOMENTS[moment], f"the model's registration ({moment})")
    job = job_row(database_url, job_id)
    assert job is not None and job.status == "running" and job.model_id is None, moment
    return moment


@pytest.mark.parametrize("moment", ["training", "checkpoint", "registration"])
def test_worker_killed_at_random_moments_resumes(moment: str, tmp_path: Path, database: str):
    rng = random.Random(f"kill-9-{moment}")
    live = LiveService(tmp_path, fault_env(tmp_path, database)).start()
    gate = FileGate()
    try:
        live.start_worker()
        live.start_worker()  # a spare, idle: it takes the job over once the lease runs out
        with live.client() as client:
            job_id = submit(client, PLAN, seed=rng.randint(0, 99))["id"]
            folder = live.home / "artifacts" / "jobs" / str(job_id)
            wait_for(lambda: (folder / "model").is_dir(), 240, f"job {job_id} to start")
            gate.watch(folder)
            gate.watch(folder / "model")
            owners, step = [], 1
            for _ in range(KILLS):
                owners.append((job_row(database, job_id) or Job()).lease_owner)
                if moment == "training":
                    step = kill_during_training(live, database, job_id, rng, step)
                elif moment == "checkpoint":
                    kill_during_checkpoint(live, database, job_id, gate, rng)
                else:
                    kill_during_registration(live, database, job_id, gate, rng)
                figures.add("faults injected")
                live.start_worker()  # back to two workers
            finish_and_check(live, client, database, {job_id: PLAN["total_steps"]}, 300)
            events = client.get(f"/v1/jobs/{job_id}").json()["events"]
        runs = [e for e in events if e["kind"] in ("started", "resumed")]
        assert [r["kind"] for r in runs] == ["started"] + ["resumed"] * KILLS, events
        figures.add("faults survived", KILLS)
    finally:
        gate.close()
        live.stop()
