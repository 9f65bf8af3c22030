"""Service fixtures: settings on a temp BIT_HOME, a migrated database (SQLite or a fresh
PostgreSQL database), an app client and API keys of two tenants."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_key
from service.db import migrate
from service.db.models import Base
from service.db.session import session_scope
from service.settings import Settings

POSTGRES_ADMIN_URL = os.environ.get(
    "BIT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("BIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    name = f"bit_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    from service.db.session import get_engine

    get_engine(url).dispose()
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def make_settings(home: Path, database_url: str = "", **overrides: object) -> Settings:
    return Settings(home=home, database_url=database_url, **overrides)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Migrated settings on SQLite (embedded) and on PostgreSQL; broker is the embedded one."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        migrate.upgrade(url)
        engine = sa.create_engine(url)
        with engine.begin() as connection:  # a clean slate per test, schema kept
            tables = ", ".join(t for t in Base.metadata.tables if t != "alembic_version")
            connection.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        engine.dispose()
        result = make_settings(tmp_path, url)
    else:
        result = make_settings(tmp_path)
        migrate.upgrade(result.database_url)
    return result


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    """The embedded default only (for tests that need just one backend)."""
    result = make_settings(tmp_path)
    migrate.upgrade(result.database_url)
    return result


def new_key(settings: Settings, role: str = "user", tenant: str = "acme") -> str:
    with session_scope(settings.database_url) as session:
        return create_key(session, role=role, tenant=tenant)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def user_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {new_key(settings, 'user', 'acme')}"}


@pytest.fixture
def other_tenant_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {new_key(settings, 'user', 'globex')}"}


@pytest.fixture
def admin_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {new_key(settings, 'admin', 'acme')}"}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One saved model directory (a tiny trained model), copied into each test's store."""
    from tests.service.test_inference import save_tiny_model

    directory = tmp_path_factory.mktemp("template") / "model"
    save_tiny_model(directory, seed=1)
    return directory
