"""Run Alembic migrations programmatically (`bit migrate`, and `bit serve` at start).

The migration scripts ship inside the package (service/db/migrations, package data), so an
installed wheel migrates from any working folder; nothing is read from a checkout.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

SCRIPTS = Path(__file__).resolve().parent / "migrations"


def alembic_config(database_url: str) -> Config:
    """Alembic's configuration for `database_url`, built in code (no alembic.ini needed)."""
    if not (SCRIPTS / "env.py").is_file():
        raise RuntimeError(
            f"the migration scripts are missing from {SCRIPTS}: the package is incomplete; "
            "reinstall it (pip install --force-reinstall bit-service)"
        )
    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    config.attributes["url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database to `revision` (creates the SQLite file's folder if needed)."""
    if database_url.startswith("sqlite:///"):
        Path(database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)
