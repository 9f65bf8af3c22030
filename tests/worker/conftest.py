"""Worker tests reuse the service fixtures (settings on SQLite and PostgreSQL)."""

from tests.service.conftest import postgres_url, settings, sqlite_settings  # noqa: F401
