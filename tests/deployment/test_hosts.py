"""Several hosts on one store: each "host" is its own BIT_HOME and working folder, and the
hosts share only what production shares: PostgreSQL, Redis and an S3 bucket (moto's S3
server on loopback). The processes are the installed package's `bit` commands."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from service.queueing import enqueue_job
from service.settings import Settings
from tests.deployment.installed import Installed, Process, tails
from tests.e2e.live import answers_ok, labeled_uploads, submit_finetune
from tests.polling import free_port, wait_for
from tests.s3_server import S3Server
from tests.service.conftest import REDIS_URL

pytestmark = [pytest.mark.slow, pytest.mark.services, pytest.mark.deployment]

# Small enough for 2 CPU cores, long enough that a kill lands between checkpoints.
PLAN = {"batch_size": 16, "total_steps": 30, "base_lr": 0.01, "precrop": 40, "crop": 32}
LONG_PLAN = {**PLAN, "total_steps": 80}


@dataclass
class Host:
    """One machine: its own state folder and working folder, and its processes."""

    name: str
    root: Path
    installed: Installed
    shared: dict[str, str]
    processes: list[Process] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def work(self) -> Path:
        folder = self.root / "work"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def env(self) -> dict[str, str]:
        return self.installed.env(BIT_HOME=str(self.home), **self.shared)

    def run(self, *args: str) -> str:
        return self.installed.run(["bit", *args], cwd=self.work, env=self.env()).strip()

    def start(self, *args: str) -> Process:
        """A long-running `bit` command, in its own process group (so kill -9 gets all)."""
        name = f"{self.name}-{args[0]}-{len(self.processes)}"
        process = self.installed.spawn(
            name, ["bit", *args], cwd=self.work, env=self.env(), log_dir=self.root
        )
        self.processes.append(process)
        return process

    def kill(self, process: Process) -> None:
        """kill -9 of the whole process group: no shutdown, no cleanup."""
        os.killpg(process.pid, signal.SIGKILL)
        process.popen.wait(timeout=30)


@dataclass
class Cluster:
    """Hosts A, B, C... over one database, one Redis namespace and one bucket."""

    root: Path
    installed: Installed
    s3: S3Server
    bucket: str
    database_url: str
    shared: dict[str, str]
    hosts: dict[str, Host] = field(default_factory=dict)
    api_port: int = field(default_factory=free_port)
    key: str = ""

    def host(self, name: str) -> Host:
        if name not in self.hosts:
            self.hosts[name] = Host(name, self.root / name, self.installed, self.shared)
        return self.hosts[name]

    def start_api(self, name: str) -> None:
        host = self.host(name)
        host.run("migrate")
        self.key = host.run("admin", "create-key", "--tenant", "hosts").splitlines()[-1]
        host.start("api", "--host", "127.0.0.1", "--port", str(self.api_port))
        wait_for(lambda: answers_ok(f"{self.url}/readyz"), 90, f"the API on host {name}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60
        )

    def logs(self) -> str:
        return tails([p for host in self.hosts.values() for p in host.processes])

    def settings(self) -> Settings:
        """The shared settings, as the test process (an operator's shell) sees them."""
        return Settings(
            home=self.root / "operator",
            database_url=self.database_url,
            broker_url=self.shared["BIT_BROKER_URL"],
            broker_key_prefix=self.shared["BIT_BROKER_KEY_PREFIX"],
        )

    def wait_job(self, client: httpx.Client, job_id: int, timeout: float = 240) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            job = client.get(f"/v1/jobs/{job_id}").json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        try:
            return wait_for(ended, timeout, f"job {job_id} to end", interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from exc


@pytest.fixture
def cluster(
    tmp_path: Path, installed: Installed, s3_server: S3Server, fresh_database: str
) -> Iterator[Cluster]:
    bucket = s3_server.new_bucket()
    shared = {
        "BIT_DATABASE_URL": fresh_database,
        "BIT_BROKER_URL": REDIS_URL,
        "BIT_BROKER_KEY_PREFIX": f"bit-hosts-{uuid.uuid4().hex[:8]}:",
        "BIT_ARTIFACTS_URL": f"s3://{bucket}/bit",
        **s3_server.env(),
        # Quick beats so a dead host's job moves on within seconds, not minutes.
        "BIT_HEARTBEAT_S": "0.5",
        "BIT_LEASE_S": "4",
        "BIT_RECONCILE_EVERY_S": "1",
        "BIT_PROGRESS_EVERY_S": "0.2",
        "BIT_CHECKPOINT_EVERY": "5",
        "OMP_NUM_THREADS": "1",  # the hosts share 2 cores
    }
    cluster = Cluster(tmp_path, installed, s3_server, bucket, fresh_database, shared)
    try:
        yield cluster
    finally:
        if os.environ.get("BIT_TEST_SHOW_LOGS"):
            print(cluster.logs())
        for host in cluster.hosts.values():
            for process in host.processes:
                process.stop()


def predicts_truth(client: httpx.Client, model_id: int) -> bool:
    held_out, truth = labeled_uploads(per_class=1, seed=11)
    answer = client.post("/v1/predict", files=held_out, data={"model_id": str(model_id)})
    assert answer.status_code == 200, answer.text
    return [p["top_k"][0]["label"] for p in answer.json()["predictions"]] == truth


def test_a_model_trained_on_one_host_is_served_by_another(cluster: Cluster):
    cluster.start_api("a")
    host_b = cluster.host("b")
    host_b.start("worker", "--queues", "finetune")
    with cluster.client() as client:
        job_id = submit_finetune(client, PLAN, seed=3)
        job = cluster.wait_job(client, job_id)
        assert job["status"] == "succeeded", (job, cluster.logs())
        assert predicts_truth(client, job["model_id"])

    keys = cluster.s3.keys(cluster.bucket, f"bit/jobs/{job_id}/")
    assert f"bit/jobs/{job_id}/model/MANIFEST.json" in keys
    assert f"bit/jobs/{job_id}/state.safetensors" in keys
    # Host A has no artifact folder of its own: the model came from the bucket, via its cache.
    api_home = cluster.host("a").home
    assert not (api_home / "artifacts").exists()
    cached = api_home / "cache" / "objects" / "jobs" / str(job_id) / "model"
    assert (cached / "weights.safetensors").is_file()
    writes = cluster.s3.puts(cluster.bucket, f"bit/jobs/{job_id}/")
    images = cluster.s3.keys(cluster.bucket, "bit/datasets/")
    print(
        f"\nfigures: a fine-tune of {PLAN['total_steps']} steps wrote {len(keys)} objects "
        f"({writes} PUTs) under jobs/{job_id}/, its upload {len(images)} image objects"
    )


def test_a_job_survives_its_host_and_resumes_from_the_bucket(cluster: Cluster):
    cluster.start_api("a")
    host_b, host_c = cluster.host("b"), cluster.host("c")
    worker_b = host_b.start("worker", "--queues", "finetune")
    with cluster.client() as client:
        job_id = submit_finetune(client, LONG_PLAN, seed=5)
        checkpoint = f"bit/jobs/{job_id}/state.safetensors"

        def checkpointed() -> dict[str, Any] | None:
            job = client.get(f"/v1/jobs/{job_id}").json()
            stored = checkpoint in cluster.s3.keys(cluster.bucket, checkpoint)
            return job if stored and job["step"] >= 10 else None

        before = wait_for(checkpointed, 240, "a checkpoint in the bucket", interval=0.3)
        assert before["status"] == "running"
        host_b.kill(worker_b)  # kill -9 of host B's worker: no shutdown, no cleanup
        killed_at, step_at_kill = time.monotonic(), client.get(f"/v1/jobs/{job_id}").json()["step"]
        assert not (host_c.home).exists()  # host C starts with an empty BIT_HOME
        worker_c = host_c.start("worker", "--queues", "finetune")

        def moving_again() -> bool:
            job = client.get(f"/v1/jobs/{job_id}").json()
            return job["status"] == "running" and job["step"] > step_at_kill

        wait_for(moving_again, 120, "the job to move again on host C", interval=0.2)
        continued_after = time.monotonic() - killed_at
        job = cluster.wait_job(client, job_id)
        assert job["status"] == "succeeded", (job, cluster.logs())
        assert job["step"] == LONG_PLAN["total_steps"]
        resumed = [e for e in job["events"] if e["kind"] == "resumed"]
        assert resumed, job["events"]
        assert resumed[-1]["worker"].endswith(f":{worker_c.pid}")
        assert resumed[-1]["step"] > 0  # from the bucket's checkpoint, not from step 0
        assert predicts_truth(client, job["model_id"])
    print(
        f"\nfigures: host B killed at step {step_at_kill}; host C resumed from step "
        f"{resumed[-1]['step']} and the job moved again {continued_after:.1f} s after the kill "
        f"(lease {cluster.shared['BIT_LEASE_S']} s)"
    )


def test_two_workers_on_one_queue_never_run_a_job_twice(cluster: Cluster):
    cluster.start_api("a")
    workers = [cluster.host(name).start("worker", "--queues", "finetune") for name in "bc"]
    with cluster.client() as client:
        job_ids = [submit_finetune(client, PLAN, seed=20 + n) for n in range(4)]
        settings = cluster.settings()
        for job_id in job_ids:  # every job delivered twice, as a re-sent message would be
            enqueue_job(settings, job_id, "finetune")
        jobs = [cluster.wait_job(client, job_id) for job_id in job_ids]
    assert [job["status"] for job in jobs] == ["succeeded"] * 4, cluster.logs()
    for job in jobs:
        runs = [e for e in job["events"] if e["kind"] in ("started", "resumed")]
        assert len(runs) == 1, job["events"]  # one run; the duplicate was dropped
        assert job["attempts"] == 1
    engine = sa.create_engine(cluster.database_url)
    with engine.connect() as connection:
        models = connection.execute(sa.text("SELECT job_id FROM models ORDER BY job_id")).all()
    engine.dispose()
    assert [row[0] for row in models] == job_ids  # exactly one model per job
    ran_on = {job["events"][-1]["worker"] for job in jobs}
    assert all(worker.alive() for worker in workers), cluster.logs()
    print(f"\nfigures: 4 jobs, 8 deliveries, 2 workers: each job ran once (on {len(ran_on)})")
