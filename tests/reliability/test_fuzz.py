"""API fuzzing with schemathesis against the app's own OpenAPI schema, in-process.

Every operation gets generated requests, valid by the schema and invalid, from an admin
key, over seeded rows (a dataset, a job, a model, so ids hit something). Every answer must
be a non-5xx that the schema documents: its status code, content type, headers and body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.settings import Settings
from tests.factories import save_tiny_model, two_classes
from tests.reliability import figures
from tests.service.conftest import new_key, register_model, upload

# Per operation and generation mode: ~20 operations x 2 modes x this, on each database.
EXAMPLES = 15
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Invalid requests must be refused (4xx), not accepted.
NEGATIVE_CHECKS = [*CHECKS, negative_data_rejection]
REQUEST_TIMEOUT_S = 10  # bounds an event stream of a job that never ends


@pytest.fixture
def fuzz_settings(settings: Settings) -> Settings:
    """Both databases; no rate limit (the fuzzer is one key sending hundreds of requests)."""
    return settings.model_copy(update={"rate_limit_per_minute": 0, "device": "cpu"})


def seed(settings: Settings, tmp_path: Path, headers: dict[str, str]) -> None:
    """A dataset, a succeeded job and its model, so that small ids exist."""
    template = tmp_path / "template"
    save_tiny_model(template)
    register_model(settings, template)
    with TestClient(create_app(settings)) as client:
        assert upload(client, headers, two_classes()).status_code == 201


def fuzz_operation(operation: Any, mode: GenerationMode, headers: dict[str, str]) -> int:
    """Run EXAMPLES generated cases of one operation; returns how many were sent."""
    sent = 0
    checks = NEGATIVE_CHECKS if mode is GenerationMode.NEGATIVE else CHECKS

    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,  # no example database written into the checkout
        derandomize=True,  # the same cases on every run: a failure reproduces
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints its case
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        nonlocal sent
        sent += 1
        case.call_and_validate(headers=headers, checks=checks, timeout=REQUEST_TIMEOUT_S)

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # Nothing to get wrong (no parameters, no body): no invalid request exists.
        if mode is not GenerationMode.NEGATIVE:
            raise
    return sent


def test_every_operation_survives_fuzzing(fuzz_settings: Settings, tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {new_key(fuzz_settings, 'admin', 'acme')}"}
    seed(fuzz_settings, tmp_path, headers)
    app = create_app(fuzz_settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    total = 0
    try:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                total += fuzz_operation(operation, mode, headers)
    finally:
        asgi.shutdown_lifespans()  # the app's lifespan: close its model cache and threads
    assert total >= len(operations) * EXAMPLES
    figures.add("fuzz cases", total)
    figures.put("fuzzed operations", len(operations))
