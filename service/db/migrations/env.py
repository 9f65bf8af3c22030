"""Alembic environment: the URL comes from the service settings (or -x url=...)."""

from __future__ import annotations

from alembic import context

from service.db.models import Base
from service.db.session import get_engine
from service.settings import get_settings


def _url() -> str:
    return context.get_x_argument(as_dictionary=True).get("url") or (
        context.config.attributes.get("url") or get_settings().database_url
    )


def run_migrations() -> None:
    url = _url()
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    with get_engine(url).connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=url.startswith("sqlite"),  # SQLite cannot ALTER most things
        )
        with context.begin_transaction():
            context.run_migrations()


run_migrations()
