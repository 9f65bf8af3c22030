"""Worker tests reuse the service fixtures (settings on SQLite and PostgreSQL)."""

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

import bit_core.train
import worker.runner
from bit_core.data import LabeledImages
from service.auth import Principal
from service.datasets.service import create_dataset
from service.datasets.uploads import UploadItem
from service.db.artifacts import LocalArtifactStore
from service.db.models import Job, WebhookDelivery
from service.db.session import session_scope
from service.jobs.service import create_finetune_job
from service.settings import Settings
from tests.e2e.live import png_bytes
from tests.factories import CLASS_STYLES, CLASSES, class_png
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


def styled_items(seeds: Iterable[int]) -> list[UploadItem]:
    """Uploads of every class in CLASS_STYLES, one image per seed."""
    seeds = list(seeds)
    return [
        UploadItem(filename=f"{label}-{i}.png", label=label, content=png_bytes(style, colour, i))
        for label, (colour, style) in CLASS_STYLES.items()
        for i in seeds
    ]


def queue_finetune(
    settings: Settings,  # noqa: F811 (the fixture's name)
    items: list[UploadItem],
    *,
    overrides: dict[str, Any],
    name: str = "t",
    mode: str = "full",
    callback_url: str | None = None,
    before_job: Callable[[Session, int], None] | None = None,
    base_model: str = "R14x0.5",
) -> int:
    """A dataset of `items` for tenant acme and a queued fine-tuning job on it (from scratch
    on an R14x0.5 by default), made by the service's own functions; `before_job(session,
    dataset_id)` runs between the two."""
    store = LocalArtifactStore(settings.artifacts_url)
    with session_scope(settings.database_url) as session:
        dataset = create_dataset(session, store, settings, tenant="acme", name=name, items=items)
        if before_job is not None:
            before_job(session, dataset.id)
        job = create_finetune_job(
            session,
            settings,
            principal=Principal(1, "acme", "user"),
            dataset_id=dataset.id,
            base_model=base_model,
            mode=mode,
            overrides=overrides,
            callback_url=callback_url,
        )
        return job.id


# A plan small enough for a tiny model's job to run in seconds.
TINY_PLAN = {"batch_size": 8, "base_lr": 0.01, "precrop": 40, "crop": 32}


def queue_class_images(
    settings: Settings,  # noqa: F811 (the fixture's name)
    *,
    per_class: int,
    mode: str = "full",
    splits: dict[int, str] | None = None,
    **overrides: Any,
) -> int:
    """A dataset of `per_class` images of each class (image i's split from `splits`, else
    train) and a queued job on it."""
    items = [
        UploadItem(
            filename=f"{label}-{i}.png",
            label=label,
            content=class_png(label, seed=i),
            split=(splits or {}).get(i, "train"),
        )
        for label in CLASSES
        for i in range(per_class)
    ]
    return queue_finetune(
        settings, items, overrides={**TINY_PLAN, **overrides}, name="d", mode=mode
    )


class Spy:
    """Records what each run_finetune call got and what the training loop iterated."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict[str, Any]] = []
        self.iterated: list[LabeledImages] = []
        self.stop_first_after: int | None = None
        train, iterate = worker.runner.run_finetune, bit_core.train.iterate_batches

        def run(data: LabeledImages, *args: Any, **kwargs: Any) -> Any:
            self.calls.append({"train": data, **kwargs})
            if len(self.calls) == 1 and self.stop_first_after is not None:
                kwargs["config"] = dataclasses.replace(
                    kwargs["config"], stop_after=self.stop_first_after
                )
            return train(data, *args, **kwargs)

        def batches(data: LabeledImages, *args: Any, **kwargs: Any) -> Any:
            self.iterated.append(data)
            return iterate(data, *args, **kwargs)

        monkeypatch.setattr(worker.runner, "run_finetune", run)
        monkeypatch.setattr(bit_core.train, "iterate_batches", batches)
