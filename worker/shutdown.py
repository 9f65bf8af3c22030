"""The worker process is shutting down: runs stop at their next step, checkpoint, and put
their job back in the queue, so a restarted (or another) worker resumes it at once.

Celery's warm shutdown (SIGTERM) waits for the running task; without this the task would
train to its end, and a supervisor's stop bound would kill it mid-run instead.
"""

from __future__ import annotations

import threading

_requested = threading.Event()


def request_shutdown() -> None:
    """Called from Celery's worker_shutting_down signal (in the main thread's handler)."""
    _requested.set()


def shutdown_requested() -> bool:
    return _requested.is_set()
