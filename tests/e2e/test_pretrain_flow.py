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
        made_by = done["metrics"]["provenance"]  # what made the base
        assert made_by["seed"] == 0 and made_by["world"] == 2 and made_by["base_sha256"] is None

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
        model = user.get(f"/v1/models/{tuned['model_id']}").json()
        assert model["provenance"]["base_sha256"] == bases["house-R14"]["sha256"]
        assert model["provenance"]["seed"] == tuned["id"]  # the default seed: the job's id


def test_worker_killed_during_pretraining_resumes_without_a_second_run(tmp_path, postgres_url):
    import subprocess
    import uuid

    from tests.e2e.conftest import service_env
    from tests.polling import wait_for

    env = service_env(
        tmp_path,
        BIT_DATABASE_URL=postgres_url,
        BIT_BROKER_URL="redis://127.0.0.1:6379/0",
        BIT_BROKER_KEY_PREFIX=f"bit-test-{uuid.uuid4().hex[:8]}:",
        BIT_CHECKPOINT_EVERY="5",
        BIT_LEASE_S="3",
        BIT_PRETRAIN_DATA_ROOTS=str(tmp_path),
    )
    live = LiveService(tmp_path, env).start()
    try:
        first = live.start_worker()
        admin_key = live.bit("admin", "create-key", "--role", "admin").splitlines()[-1]
        files, labels = labeled_uploads(per_class=6, seed=5)
        with httpx.Client(
            base_url=live.url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=60
        ) as admin:
            dataset = admin.post("/v1/datasets", files=files, data={"labels": labels}).json()
            job = admin.post(
                "/v1/pretrain",
                json={
                    "arch": "R14x0.5",
                    "dataset_id": dataset["id"],
                    "total_steps": 80,
                    "global_batch": 16,
                    "nproc_per_node": 2,
                    "overrides": {"resolution": 64, "base_lr": 0.03},
                },
            ).json()
            wait_for(
                lambda: admin.get(f"/v1/jobs/{job['id']}").json()["step"] >= 12,
                300,
                "pre-training to pass a checkpoint",
            )
            live.kill_worker(first)

            def ranks_alive() -> int:
                found = subprocess.run(
                    ["pgrep", "-f", f"jobs/{job['id']}/pretrain"], capture_output=True, text=True
                )
                return len(found.stdout.split())

            wait_for(lambda: ranks_alive() == 0, 60, "the orphaned ranks to stop")
            live.start_worker()
            done = live.wait_job(admin, job["id"], ("succeeded", "failed"), timeout=400)
            assert done["status"] == "succeeded", done
            assert done["step"] == 80 and done["attempts"] == 2
            kinds = [e["kind"] for e in admin.get(f"/v1/jobs/{job['id']}").json()["events"]]
            assert kinds.count("started") == 1 and kinds.count("resumed") == 1, kinds
    finally:
        live.stop()
