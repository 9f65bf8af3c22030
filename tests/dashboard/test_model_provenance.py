"""The model page says what made the model (seed, data version, base weights, versions)
and whether it shares its base."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.app import create_app
from service.db.models import Model
from service.db.session import session_scope
from service.settings import Settings
from tests.dashboard.conftest import seed, sign_in
from tests.service.conftest import new_key

PROVENANCE = {
    "seed": 4242,
    "plan": {"total_steps": 100, "batch_size": 16},
    "dataset_version": {"dataset_id": 1, "dataset_version_id": 3, "dataset_version": 2},
    "data": None,
    "base_model": "BiT-M-R50x1",
    "base_sha256": "ab" * 32,
    "bit_service_version": "0.1.0",
    "git_commit": "c0ffee" + "0" * 34,
    "git_dirty": False,
    "torch_version": "2.6.0",
    "device": "cuda:0 (NVIDIA H100)",
    "precision": "bf16",
    "deterministic": True,
}


def section(html: str) -> str:
    """The visible text of the page's provenance block."""
    match = re.search(r'<div id="provenance">(.*?)</div>', html, re.S)
    assert match is not None, "the page has no provenance block"
    return " ".join(re.sub(r"<[^>]+>", " ", match.group(1)).split())


def test_the_model_page_shows_its_provenance_and_says_when_there_is_none(
    sqlite_settings: Settings,
):
    seeded = seed(sqlite_settings)
    with session_scope(sqlite_settings.database_url) as session:
        model = session.get(Model, seeded.model_id)
        assert model is not None
        model.metrics = {**model.metrics, "provenance": PROVENANCE}
    with TestClient(create_app(sqlite_settings)) as admin:
        assert sign_in(admin, new_key(sqlite_settings, "admin")).status_code == 303
        shown = section(admin.get(f"/admin/models/{seeded.model_id}").text)
        older = section(admin.get(f"/admin/models/{seeded.plain_model_id}").text)
    assert "seed 4242" in shown and "dataset_version.dataset_version 2" in shown
    assert f"base_sha256 {'ab' * 32}" in shown and "deterministic True" in shown
    assert "device cuda:0 (NVIDIA H100)" in shown and "data —" in shown
    assert "total_steps" not in shown  # the plan has its own section
    assert "Not recorded" in older


def test_the_model_page_says_when_a_model_shares_its_base(sqlite_settings: Settings):
    seeded = seed(sqlite_settings)
    with session_scope(sqlite_settings.database_url) as session:
        model = session.get(Model, seeded.model_id)
        assert model is not None
        model.shared_base_sha256, model.size_bytes = "cd" * 32, 4096
    with TestClient(create_app(sqlite_settings)) as admin:
        assert sign_in(admin, new_key(sqlite_settings, "admin")).status_code == 303
        shared = text_of(admin.get(f"/admin/models/{seeded.model_id}").text)
        whole = text_of(admin.get(f"/admin/models/{seeded.plain_model_id}").text)
    assert "4.1 KB, its head alone" in shared and f"shared base {'cd' * 8}…" in shared
    assert "shared base" not in whole and "MB" in whole


def text_of(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())
