"""Gauges counted from the database at each scrape of GET /metrics.

A gauge set when something happens keeps its last value when that thing stops happening (a
status whose last job moved on would still show its old count), so these are not stored
instruments: a collector runs one grouped query per gauge at every scrape and yields every
known label value, zero included. With the database down the scrape still answers:
`bit_metrics_db_up` reads 0 and the counted gauges are left out (missing, not zero).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.dashboard.queries import alive_workers
from service.db.models import Job, WebhookDelivery
from service.jobs.status import JobStatus
from service.metrics import REGISTRY
from service.settings import JOB_KINDS, Settings

log = logging.getLogger(__name__)


class DatabaseGauges:
    """A Prometheus collector of jobs by status and kind, workers alive and webhook
    deliveries pending, read through `session` when collected."""

    def __init__(self, session: Session, settings: Settings) -> None:
        self.session, self.settings = session, settings

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "bit_metrics_db_up",
            "1 if the database answered this scrape; 0: the counted gauges are missing",
        )
        try:
            jobs = self.session.execute(
                select(Job.status, Job.kind, func.count()).group_by(Job.status, Job.kind)
            ).all()
            workers = alive_workers(self.session, self.settings)
            pending = self.session.scalar(
                select(func.count())
                .select_from(WebhookDelivery)
                .where(WebhookDelivery.state == "pending")
            )
        except SQLAlchemyError as exc:
            self.session.rollback()
            log.warning("metrics: the database did not answer (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        counts = {(status.value, kind): 0 for status in JobStatus for kind in JOB_KINDS}
        counts.update({(status, kind): count for status, kind, count in jobs})
        by_status = GaugeMetricFamily(
            "bit_jobs", "Jobs by status and kind, counted at this scrape", labels=["status", "kind"]
        )
        for (status, kind), count in sorted(counts.items()):
            by_status.add_metric([status, kind], count)
        yield by_status
        yield GaugeMetricFamily(
            "bit_workers_alive",
            "Workers whose heartbeat is recent (the dashboard's alive workers)",
            value=workers,
        )
        yield GaugeMetricFamily(
            "bit_webhook_deliveries_pending",
            "Job callbacks not yet delivered and not given up",
            value=pending or 0,
        )


def scrape_registry(session: Session, settings: Settings) -> CollectorRegistry:
    """What one scrape reads: this process's instruments, then the counts read now."""
    registry = CollectorRegistry()
    registry.register(REGISTRY)
    registry.register(DatabaseGauges(session, settings))
    return registry
