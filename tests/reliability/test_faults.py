"""Faults at random (seeded) moments against a live API and real Celery workers.

After every fault: each job ends succeeded, failed or cancelled exactly once, no job ran
twice at once, every model file's sha256 matches its row, every checkpoint is whole, and
the artifact store keeps no file that no row references (tests/reliability/harness.py).
Builds on tests/e2e (LiveService, and test_faults' kill -9 and Redis-restart cases, which
this does not repeat: here the faults land at chosen moments, several times each).
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import signal
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.db.models import Job
from service.jobs.lifecycle import TERMINAL
from tests.e2e.conftest import service_env
from tests.e2e.live import LiveService, labeled_uploads, start_redis
from tests.e2e.test_faults import submit
from tests.polling import free_port, wait_for
from tests.reliability import figures
from tests.reliability.harness import (  # noqa: F401 (fresh_database: a fixture)
    FileGate,
    PostgresCluster,
    check_invariants,
    fresh_database,
    job_row,
    kill_pid,
    orphan_files,
    remount,
    runner_pid,
    small_filesystem,
    wait_no_orphans,
)
from tests.service.conftest import REDIS_URL

pytestmark = [pytest.mark.slow, pytest.mark.services]

# Small enough for 2 shared cores, long enough to be killed several times (a step is a
# few tenths of a second); a checkpoint every 4 steps.
PLAN = {"batch_size": 16, "total_steps": 24, "base_lr": 0.01, "precrop": 40, "crop": 32}
CHECKPOINT_EVERY = 4
KILLS = 2  # per test: each at its own random moment of the same kind
TERMINAL_STATUSES = tuple(TERMINAL)


def fault_env(home: Path, database_url: str, **extra: str) -> dict[str, str]:
    settings = {
        "BIT_DATABASE_URL": database_url,
        "BIT_BROKER_URL": REDIS_URL,
        "BIT_BROKER_KEY_PREFIX": f"bit-rel-{uuid.uuid4().hex[:8]}:",
        "BIT_CHECKPOINT_EVERY": str(CHECKPOINT_EVERY),
        "BIT_LEASE_S": "3",
        "BIT_MAX_ATTEMPTS": "10",
        "BIT_ORPHAN_GRACE_S": "3",  # the sweeper removes what a kill left after 3 s
        "BIT_ORPHAN_SWEEP_EVERY_S": "1",
        "BIT_RATE_LIMIT_PER_MINUTE": "0",
    }
    return service_env(home, **{**settings, **extra})


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


def test_job_killed_every_attempt_fails_once_with_a_clear_error(tmp_path: Path, database: str):
    env = fault_env(tmp_path, database, BIT_MAX_ATTEMPTS="1")
    live = LiveService(tmp_path, env).start()
    try:
        live.start_worker()
        with live.client() as client:
            job_id = submit(client, PLAN)["id"]
            step = kill_during_training(live, database, job_id, random.Random("poison"), 1)
            figures.add("faults injected")
            live.start_worker()
            done = live.wait_job(client, job_id, TERMINAL_STATUSES, timeout=120)
        assert done["status"] == "failed" and done["error_code"] == "too_many_attempts", done
        assert f"at step {step}" in done["error"] and "retry" in done["error"]
        check_invariants(database, live.home / "artifacts")
        figures.add("faults survived")
    finally:
        live.stop()


# --- PostgreSQL and Redis restarted -----------------------------------------------------------


def api_error(response: httpx.Response) -> str:
    return str(response.json().get("error", {}).get("code"))


def test_postgres_restarted_api_answers_503_then_recovers(tmp_path: Path):
    rng = random.Random("postgres-restart")
    cluster = PostgresCluster(free_port())
    cluster.start()
    try:
        live = LiveService(tmp_path, fault_env(tmp_path, cluster.url)).start()
        try:
            live.start_worker()
            live.start_worker()
            with live.client() as client:
                job_id = submit(client, PLAN, seed=rng.randint(0, 99))["id"]
                # A blip shorter than half the lease, then an outage longer than the lease:
                # the run fences itself and another worker resumes it once the lease is out.
                for outage_s, after in ((rng.uniform(0.5, 1.2), 3), (rng.uniform(4, 6), 12)):
                    wait_for(
                        lambda a=after: client.get(f"/v1/jobs/{job_id}").json()["step"] >= a,
                        240,
                        f"job {job_id} to pass step {after}",
                    )
                    cluster.stop()
                    figures.add("faults injected")
                    refused = answer_503_while_down(client, job_id, outage_s)
                    cluster.start()
                    wait_for(live._ready, 60, "the API to be ready again")
                    assert refused >= 1
                    figures.add("faults survived")
                # Requests and new jobs work again.
                second = submit(client, PLAN, seed=rng.randint(100, 199))["id"]
                steps = {job_id: PLAN["total_steps"], second: PLAN["total_steps"]}
                finish_and_check(live, client, cluster.url, steps, 300)
                kinds = [e["kind"] for e in client.get(f"/v1/jobs/{job_id}").json()["events"]]
                assert "requeued" in kinds and "resumed" in kinds, kinds  # fenced, resumed
        finally:
            live.stop()
    finally:
        cluster.destroy()


def answer_503_while_down(client: httpx.Client, job_id: int, outage_s: float) -> int:
    """For `outage_s` seconds, every request needing the database answers 503
    `database_unavailable` (Retry-After set); returns how many were checked."""
    files, labels = labeled_uploads(per_class=2, seed=7)
    checked = 0
    deadline = time.monotonic() + outage_s
    while time.monotonic() < deadline:
        for response in (
            client.get(f"/v1/jobs/{job_id}"),
            client.post("/v1/datasets", files=files, data={"labels": labels}),
        ):
            assert response.status_code == 503, response.text
            assert api_error(response) == "database_unavailable", response.text
            assert response.headers["retry-after"]
            checked += 1
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"
    return checked


def test_redis_restarted_while_jobs_run_and_wait(tmp_path: Path, database: str):
    rng = random.Random("redis-restart")
    redis_port = free_port()
    redis = start_redis(tmp_path, redis_port)
    env = fault_env(
        tmp_path,
        database,
        BIT_BROKER_URL=f"redis://127.0.0.1:{redis_port}/0",
        BIT_QUEUED_GRACE_S="2",
    )
    live = LiveService(tmp_path, env).start()
    try:
        live.start_worker()
        with live.client() as client:
            jobs = [submit(client, PLAN, seed=rng.randint(0, 99))["id"] for _ in range(2)]
            for after in sorted(rng.sample(range(2, PLAN["total_steps"] - 4), 2)):
                wait_for(
                    lambda a=after: any(
                        client.get(f"/v1/jobs/{j}").json()["step"] >= a for j in jobs
                    ),
                    240,
                    f"a job to pass step {after}",
                )
                redis.kill()  # SIGKILL, no persistence: queued and unacked messages are gone
                redis.wait(timeout=10)
                figures.add("faults injected")
                # The API keeps serving what needs no broker, and takes jobs meanwhile.
                assert client.get(f"/v1/jobs/{jobs[0]}").status_code == 200
                assert client.get("/readyz").json()["checks"]["broker"] != "ok"
                jobs.append(submit(client, PLAN, seed=rng.randint(100, 199))["id"])
                redis = start_redis(tmp_path, redis_port)
                figures.add("faults survived")
            finish_and_check(live, client, database, dict.fromkeys(jobs, PLAN["total_steps"]), 400)
    finally:
        live.stop()
        redis.kill()


# --- the API killed during uploads -----------------------------------------------------------


def upload(client: httpx.Client, seed: int) -> int | None:
    """POST one dataset of 12 images; its id, or None if the API died meanwhile."""
    files, labels = labeled_uploads(per_class=4, seed=seed)
    try:
        response = client.post("/v1/datasets", files=files, data={"labels": labels})
    except httpx.TransportError:
        return None
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def test_api_killed_during_uploads_keeps_no_half_upload(tmp_path: Path, database: str):
    rng = random.Random("api-kill-uploads")
    artifacts = tmp_path / "artifacts"
    with small_filesystem(artifacts, 256 * 1024**2):
        live = LiveService(tmp_path, fault_env(tmp_path, database)).start()
        gate = FileGate()
        try:
            live.start_worker()  # its reconciler sweeps what the killed uploads left
            gate.watch(artifacts, mount=True)
            kept: dict[int, int] = {}  # dataset id -> images, of the uploads that answered 201
            seeds = iter(range(1000))
            with live.client() as client, ThreadPoolExecutor(4) as pool:
                for _ in range(3):
                    nth = rng.randint(1, 30)  # the n-th image file the API starts writing
                    seen = itertools.count(1)
                    gate.arm(
                        lambda p, n=nth, c=seen: (
                            "/datasets/" in p and p.endswith(".partial") and next(c) == n
                        ),
                        lambda *_: os.killpg(live.api.pid, signal.SIGKILL),  # type: ignore[union-attr]
                    )
                    batch = [next(seeds) for _ in range(6)]
                    results = list(pool.map(lambda s: upload(client, s), batch))
                    gate.wait_hit(60, "an upload's image write")
                    live.api.wait(timeout=30)  # type: ignore[union-attr]
                    figures.add("faults injected")
                    assert None in results  # some upload was cut off mid-way
                    kept.update({d: 12 for d in results if d is not None})
                    live.start_api()
                    # The images of a cut-off upload can be sent again.
                    again = upload(client, batch[results.index(None)])
                    assert again is not None
                    kept[again] = 12
                    figures.add("faults survived")
                for dataset_id, count in kept.items():
                    assert client.get(f"/v1/datasets/{dataset_id}").json()["image_count"] == count
            check_invariants(database, artifacts)
            wait_no_orphans(database, artifacts, timeout=60)
        finally:
            gate.close()
            live.stop()


# --- the artifact store full, then read-only -------------------------------------------------


def fill(folder: Path) -> Path:
    """Fill the filesystem at `folder` to the last byte."""
    filler = folder / "filler"
    with open(filler, "ab") as handle:
        try:
            for _ in range(100_000):  # bounded: at most ~6 GiB of 64 KiB chunks
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def test_artifact_store_full_or_read_only_fails_clearly(tmp_path: Path, database: str):
    rng = random.Random("storage")
    artifacts = tmp_path / "artifacts"
    with small_filesystem(artifacts, 64 * 1024**2):
        live = LiveService(tmp_path, fault_env(tmp_path, database)).start()
        gate = FileGate()
        try:
            live.start_worker()
            gate.watch(artifacts, mount=True)
            with live.client() as client:
                # Full: the disk fills up just as the job starts its n-th checkpoint.
                job = submit(client, PLAN, seed=rng.randint(0, 99))
                nth = rng.randint(1, 3)
                seen = itertools.count(1)
                filler: list[Path] = []
                gate.arm(
                    lambda p: ".state.safetensors." in p and next(seen) == nth,
                    lambda *_: filler.append(fill(artifacts)),
                )
                gate.wait_hit(240, f"checkpoint {nth} of job {job['id']}")
                figures.add("faults injected")
                failed = live.wait_job(client, job["id"], TERMINAL_STATUSES, timeout=120)
                assert failed["status"] == "failed", failed
                assert failed["error_code"] == "storage_full", failed
                assert "free space" in failed["error"] and "/retry" in failed["error"]
                datasets = client.get("/v1/datasets").json()["total"]
                files, labels = labeled_uploads(per_class=2, seed=1)
                response = client.post("/v1/datasets", files=files, data={"labels": labels})
                assert response.status_code == 507 and api_error(response) == "storage_full"
                assert client.get("/v1/datasets").json()["total"] == datasets
                assert client.get("/readyz").status_code == 503
                assert not orphan_files(database, artifacts)  # nothing half-written
                filler[0].unlink()
                figures.add("faults survived")

                # Read-only: the job fails at its start, the API refuses uploads.
                remount(artifacts, read_only=True)
                figures.add("faults injected")
                try:
                    response = client.post("/v1/datasets", files=files, data={"labels": labels})
                    assert response.status_code == 503, response.text
                    assert api_error(response) == "storage_unavailable"
                    assert client.get("/readyz").json()["checks"]["artifacts"] != "ok"
                    blocked = client.post(
                        "/v1/finetune",
                        json={
                            "dataset_id": failed["dataset_id"],
                            "base_model": "R14x0.5",
                            "overrides": PLAN,
                        },
                    ).json()
                    done = live.wait_job(client, blocked["id"], TERMINAL_STATUSES, timeout=120)
                    assert done["status"] == "failed", done
                    assert done["error_code"] == "storage_unavailable", done
                finally:
                    remount(artifacts, read_only=False)
                figures.add("faults survived")
                # With space and writes back, both failed jobs succeed when retried.
                for job_id in (job["id"], blocked["id"]):
                    retried = client.post(f"/v1/jobs/{job_id}/retry")
                    assert retried.status_code == 200, retried.text
                steps = dict.fromkeys((job["id"], blocked["id"]), PLAN["total_steps"])
                finish_and_check(live, client, database, steps, 300)
        finally:
            gate.close()
            live.stop()
