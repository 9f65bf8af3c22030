"""Service fixtures: settings on a temp BIT_HOME, a migrated database (SQLite or a fresh
PostgreSQL database), an app client and API keys of two tenants; and the calls that many
service and reliability tests share (upload a dataset, register a model, predict)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from bit_core.checkpoint import WEIGHTS_FILE, read_model_info
from service.app import create_app
from service.auth import create_key
from service.db import migrate
from service.db.artifacts import LocalArtifactStore
from service.db.models import Base, Dataset, Image, Job
from service.db.session import session_scope
from service.models.service import add_model, model_row
from service.settings import Settings
from tests.factories import png_bytes, save_tiny_model

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


def migrated_settings(
    request: pytest.FixtureRequest, home: Path, backend: str = "sqlite", **overrides: object
) -> Settings:
    """Settings on `home` with a migrated database: the embedded SQLite, or the session's
    PostgreSQL database wiped clean (schema kept). The `settings` fixtures call this."""
    if backend == "postgres":
        url = request.getfixturevalue("postgres_url")
        migrate.upgrade(url)
        engine = sa.create_engine(url)
        with engine.begin() as connection:  # a clean slate per test, schema kept
            tables = ", ".join(t for t in Base.metadata.tables if t != "alembic_version")
            connection.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        engine.dispose()
        return make_settings(home, url, **overrides)
    result = make_settings(home, **overrides)
    migrate.upgrade(result.database_url)
    return result


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Migrated settings on SQLite (embedded) and on PostgreSQL; broker is the embedded one."""
    return migrated_settings(request, tmp_path, request.param)


@pytest.fixture
def sqlite_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The embedded default only (for tests that need just one backend)."""
    return migrated_settings(request, tmp_path)


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
    directory = tmp_path_factory.mktemp("template") / "model"
    save_tiny_model(directory, seed=1)
    return directory


# --- calls shared by the service and reliability tests ----------------------------------

# Small enough that tests cross every limit with a few KB of generated images.
SMALL_LIMITS = {
    "max_upload_bytes": 256 * 1024,
    "max_image_bytes": 32 * 1024,
    "max_zip_members": 30,
    "max_classes": 3,
    "max_label_chars": 20,
    "min_images_per_class": 2,
}


def upload(
    client: TestClient,
    headers: dict[str, str],
    images: list[tuple[str, bytes, str]],
    *,
    url: str = "/v1/datasets",
    **form: str,
) -> httpx.Response:
    """POST (filename, bytes, label) triples as `files` + one `labels` field each."""
    files = [("files", (name, data, "application/octet-stream")) for name, data, _ in images]
    labels = [label for _, _, label in images]
    return client.post(url, files=files, data={"labels": labels, **form}, headers=headers)


def upload_zip(
    client: TestClient,
    headers: dict[str, str],
    data: bytes,
    *,
    url: str = "/v1/datasets",
    filename: str = "pets.zip",
) -> httpx.Response:
    return client.post(url, files={"archive": (filename, data, "application/zip")}, headers=headers)


def snapshot(settings: Settings) -> tuple[int, int, frozenset[str]]:
    """(dataset rows, image rows, paths under the artifact store's datasets/ folder)."""
    with session_scope(settings.database_url) as session:
        datasets = session.scalar(select(func.count()).select_from(Dataset))
        images = session.scalar(select(func.count()).select_from(Image))
    root = Path(settings.artifacts_url) / "datasets"
    paths = frozenset(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else ()
    return datasets or 0, images or 0, frozenset(paths)


def store_of(settings: Settings) -> LocalArtifactStore:
    return LocalArtifactStore(settings.artifacts_url)


def register_model(
    settings: Settings, template: Path, *, tenant: str = "acme", name: str = "shapes"
) -> int:
    """What the worker leaves behind: a succeeded job, its model files and a Model row."""
    info = read_model_info(template)
    with session_scope(settings.database_url) as session:
        job = Job(tenant=tenant, kind="finetune", status="succeeded", base_model="R14x0.5")
        session.add(job)
        session.flush()
        key = f"jobs/{job.id}/model"
        shutil.copytree(template, store_of(settings).path(key))
        model = model_row(
            info,
            job=job,
            uri=key,
            size_bytes=(store_of(settings).path(key) / WEIGHTS_FILE).stat().st_size,
            name=name,
        )
        add_model(session, model)  # the next version of `name`, as the worker does
        job.model_id = model.id
        return model.id


def uploads(count: int, seed: int = 0) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"img{i}.png", png_bytes(i, seed), "image/png")) for i in range(count)]


def predict_files(client: TestClient, headers: dict, model_id: int, files: list, top_k="3"):
    return client.post(
        "/v1/predict",
        files=files,
        data={"model_id": str(model_id), "top_k": top_k},
        headers=headers,
    )


def error_of(response) -> tuple[int, str, str]:
    body = response.json()["error"]
    return response.status_code, body["code"], body["message"]


# A plan small enough for a tiny model's job to run in seconds.
SMALL = {"batch_size": 8, "total_steps": 10, "precrop": 40, "crop": 32}


def dataset_rows(settings: Settings, tenant: str = "acme", per_class: int = 3) -> int:
    """A dataset of two classes, as the upload code leaves it (rows only)."""
    with session_scope(settings.database_url) as session:
        dataset = Dataset(tenant=tenant, name="pets")
        session.add(dataset)
        session.flush()
        for label in ("cat", "dog"):
            for i in range(per_class):
                session.add(
                    Image(
                        dataset_id=dataset.id,
                        label=label,
                        sha256=f"{label}{i}".ljust(64, "0"),
                        width=640,
                        height=480,
                        size_bytes=1000,
                        uri=f"datasets/{dataset.id}/{label}{i}",
                    )
                )
        return dataset.id


def finetune(client: TestClient, headers: dict, dataset_id: int, **body: object):
    payload = {"dataset_id": dataset_id, "base_model": "R14x0.5", "overrides": SMALL, **body}
    return client.post("/v1/finetune", json=payload, headers=headers)
