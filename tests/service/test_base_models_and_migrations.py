"""Base-model listing, and the Alembic migrations on both databases: down and up again, in step
with the models, and carrying old rows forward."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient

from bit_core import weights
from service.auth import SCOPES, USER_SCOPES
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


def test_migrations_create_exactly_the_tables_the_models_declare(settings: Settings):
    """Alembic's own comparison finds nothing to change: the scripts and the ORM agree."""
    engine = sa.create_engine(settings.database_url)
    with engine.connect() as connection:
        drift = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert drift == []


def test_keys_made_before_scopes_keep_their_roles_powers(settings: Settings):
    """Upgrading past 0002 gives every existing key its role's scopes, so none stops working."""
    migrate.downgrade(settings.database_url, "0001")
    engine = sa.create_engine(settings.database_url)
    with engine.begin() as connection:
        for role in ("user", "admin"):
            connection.execute(
                sa.text(
                    "INSERT INTO api_keys (prefix, key_hash, role, tenant, name, revoked) "
                    "VALUES (:prefix, :hash, :role, 'acme', '', false)"
                ),
                {"prefix": f"bit_{role}", "hash": role * 8, "role": role},
            )
    migrate.upgrade(settings.database_url)
    with engine.connect() as connection:
        scopes = dict(connection.execute(sa.text("SELECT role, scopes FROM api_keys")).all())
    engine.dispose()
    assert set(scopes["user"].split()) == set(USER_SCOPES)
    assert set(scopes["admin"].split()) == set(SCOPES)
