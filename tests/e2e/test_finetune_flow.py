"""End to end through HTTP with a real worker process: upload, fine-tune, predict."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import SMALL_PLAN
from tests.e2e.live import LiveService, labeled_uploads

pytestmark = [pytest.mark.slow, pytest.mark.services]


def test_few_shot_finetune_then_predict_held_out_images(live: LiveService):
    files, labels = labeled_uploads(per_class=5, seed=0)
    with live.client() as client:
        created = client.post(
            "/v1/finetune/upload",
            files=files,
            data={"labels": labels, "base_model": "R14x0.5", "overrides": json.dumps(SMALL_PLAN)},
        )
        assert created.status_code == 202, created.text
        job = created.json()
        assert job["status"] == "queued" and job["plan"]["total_steps"] == 30
        assert job["plan"]["classes"] == sorted(set(labels))

        done = live.wait_job(client, job["id"], ("succeeded", "failed"), timeout=240)
        assert done["status"] == "succeeded", done
        assert done["step"] == 30 and done["model_id"] is not None
        assert done["metrics"]["train_loss"] < 1.0

        held_out, truth = labeled_uploads(per_class=2, seed=7)
        predicted = client.post(
            "/v1/predict", files=held_out, data={"model_id": str(done["model_id"]), "top_k": "3"}
        )
        assert predicted.status_code == 200, predicted.text
        body = predicted.json()
        top1 = [row["top_k"][0]["label"] for row in body["predictions"]]
        assert top1 == truth, body
        assert body["model_id"] == done["model_id"] and body["time_ms"] >= 0

        detail = client.get(f"/v1/jobs/{job['id']}").json()
        assert [e["kind"] for e in detail["events"]][:2] == ["created", "started"]
        assert detail["curves"] and detail["curves"][-1]["step"] == 30
