"""Faults during jobs: a worker killed mid-job, Redis restarted with jobs queued."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import service_env
from tests.e2e.live import LiveService, labeled_uploads, start_redis
from tests.polling import free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.services]

# Long enough to be killed mid-way on 2 cores (a step is a few tenths of a second).
LONG_PLAN = {"batch_size": 32, "total_steps": 60, "base_lr": 0.01, "precrop": 72, "crop": 64}


def submit(client, plan: dict, seed: int = 0) -> dict:
    files, labels = labeled_uploads(per_class=4, seed=seed)
    response = client.post(
        "/v1/finetune/upload",
        files=files,
        data={"labels": labels, "base_model": "R14x0.5", "overrides": json.dumps(plan)},
    )
    assert response.status_code == 202, response.text
    return response.json()


def test_worker_killed_mid_job_resumes_from_checkpoint(tmp_path: Path, postgres_url: str):
    env = service_env(
        tmp_path,
        BIT_DATABASE_URL=postgres_url,
        BIT_BROKER_URL="redis://127.0.0.1:6379/0",
        BIT_BROKER_KEY_PREFIX=f"bit-test-{uuid.uuid4().hex[:8]}:",
        BIT_CHECKPOINT_EVERY="5",
        BIT_LEASE_S="3",
    )
    live = LiveService(tmp_path, env).start()
    try:
        first = live.start_worker()
        with live.client() as client:
            job = submit(client, LONG_PLAN)
            wait_for(
                lambda: client.get(f"/v1/jobs/{job['id']}").json()["step"] >= 12,
                180,
                "the job to pass a checkpoint",
            )
            live.kill_worker(first)
            killed_at = client.get(f"/v1/jobs/{job['id']}").json()["step"]
            live.start_worker()
            done = live.wait_job(client, job["id"], ("succeeded", "failed"), timeout=300)
            assert done["status"] == "succeeded", done
            assert done["step"] == LONG_PLAN["total_steps"]  # same step count as one clean run
            assert done["attempts"] == 2
            events = client.get(f"/v1/jobs/{job['id']}").json()["events"]
            kinds = [e["kind"] for e in events]
            assert kinds.count("started") == 1 and kinds.count("resumed") == 1, kinds
            assert "requeued" in kinds
            resumed = next(e for e in events if e["kind"] == "resumed")
            started = next(e for e in events if e["kind"] == "started")
            assert resumed["worker"] != started["worker"]
            assert 0 < resumed["step"] <= killed_at  # resumed from a checkpoint, not step 0
            # No second concurrent run: the new run began only after the old lease expired.
            requeued = next(e for e in events if e["kind"] == "requeued")
            assert started["at"] < requeued["at"] <= resumed["at"]
    finally:
        live.stop()


def test_redis_restart_with_queued_jobs_loses_none(tmp_path: Path, postgres_url: str):
    redis_port = free_port()
    redis = start_redis(tmp_path, redis_port)
    env = service_env(
        tmp_path,
        BIT_DATABASE_URL=postgres_url,
        BIT_BROKER_URL=f"redis://127.0.0.1:{redis_port}/0",
        BIT_QUEUED_GRACE_S="2",
    )
    live = LiveService(tmp_path, env).start()
    try:
        with live.client() as client:
            small = {"batch_size": 8, "total_steps": 5, "precrop": 40, "crop": 32}
            jobs = [submit(client, small, seed=i) for i in range(2)]
            redis.kill()  # no persistence: the queued messages are gone
            redis.wait(timeout=10)
            redis = start_redis(tmp_path, redis_port)
            live.start_worker()
            for job in jobs:
                done = live.wait_job(client, job["id"], ("succeeded", "failed"), timeout=240)
                assert done["status"] == "succeeded", done
                kinds = [e["kind"] for e in client.get(f"/v1/jobs/{job['id']}").json()["events"]]
                assert "resent" in kinds and kinds.count("succeeded") == 1
    finally:
        live.stop()
        redis.kill()
