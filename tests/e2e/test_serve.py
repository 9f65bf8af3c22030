"""`bit serve` as the README runs it: API and worker together on the embedded default."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.webhooks import verify
from tests.e2e.conftest import service_env
from tests.e2e.live import labeled_uploads
from tests.polling import free_port, wait_for
from tests.worker.webhook_receiver import webhook_receiver

pytestmark = [pytest.mark.slow, pytest.mark.services]
WEBHOOK_SECRET = "serve-test-webhook-secret-0123456789abcdef"


def test_bit_serve_answers_a_finetune_and_a_predict(tmp_path: Path):
    receiving = ExitStack()  # the job's callback goes here, through bit serve's webhook worker
    receiver = receiving.enter_context(webhook_receiver())
    env = {
        **os.environ,
        **service_env(tmp_path / "state"),
        "BIT_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "BIT_WEBHOOK_ALLOW": "127.0.0.1",
    }
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as handle:
        serve = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--port", str(port)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 90, "bit serve to be ready")
        banner = log.read_text()
        assert f"http://127.0.0.1:{port}/admin" in banner
        assert "bit admin create-key --role admin" in banner  # a fresh install says how
        assert (tmp_path / "state" / "bit.db").exists()  # embedded SQLite under $BIT_HOME

        key = subprocess.run(
            [sys.executable, "-m", "service", "admin", "create-key"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        files, labels = labeled_uploads(per_class=5, seed=3)
        plan = {"batch_size": 16, "total_steps": 20, "base_lr": 0.01, "precrop": 40, "crop": 32}
        job = client.post(
            "/v1/finetune/upload",
            files=files,
            data={
                "labels": labels,
                "base_model": "R14x0.5",
                "overrides": json.dumps(plan),
                "callback_url": receiver.url,
            },
        ).json()

        def finished() -> dict | None:
            current = client.get(f"/v1/jobs/{job['id']}").json()
            return current if current["status"] in ("succeeded", "failed") else None

        done = wait_for(finished, 240, "the job to finish", interval=0.5)
        assert done["status"] == "succeeded", (done, log.read_text()[-3000:])
        held_out, truth = labeled_uploads(per_class=1, seed=11)
        predicted = client.post(
            "/v1/predict", files=held_out, data={"model_id": str(done["model_id"])}
        )
        assert [p["top_k"][0]["label"] for p in predicted.json()["predictions"]] == truth
        wait_for(lambda: receiver.received, 60, "the job's webhook")
        (callback,) = receiver.received
        assert callback.payload["type"] == "job.succeeded"
        assert verify([WEBHOOK_SECRET], callback.signature, callback.body)

        # One scrape target shows both processes: the API's counts and its worker's runs.
        def counted() -> str | None:
            text = httpx.get(f"{url}/metrics", timeout=5).text
            return text if 'outcome="succeeded"' in text else None

        metrics = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(
                wait_for(counted, 30, "the worker's run in the API's /metrics")
            )
            for sample in family.samples
        }
        runs = (("kind", "finetune"), ("outcome", "succeeded"), ("worker", "jobs"))
        assert metrics[("bit_worker_jobs_total", runs)] == 1
        for worker in ("jobs", "webhooks"):
            assert metrics[("bit_worker_metrics_up", (("worker", worker),))] == 1
        assert metrics[("bit_jobs", (("kind", "finetune"), ("status", "succeeded")))] == 1
    finally:
        os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            serve.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            raise
        finally:
            receiving.close()
    assert serve.returncode in (0, -signal.SIGINT)
