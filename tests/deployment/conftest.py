"""Deployment fixtures: the package installed as the Docker image installs it (once per
session), and fresh PostgreSQL databases for the installed commands to migrate."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.deployment.installed import Installed, Process, build_image, tails, wait_while_running
from tests.e2e.conftest import SMALL_PLAN
from tests.e2e.live import labeled_uploads, submit_finetune
from tests.service.conftest import POSTGRES_ADMIN_URL

ROOT = Path(__file__).resolve().parents[2]
# The smallest plan that is still a real BiT fine-tune: a few seconds on one CPU thread.
TINY_PLAN = {**SMALL_PLAN, "total_steps": 20}


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The checkout's Dockerfile built into a fresh venv (its COPY sources only, its pip
    install line, its ENV); see tests/deployment/installed.py for the API."""
    started = time.monotonic()
    result = build_image(ROOT, tmp_path_factory.mktemp("image"))
    print(f"built the image's venv in {time.monotonic() - started:.0f} s: {result.venv}")
    return result


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """A PostgreSQL database of its own (`bit_deploy_<hex>`), dropped afterwards even while
    processes still hold connections to it."""
    name = f"bit_deploy_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield (
            sa.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        )
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def finetune_and_predict(url: str, key: str, processes: Sequence[Process]) -> dict[str, Any]:
    """A tiny fine-tune uploaded through the API, waited for, and one predict with the
    model it made; returns the finished job (its events name the worker that ran it)."""
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    job_id = submit_finetune(client, TINY_PLAN)

    def finished() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_while_running(processes, finished, 240, f"fine-tune job {job_id} to finish")
    assert job["status"] == "succeeded", (job, tails(processes))
    held_out, truth = labeled_uploads(per_class=1, seed=11)
    predicted = client.post("/v1/predict", files=held_out, data={"model_id": str(job["model_id"])})
    assert predicted.status_code == 200, (predicted.text, tails(processes))
    answers = predicted.json()["predictions"]
    assert len(answers) == len(truth), (answers, tails(processes))
    assert {a["top_k"][0]["label"] for a in answers} <= set(truth), answers
    return job
