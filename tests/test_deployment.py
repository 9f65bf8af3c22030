"""The production layout (docker compose) as far as it can be checked without a Docker engine."""

from __future__ import annotations

from pathlib import Path

import yaml

from service.settings import QUEUES, Settings

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_every_role_and_the_gpu_reservation():
    services = compose()["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker-gpu", "worker-cluster"}
    assert services["worker-gpu"]["command"][-1] == "finetune"
    assert services["worker-cluster"]["command"][-1] == "pretrain"
    assert {s["command"][-1] for s in (services["worker-gpu"], services["worker-cluster"])} == set(
        QUEUES
    )
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_every_compose_setting_is_a_known_setting():
    known = {f"BIT_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose()["services"].items():
        for variable in service.get("environment", {}):
            if variable.startswith("BIT_"):
                assert variable in known, f"{name}: {variable} is not a setting"


def test_dockerfile_copies_every_package():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("bit_core", "service", "worker", "migrations", "alembic.ini"):
        assert f"COPY {package}" in dockerfile
