"""Worker tests reuse the service fixtures (settings on SQLite and PostgreSQL)."""

from sqlalchemy import select

from service.db.models import Job, WebhookDelivery
from service.db.session import session_scope
from service.settings import Settings
from tests.service.conftest import postgres_url, settings, sqlite_settings  # noqa: F401


def job_row(settings: Settings, job_id: int) -> Job:  # noqa: F811 (the fixture's name)
    """The job's row as the database holds it now (detached)."""
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


# Webhooks on, to the tests' loopback receivers only.
WEBHOOKS = {
    "webhook_secret": "worker-tests-webhook-secret-0123456789",
    "webhook_allow": "127.0.0.1",
}


def delivery_ids(settings: Settings, job_id: int) -> list[int]:  # noqa: F811
    """The job's webhook deliveries, oldest first."""
    with session_scope(settings.database_url) as session:
        query = select(WebhookDelivery.id).where(WebhookDelivery.job_id == job_id)
        return list(session.scalars(query.order_by(WebhookDelivery.occurrence)))
