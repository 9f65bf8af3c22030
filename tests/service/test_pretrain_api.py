"""POST /v1/pretrain: admin only, data roots enforced, plan resolved; the Slurm script."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from service.settings import Settings
from tests.factories import make_image_folder
from worker.pretrain import slurm_script, torchrun_command


def test_pretrain_is_admin_only_and_checks_its_input(
    client: TestClient, settings: Settings, user_headers, admin_headers, tmp_path: Path
):
    folder = make_image_folder(tmp_path / "upstream", per_class=4)
    body = {"arch": "R14x0.5", "data_path": str(folder), "total_steps": 10, "global_batch": 8}
    assert client.post("/v1/pretrain", json=body, headers=user_headers).status_code == 403
    refused = client.post("/v1/pretrain", json=body, headers=admin_headers)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "data_path_not_allowed"
    assert "BIT_PRETRAIN_DATA_ROOTS" in refused.json()["error"]["message"]

    settings.pretrain_data_roots = str(tmp_path)
    job = client.post("/v1/pretrain", json={**body, "nproc_per_node": 2}, headers=admin_headers)
    assert job.status_code == 202, job.text
    params = job.json()["plan"]
    assert params["plan"]["total_steps"] == 10 and params["plan"]["loss"] == "softmax"
    assert params["nproc_per_node"] == 2 and job.json()["kind"] == "pretrain"

    uneven = client.post("/v1/pretrain", json={**body, "nproc_per_node": 3}, headers=admin_headers)
    assert uneven.status_code == 422 and "split evenly" in uneven.json()["error"]["message"]
    unknown = client.post("/v1/pretrain", json={**body, "arch": "R9000"}, headers=admin_headers)
    assert unknown.json()["error"]["code"] == "unknown_architecture"
    both = client.post("/v1/pretrain", json={**body, "dataset_id": 1}, headers=admin_headers)
    assert both.status_code == 422


def test_slurm_script_runs_one_torchrun_per_node(tmp_path: Path):
    script = slurm_script(
        tmp_path / "run",
        nnodes=4,
        nproc_per_node=8,
        max_restarts=2,
        partition="gpu",
        gpus_per_node=8,
        rdzv_id="bit-job7-a1",
    )
    assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --partition=gpu" in script
    assert '"--rdzv-endpoint" "$MASTER_ADDR:$MASTER_PORT"' in script  # a free port per job
    assert '"--rdzv-id" "bit-job7-a1"' in script
    assert '"--nnodes" "4" "--nproc-per-node" "8"' in script
    local = torchrun_command(
        tmp_path,
        nnodes=1,
        nproc_per_node=2,
        endpoint="127.0.0.1:1234",
        max_restarts=3,
        rdzv_id="bit-job7-a1",
    )
    assert local[-2:] == ["bit_core.pretrain_run", str(tmp_path)]
