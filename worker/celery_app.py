"""The worker's Celery app: the shared configuration plus the task registrations.

Start it with `bit worker` (solo pool: one job at a time per process, and CUDA is never
initialised in a parent that forks).
"""

from __future__ import annotations

import os
import socket

from celery import signals

from bit_core.device import resolve_device
from bit_core.reproducibility import CUBLAS_WORKSPACE_CONFIG
from service.queueing import make_celery
from service.settings import get_settings
from service.webhooks import check_webhook_settings
from worker.metrics import expose
from worker.reconciler import Reconciler
from worker.shutdown import request_shutdown

# Like the API, a worker refuses to start with webhooks on and a missing or short secret.
check_webhook_settings(get_settings())
app = make_celery(get_settings())
app.conf.imports = ("worker.tasks",)
if get_settings().deterministic:
    # cuBLAS sizes its workspace once, at the process's first GPU matmul (an evaluation may
    # come before any training job): fixed before then, deterministic jobs repeat.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


_reconciler: Reconciler | None = None


def set_current_job(job_id: int | None) -> None:
    """Shown on the dashboard's worker list."""
    if _reconciler is not None:
        _reconciler.current_job_id = job_id


@signals.worker_ready.connect
def _start_reconciler(**_: object) -> None:
    """Each worker also reconciles lost and dead jobs, and heartbeats itself."""
    global _reconciler
    settings = get_settings()
    queues = ",".join(sorted(app.amqp.queues.consume_from or app.amqp.queues))
    _reconciler = Reconciler(settings, worker_name(), queues, str(resolve_device(settings.device)))
    _reconciler.start()


@signals.worker_ready.connect
def _serve_metrics(**_: object) -> None:
    """Jobs run, failures, step time and webhook attempts, on BIT_WORKER_METRICS_PORT."""
    expose(get_settings())


@signals.worker_shutting_down.connect
def _stop_running_job(**_: object) -> None:
    """A warm shutdown (SIGTERM, Ctrl-C) stops the running job at its next step; it saves
    its checkpoint and goes back to the queue (worker.shutdown)."""
    request_shutdown()
