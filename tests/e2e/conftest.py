"""Live services for end-to-end tests: embedded default, and PostgreSQL + Redis."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.live import LiveService
from tests.service.conftest import REDIS_URL, postgres_url  # noqa: F401 (fixture)

# Fast enough on 2 CPU cores, still a real BiT fine-tuning run of the HyperRule's shape.
SMALL_PLAN = {"batch_size": 16, "total_steps": 30, "base_lr": 0.01, "precrop": 40, "crop": 32}


def service_env(home: Path, **extra: str) -> dict[str, str]:
    return {
        "BIT_HOME": str(home),
        "BIT_HEARTBEAT_S": "0.5",
        "BIT_RECONCILE_EVERY_S": "1",
        "BIT_PROGRESS_EVERY_S": "0.2",
        "OMP_NUM_THREADS": "1",  # API and worker share 2 cores: no thread oversubscription
        **extra,
    }


@pytest.fixture(params=["embedded", "postgres+redis"])
def live(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveService]:
    """The API process and one worker process, on either deployment."""
    if request.param == "embedded":
        env = service_env(tmp_path)
    else:
        env = service_env(
            tmp_path,
            BIT_DATABASE_URL=request.getfixturevalue("postgres_url"),
            BIT_BROKER_URL=REDIS_URL,
            BIT_BROKER_KEY_PREFIX=f"bit-test-{uuid.uuid4().hex[:8]}:",
        )
    service = LiveService(tmp_path, env).start()
    service.start_worker()
    try:
        yield service
    finally:
        service.stop()
        if os.environ.get("BIT_TEST_SHOW_LOGS"):
            print(service.logs())
