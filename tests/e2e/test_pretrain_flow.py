"""Pre-training through the API on the pretrain queue (2 gloo processes under torchrun),
then fine-tuning from the base model it produced."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.conftest import SMALL_PLAN
from tests.e2e.live import LiveService, labeled_uploads

pytestmark = [pytest.mark.slow, pytest.mark.services]


@pytest.mark.parametrize("live", ["embedded"], indirect=True)
def test_pretrained_base_model_fine_tunes_through_the_api(live: LiveService):
    admin_key = live.bit("admin", "create-key", "--role", "admin", "--tenant", "e2e").splitlines()[
        -1
    ]
    files, labels = labeled_uploads(per_class=6, seed=21)
    with (
        httpx.Client(
            base_url=live.url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=60
        ) as admin,
        live.client() as user,
    ):
        dataset = admin.post("/v1/datasets", files=files, data={"labels": labels}).json()
        refused = user.post("/v1/pretrain", json={"arch": "R14x0.5", "dataset_id": dataset["id"]})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_required"

        job = admin.post(
            "/v1/pretrain",
            json={
                "arch": "R14x0.5",
                "dataset_id": dataset["id"],
                "total_steps": 12,
                "global_batch": 16,
                "nproc_per_node": 2,
                "name": "house-R14",
                "overrides": {"resolution": 32, "base_lr": 0.03},
            },
        )
        assert job.status_code == 202, job.text
        assert job.json()["kind"] == "pretrain" and job.json()["plan"]["plan"]["total_steps"] == 12
        done = live.wait_job(admin, job.json()["id"], ("succeeded", "failed"), timeout=400)
        assert done["status"] == "succeeded", done
        assert done["step"] == 12 and done["metrics"]["base_model"] == "house-R14"

        bases = {b["name"]: b for b in user.get("/v1/base-models").json()}
        assert bases["house-R14"]["installed"] and bases["house-R14"]["arch"] == "R14x0.5"

        finetune = user.post(
            "/v1/finetune/upload",
            files=files,
            data={
                "labels": labels,
                "base_model": "house-R14",
                "overrides": json.dumps(SMALL_PLAN),
            },
        )
        assert finetune.status_code == 202, finetune.text
        tuned = live.wait_job(user, finetune.json()["id"], ("succeeded", "failed"), timeout=300)
        assert tuned["status"] == "succeeded" and tuned["base_model"] == "house-R14"
