"""The Celery app both sides build from the same settings.

The API only sends tasks by name (it never imports `worker/`); the worker registers them.
Celery carries "run job N" and "send webhook delivery N", nothing else: the database holds
every result.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from service.settings import QUEUE_FOR_KIND, QUEUES, WEBHOOK_QUEUE, Settings

TASK_FOR_KIND = {"finetune": "bit.finetune", "pretrain": "bit.pretrain", "evaluate": "bit.evaluate"}
WEBHOOK_TASK = "bit.webhook"


def broker_options(settings: Settings) -> dict[str, object]:
    if settings.broker_url.startswith("filesystem://"):
        folder = settings.broker_folder
        for sub in ("processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(folder / "processed"),
            # Otherwise kombu writes its control exchanges into the current directory.
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    # Redis re-delivers unacked messages after visibility_timeout (default 1 h, which would
    # re-run long jobs): make it longer than any job. The DB lease is the second guard.
    options: dict[str, object] = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.broker_key_prefix:
        options["global_keyprefix"] = settings.broker_key_prefix
    return options


def make_celery(settings: Settings) -> Celery:
    app = Celery("bit", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(name, routing_key=name) for name in QUEUES],
        task_create_missing_queues=False,  # explicit queues; an unknown one is refused
        task_default_queue="finetune",
        task_routes={
            **{task: {"queue": QUEUE_FOR_KIND[kind]} for kind, task in TASK_FOR_KIND.items()},
            WEBHOOK_TASK: {"queue": WEBHOOK_QUEUE},
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


_clients: dict[str, Celery] = {}


def celery_client(settings: Settings) -> Celery:
    """A client per broker, built once per process (its connection pool is reused)."""
    key = f"{settings.broker_url}|{settings.broker_folder}"
    if key not in _clients:
        _clients[key] = make_celery(settings)
    return _clients[key]


def enqueue_job(settings: Settings, job_id: int, kind: str) -> None:
    """Send 'run job N' to the job kind's queue (QUEUE_FOR_KIND)."""
    if kind not in TASK_FOR_KIND:
        raise ValueError(f"unknown job kind '{kind}'; expected one of {sorted(TASK_FOR_KIND)}")
    celery_client(settings).send_task(
        TASK_FOR_KIND[kind], args=[job_id], queue=QUEUE_FOR_KIND[kind]
    )


def enqueue_webhook(settings: Settings, delivery_id: int, *, countdown: float = 0.0) -> None:
    """Send 'deliver webhook N' to the webhooks queue, to run `countdown` seconds from now."""
    celery_client(settings).send_task(
        WEBHOOK_TASK, args=[delivery_id], queue=WEBHOOK_QUEUE, countdown=countdown or None
    )
