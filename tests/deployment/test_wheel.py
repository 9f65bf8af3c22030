"""The package as installed by the Dockerfile, run from a folder outside the checkout with
nothing of the checkout on the path: what a user of the image (or of `pip install`) runs."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.deployment.conftest import ROOT, finetune_and_predict
from tests.deployment.installed import Installed, Process, wait_while_running
from tests.e2e.conftest import service_env
from tests.e2e.live import answers_ok
from tests.polling import free_port

pytestmark = [pytest.mark.deployment, pytest.mark.slow, pytest.mark.services]


def packages() -> list[str]:
    """The top-level packages pyproject.toml ships (`bit_core*` -> bit_core)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    return [name.rstrip("*") for name in include]


def head_revision(database_url: str) -> str:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            query = sa.text("SELECT version_num FROM alembic_version")
            return str(connection.execute(query).scalar_one())
    finally:
        engine.dispose()


def test_every_package_and_its_data_import_from_the_venv(installed: Installed, tmp_path: Path):
    env = installed.env(tmp_path)
    assert "PYTHONPATH" not in env
    probe = (
        "import importlib, pathlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    print(pathlib.Path(importlib.import_module(name).__file__).resolve())\n"
    )
    found = installed.run(["python", "-c", probe, *packages()], cwd=tmp_path, env=env).split()
    venv = installed.venv.resolve()
    for name, file in zip(packages(), found, strict=True):
        assert Path(file).is_relative_to(venv), f"{name} imports from {file}, not the venv {venv}"
        assert not Path(file).is_relative_to(ROOT), f"{name} imports from the checkout: {file}"
    service = Path(found[packages().index("service")]).parent
    # Package data the installed commands read: Alembic's scripts, the dashboard's pages.
    assert list((service / "db" / "migrations" / "versions").glob("*.py")), "no migrations"
    assert (service / "db" / "migrations" / "env.py").exists()
    assert list((service / "dashboard" / "templates").glob("*.html")), "no dashboard templates"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_bit_migrate_from_any_folder(
    installed: Installed, tmp_path: Path, backend: str, request: pytest.FixtureRequest
):
    if backend == "postgres":
        url = request.getfixturevalue("fresh_database")
        env = installed.env(tmp_path, BIT_DATABASE_URL=url)
    else:
        url = f"sqlite:///{tmp_path / 'bit.db'}"  # the image's BIT_HOME, moved to tmp_path
        env = installed.env(tmp_path)
    out = installed.run(["bit", "migrate"], cwd=tmp_path, env=env)
    assert "database is up to date" in out
    revision = head_revision(url)
    installed.run(["bit", "migrate"], cwd=tmp_path, env=env)  # a second run changes nothing
    assert head_revision(url) == revision


def test_bit_serve_finetunes_and_predicts(installed: Installed, tmp_path: Path):
    env = installed.env(tmp_path, **service_env(tmp_path))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = installed.spawn("serve", ["bit", "serve", "--port", str(port)], cwd=tmp_path, env=env)
    try:
        wait_while_running([serve], lambda: answers_ok(f"{url}/readyz"), 90, "bit serve's readyz")
        assert (tmp_path / "bit.db").exists(), serve.tail()  # the embedded default, in $BIT_HOME
        key = installed.run(["bit", "admin", "create-key"], cwd=tmp_path, env=env).strip()
        finetune_and_predict(url, key.splitlines()[-1], [serve])
    finally:
        serve.stop(timeout=40)


def test_bit_api_alone_answers_readyz(installed: Installed, tmp_path: Path):
    env = installed.env(tmp_path, **service_env(tmp_path))
    installed.run(["bit", "migrate"], cwd=tmp_path, env=env)
    port = free_port()
    command = ["bit", "api", "--host", "127.0.0.1", "--port", str(port)]
    api: Process = installed.spawn("api", command, cwd=tmp_path, env=env)
    try:
        wait_while_running(
            [api], lambda: answers_ok(f"http://127.0.0.1:{port}/readyz"), 60, "bit api's readyz"
        )
    finally:
        api.stop()
