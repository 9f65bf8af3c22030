"""`bit serve` supervises its worker: real processes, real signals, a real fine-tune.

A worker killed mid-job is restarted and the job resumes from its checkpoint; SIGTERM and
SIGINT stop the worker within the stop bound; SIGKILL of `bit serve` takes the worker too.
The figures (seconds from a kill to the job's next progress, shutdown times) are printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import worker.shutdown
from service.db.models import Job, JobEvent, utcnow
from service.db.session import session_scope
from service.settings import Settings
from service.supervisor import SUPERVISOR_PID_ENV, WorkerSupervisor, worker_owner
from tests.e2e.conftest import service_env
from tests.e2e.live import answers_ok, submit_finetune
from tests.polling import free_port, wait_for
from worker.shutdown import EXIT_STOP_TIMEOUT

pytestmark = [pytest.mark.slow, pytest.mark.services]

STOP_BOUND_S = 12.0  # BIT_WORKER_STOP_TIMEOUT_S in these tests
# A run long enough to be caught mid-way, checkpointed every 5 steps.
TERMINAL = ("succeeded", "failed", "cancelled")
PLAN = {"batch_size": 16, "total_steps": 60, "base_lr": 0.01, "precrop": 40, "crop": 32}


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process from /proc; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = stat[stat.rfind(")") + 2 :].split()[:2]
    return state, int(ppid)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's reaper may be slow, or absent)."""
    found = proc_state(pid)
    return found is not None and found[0] not in "ZX"


def celery_children(parent: int, queue: bytes = b"finetune") -> list[int]:
    """Live Celery worker processes whose parent is `parent` and which consume `queue` (no
    psutil: /proc). `bit serve` also supervises a webhooks worker; the job worker is the one
    these tests kill and watch."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        state = proc_state(int(entry.name))
        if state is None or state[1] != parent or state[0] in "ZX":
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"celery" in command and any(queue in part.split(b",") for part in command):
            found.append(int(entry.name))
    return found


@dataclass
class Serve:
    """One `bit serve` process on a BIT_HOME, with an API key made for it."""

    home: Path
    env: dict[str, str]
    key: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    seen_pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.home / "serve.log"

    def start(self) -> Serve:
        with open(self.log, "ab") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--port", str(self.port)],
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(lambda: answers_ok(f"{self.url}/readyz"), 90, "bit serve to be ready")
        return self

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60
        )

    def worker_pid(self, timeout: float = 60, other_than: int | None = None) -> int:
        assert self.process is not None

        def one() -> int | None:
            pids = [p for p in celery_children(self.process.pid) if p != other_than]
            return pids[0] if len(pids) == 1 else None

        pid = int(wait_for(one, timeout, "bit serve's worker process"))
        self.seen_pids.add(pid)
        return pid

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def job(self, client: httpx.Client, job_id: int) -> dict[str, Any]:
        return client.get(f"/v1/jobs/{job_id}").json()

    def wait_job(self, client: httpx.Client, job_id: int, what: str, test: Any, timeout: float):
        def reached() -> dict[str, Any] | None:
            current = self.job(client, job_id)
            return current if test(current) else None

        try:
            return wait_for(reached, timeout, f"job {job_id}: {what}", interval=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.job(client, job_id)}\n{self.logs()}") from exc

    def end(self) -> None:
        """Leave nothing behind, whatever the test did (it may have failed half-way)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        for pid in self.seen_pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def make_serve(tmp_path: Path) -> Iterator[Any]:
    started: list[Serve] = []
    home = tmp_path / "state"
    home.mkdir()
    env = {
        **os.environ,
        **service_env(
            home,
            BIT_LEASE_S="6",
            BIT_CHECKPOINT_EVERY="5",
            BIT_WORKER_STOP_TIMEOUT_S=str(STOP_BOUND_S),
            BIT_WORKER_RESTART_BACKOFF_S="1",
            BIT_DEVICE="cpu",
        ),
    }
    key = ""

    def make() -> Serve:
        nonlocal key
        if not key:
            key = subprocess.run(
                [sys.executable, "-m", "service", "admin", "create-key"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=120,
            ).stdout.strip()
        serve = Serve(home, env, key).start()
        started.append(serve)
        return serve

    yield make
    for serve in started:
        serve.end()


def submit(client: httpx.Client) -> int:
    return submit_finetune(client, PLAN)


def mid_run(serve: Serve, client: httpx.Client, job_id: int) -> dict[str, Any]:
    """Wait until the job runs past its first checkpoint (every 5 steps) and is not done."""
    job = serve.wait_job(
        client,
        job_id,
        "running past its first checkpoint",
        lambda j: (j["status"] == "running" and j["step"] >= 10) or j["status"] in TERMINAL,
        180,
    )
    assert job["status"] == "running", f"the job ended before it could be interrupted: {job}"
    return job


def db_job(home: Path, job_id: int) -> tuple[Job, list[JobEvent]]:
    with session_scope(f"sqlite:///{home.resolve() / 'bit.db'}") as session:
        job = session.get(Job, job_id)
        assert job is not None
        events = list(session.query(JobEvent).filter_by(job_id=job_id).order_by(JobEvent.id))
        session.expunge_all()
    return job, events


def test_a_killed_worker_is_restarted_and_its_job_resumes_from_its_checkpoint(make_serve):
    serve = make_serve()
    client = serve.client()
    job_id = submit(client)
    first = serve.worker_pid()
    before = mid_run(serve, client, job_id)

    os.kill(first, signal.SIGKILL)  # as the OOM killer does
    killed_at = time.monotonic()
    second = serve.worker_pid(other_than=first)
    restarted_s = time.monotonic() - killed_at

    def resumed(job: dict[str, Any]) -> bool:
        return any(e["kind"] == "resumed" for e in job["events"])

    job = serve.wait_job(client, job_id, "resumed on the new worker", resumed, 120)
    resumed_s = time.monotonic() - killed_at
    resume = next(e for e in job["events"] if e["kind"] == "resumed")
    assert 0 < resume["step"] <= before["step"], (resume, before)
    assert resume["worker"].endswith(f":{second}")
    serve.wait_job(
        client,
        job_id,
        "progress past its checkpoint",
        lambda j: j["step"] > resume["step"] or j["status"] == "succeeded",
        60,
    )
    progress_s = time.monotonic() - killed_at

    done = serve.wait_job(client, job_id, "finished", lambda j: j["status"] in TERMINAL, 240)
    assert done["status"] == "succeeded", (done, serve.logs())
    assert done["step"] == PLAN["total_steps"]
    log = serve.logs()
    assert f"the worker (pid {first}) was killed by SIGKILL" in log
    assert f"worker restarted (pid {second}, restart 1)" in log
    assert f"jobs [{job_id}] of worker" in log  # its lease was released at once
    assert serve.process is not None and alive(serve.process.pid)
    print(
        f"\nworker killed at step {before['step']}: new worker after {restarted_s:.1f} s, "
        f"job resumed from step {resume['step']} after {resumed_s:.1f} s, "
        f"next progress after {progress_s:.1f} s"
    )


def test_sigterm_stops_the_worker_within_the_bound_and_requeues_its_job(make_serve):
    serve = make_serve()
    client = serve.client()
    job_id = submit(client)
    worker = serve.worker_pid()
    mid_run(serve, client, job_id)

    assert serve.process is not None
    asked = time.monotonic()
    serve.process.send_signal(signal.SIGTERM)
    serve.process.wait(timeout=STOP_BOUND_S + 20)
    stop_s = time.monotonic() - asked
    assert serve.process.returncode == 0, serve.logs()
    assert not alive(worker), f"the worker (pid {worker}) outlived bit serve"
    assert stop_s < STOP_BOUND_S + 10, stop_s
    job, events = db_job(serve.home, job_id)
    assert job.status == "queued" and job.lease_owner is None and job.step > 0, job.status
    assert events[-1].kind == "requeued", [e.kind for e in events]
    print(f"\nSIGTERM to bit serve at step {job.step}: exited after {stop_s:.1f} s")

    again = make_serve()  # the same BIT_HOME: the job resumes where it stopped
    client = again.client()
    done = again.wait_job(client, job_id, "finished", lambda j: j["status"] in TERMINAL, 240)
    assert done["status"] == "succeeded", (done, again.logs())
    resumes = [e for e in done["events"] if e["kind"] == "resumed"]
    assert resumes and resumes[-1]["step"] > 0, done["events"]


def test_sigint_kills_a_worker_that_does_not_stop_within_the_bound(make_serve):
    serve = make_serve()
    client = serve.client()
    job_id = submit(client)
    worker = serve.worker_pid()
    mid_run(serve, client, job_id)
    os.kill(worker, signal.SIGSTOP)  # a worker that cannot answer its warm shutdown

    assert serve.process is not None
    asked = time.monotonic()
    os.killpg(serve.process.pid, signal.SIGINT)  # Ctrl-C in the terminal
    serve.process.wait(timeout=STOP_BOUND_S + 30)
    stop_s = time.monotonic() - asked
    assert serve.process.returncode == 0, serve.logs()
    assert not alive(worker)
    assert STOP_BOUND_S <= stop_s < STOP_BOUND_S + 10, stop_s
    assert f"the worker (pid {worker}) did not stop in {STOP_BOUND_S:g} s" in serve.logs()
    job, _ = db_job(serve.home, job_id)
    # Killed mid-run, but its lease is marked run out: the next worker resumes it at once.
    assert job.status == "running" and job.lease_expires_at is not None
    assert job.lease_expires_at < utcnow()
    print(f"\nSIGINT to bit serve with a hung worker: exited after {stop_s:.1f} s")


def test_the_worker_dies_with_a_killed_bit_serve(make_serve):
    serve = make_serve()
    client = serve.client()
    job_id = submit(client)
    worker = serve.worker_pid()
    mid_run(serve, client, job_id)
    assert serve.process is not None
    webhooks_worker = wait_for(
        lambda: celery_children(serve.process.pid, b"webhooks"), 60, "the webhooks worker"
    )

    killed_at = time.monotonic()
    serve.process.kill()  # kill -9 of bit serve alone: no chance to stop anything
    serve.process.wait(timeout=30)
    wait_for(lambda: not alive(worker), STOP_BOUND_S + 20, "the orphaned worker to exit")
    for pid in webhooks_worker:
        wait_for(lambda p=pid: not alive(p), STOP_BOUND_S + 20, "the webhooks worker to exit")
    gone_s = time.monotonic() - killed_at
    job, events = db_job(serve.home, job_id)
    # It got SIGTERM (PR_SET_PDEATHSIG): a warm shutdown, so the job requeued itself.
    assert job.status == "queued" and job.step > 0, (job.status, [e.kind for e in events])
    print(f"\nSIGKILL to bit serve: its worker exited {gone_s:.1f} s later")


def test_a_worker_that_keeps_dying_is_restarted_with_a_doubling_backoff(tmp_path: Path):
    settings = Settings(
        home=tmp_path,
        worker_restart_backoff_s=0.2,
        worker_restart_backoff_max_s=0.4,
        worker_stable_s=60,
        worker_stop_timeout_s=5,
    )
    released: list[str] = []
    supervisor = WorkerSupervisor(
        settings,
        [sys.executable, "-c", "raise SystemExit(3)"],
        expire_leases=lambda owner: released.append(owner) or [],
    )
    began = time.monotonic()
    supervisor.start()
    wait_for(lambda: supervisor.restarts >= 3, 20, "three restarts")
    took = time.monotonic() - began
    # The last one may have been stopped before it could exit by itself.
    assert supervisor.stop() in (3, -signal.SIGTERM)
    assert not supervisor._thread.is_alive()
    assert took >= 0.2 + 0.4 + 0.4  # 0.2, then doubled and capped at 0.4
    assert len(set(released)) >= 3  # each dead worker's leases, by its own owner name
    assert all(owner == worker_owner(int(owner.rsplit(":", 1)[1])) for owner in released)


def test_a_supervised_worker_exits_when_its_shutdown_overruns_the_bound(tmp_path: Path):
    """What an orphaned worker relies on: nobody is left to kill it."""
    began = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from worker.shutdown import bound_shutdown, request_shutdown\n"
            "request_shutdown()\n"
            "bound_shutdown(60)  # later calls change nothing\n"
            "for _ in range(300): time.sleep(0.1)\n",
        ],
        env={
            **os.environ,
            "BIT_HOME": str(tmp_path),
            "BIT_WORKER_STOP_TIMEOUT_S": "0.5",
            SUPERVISOR_PID_ENV: str(os.getpid()),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_STOP_TIMEOUT, done.stderr
    assert "still running 0.5 s after its shutdown began" in done.stderr
    assert time.monotonic() - began < 20


def test_an_unsupervised_shutdown_is_not_bounded(monkeypatch: pytest.MonkeyPatch):
    """A standalone worker (or a test calling request_shutdown) is never exited from here."""
    monkeypatch.delenv(SUPERVISOR_PID_ENV, raising=False)
    monkeypatch.setattr(worker.shutdown, "_requested", threading.Event())
    monkeypatch.setattr(worker.shutdown, "_deadline", None)
    worker.shutdown.request_shutdown()
    assert worker.shutdown.shutdown_requested()
    assert worker.shutdown._deadline is None
