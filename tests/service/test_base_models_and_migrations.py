"""Base-model listing, and the Alembic migration down and up again on both databases."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi.testclient import TestClient

from bit_core import weights
from service.db import migrate
from service.db.models import Base
from service.settings import Settings
from tests.factories import make_bit_npz


def test_base_models_lists_installed_official_and_scratch(
    client: TestClient, settings: Settings, user_headers, tmp_path
):
    npz = make_bit_npz(tmp_path / "house.npz", "R14x0.5", 5)
    weights.import_file(npz, settings.weights_dir, name="house-base")
    rows = {row["name"]: row for row in client.get("/v1/base-models", headers=user_headers).json()}
    assert rows["house-base"]["installed"] and rows["house-base"]["arch"] == "R14x0.5"
    assert not rows["BiT-M-R50x1"]["installed"]
    assert "bit weights pull BiT-M-R50x1" in rows["BiT-M-R50x1"]["install"]
    assert rows["R26x1"]["source"] == "scratch"
    assert client.get("/v1/base-models").status_code == 401


def test_migration_downgrades_to_empty_and_upgrades_again(settings: Settings):
    engine = sa.create_engine(settings.database_url)
    tables = set(Base.metadata.tables)
    assert tables <= set(sa.inspect(engine).get_table_names())
    migrate.downgrade(settings.database_url, "base")
    assert set(sa.inspect(engine).get_table_names()) & tables == set()
    migrate.upgrade(settings.database_url)
    assert tables <= set(sa.inspect(engine).get_table_names())
    engine.dispose()
