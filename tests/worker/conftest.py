"""Worker tests reuse the service fixtures (settings on SQLite and PostgreSQL)."""

from service.db.models import Job
from service.db.session import session_scope
from service.settings import Settings
from tests.service.conftest import postgres_url, settings, sqlite_settings  # noqa: F401


def job_row(settings: Settings, job_id: int) -> Job:  # noqa: F811 (the fixture's name)
    """The job's row as the database holds it now (detached)."""
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job
