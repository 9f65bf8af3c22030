"""Worker metrics: steps timed from the progress a run reports (fine-tuning's callback,
pre-training's progress file), and a real Celery worker process serving them on
BIT_WORKER_METRICS_PORT: a job run, its steps timed, a failed run counted with its code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session

from bit_core.pretrain_run import PROGRESS
from bit_core.train import Progress
from service.cli import worker_command
from service.db.models import Image
from service.settings import Settings
from tests.polling import free_port, wait_for
from tests.worker.conftest import job_row, queue_finetune, styled_items
from worker.metrics import REGISTRY, StepTimer
from worker.pretrain import ProgressTail

STEPS = 5
PLAN = {"batch_size": 8, "total_steps": STEPS, "base_lr": 0.01, "precrop": 40, "crop": 32}


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def scrape(self) -> Samples:
        text = httpx.get(self.url, timeout=5).text
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


@pytest.fixture
def worker(sqlite_settings: Settings) -> Iterator[Worker]:
    """One `bit worker` process on the test's BIT_HOME, its metrics on a free loopback port."""
    port = free_port()
    env = {
        **os.environ,
        "BIT_HOME": str(sqlite_settings.home),
        "BIT_WORKER_METRICS_PORT": str(port),
        "BIT_HEARTBEAT_S": "0.5",
        "BIT_RECONCILE_EVERY_S": "1",
        "OMP_NUM_THREADS": "1",
    }
    log = sqlite_settings.home / "worker.log"
    with open(log, "ab") as handle:
        process = subprocess.Popen(
            worker_command(["finetune"], "INFO"),
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_for(lambda: answers(url), 120, "the worker's metrics port to answer")
        yield Worker(process, url, log)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def submit(settings: Settings, name: str, seed: int, *, corrupt: bool = False) -> int:
    """A tiny fine-tune of a new dataset; `corrupt`: one stored image is broken first."""

    def break_one(session: Session, dataset_id: int) -> None:
        # Before the job exists, so the worker never sees the intact file.
        uri = session.scalars(select(Image.uri).where(Image.dataset_id == dataset_id)).first()
        (Path(settings.artifacts_url) / str(uri)).write_bytes(b"\x89PNG\r\n\x1a\n broken")

    return queue_finetune(
        settings,
        styled_items(range(seed, seed + 3)),
        overrides=PLAN,
        name=name,
        before_job=break_one if corrupt else None,
    )


def wait_counted(worker: Worker, job_id: int, outcome: str) -> Samples:
    """The worker's metrics once it has counted a run ending in `outcome` (the run is
    counted just after its final status is committed)."""
    key = ("bit_worker_jobs_total", frozenset({("kind", "finetune"), ("outcome", outcome)}))

    def counted() -> Samples | None:
        assert worker.process.poll() is None, worker.log.read_text(errors="replace")[-4000:]
        scraped = worker.scrape()
        return scraped if key in scraped else None

    return wait_for(counted, 180, f"job {job_id}'s run to be counted {outcome}", interval=0.3)


def step_seconds(kind: str) -> tuple[float, float]:
    """(count, sum) of this process's step-time histogram for `kind`."""
    count = REGISTRY.get_sample_value("bit_worker_step_seconds_count", {"kind": kind}) or 0.0
    total = REGISTRY.get_sample_value("bit_worker_step_seconds_sum", {"kind": kind}) or 0.0
    return count, total


def test_the_step_timer_times_each_step_after_the_first_report():
    timer = StepTimer("unit")
    timer.note(3, 100.0)  # the first report after a (re)start only sets the clock
    assert step_seconds("unit") == (0.0, 0.0)
    timer.note(4, 100.5)
    timer.note(6, 101.5)  # two steps between reports: each took half of it
    timer.note(6, 102.0)  # no step finished: nothing to time
    assert step_seconds("unit") == (3.0, 1.5)

    seen: list[Progress] = []
    report = StepTimer("wrapped").wrap(seen.append)  # as the engine's progress callback
    for step in (1, 2, 3):
        report(Progress(step, 10, 0.5, 0.01, 10.0, 3.0))
    assert [progress.step for progress in seen] == [1, 2, 3]  # every report still passed on
    assert step_seconds("wrapped")[0] == 2.0


def test_pretraining_steps_are_timed_from_the_progress_file(tmp_path: Path):
    before = step_seconds("pretrain")
    records = [{"time": 50.0 + 0.25 * step, "step": step, "loss": 1.0} for step in (1, 2, 3, 4)]
    lines = [json.dumps(record) for record in [*records, {"outcome": "finished", "step": 4}]]
    (tmp_path / PROGRESS).write_text("\n".join(lines) + "\n")
    assert len(ProgressTail(tmp_path).read()) == 4
    count, total = step_seconds("pretrain")
    assert (count - before[0], round(total - before[1], 6)) == (3.0, 0.75)


@pytest.mark.slow
def test_a_worker_counts_its_runs_steps_and_failures(sqlite_settings: Settings, worker: Worker):
    finetune = ("kind", "finetune")
    before = worker.scrape()
    assert ("bit_worker_step_seconds_count", frozenset({finetune})) not in before

    done = submit(sqlite_settings, "good", seed=0)
    scraped = wait_counted(worker, done, "succeeded")
    assert job_row(sqlite_settings, done).status == "succeeded"
    assert scraped[("bit_worker_jobs_total", frozenset({finetune, ("outcome", "succeeded")}))] == 1
    # The first report only starts the clock: every later step is timed.
    assert scraped[("bit_worker_step_seconds_count", frozenset({finetune}))] == STEPS - 1
    assert scraped[("bit_worker_step_seconds_sum", frozenset({finetune}))] > 0
    assert not [name for name, _ in scraped if name == "bit_worker_job_failures_total"]

    broken = submit(sqlite_settings, "broken", seed=10, corrupt=True)
    scraped = wait_counted(worker, broken, "failed")
    assert job_row(sqlite_settings, broken).error_code == "invalid_image"
    assert scraped[("bit_worker_jobs_total", frozenset({finetune, ("outcome", "failed")}))] == 1
    failures = frozenset({finetune, ("code", "invalid_image")})
    assert scraped[("bit_worker_job_failures_total", failures)] == 1
    assert scraped[("bit_worker_jobs_total", frozenset({finetune, ("outcome", "succeeded")}))] == 1
