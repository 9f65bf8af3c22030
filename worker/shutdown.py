"""The worker process is shutting down: runs stop at their next step, checkpoint, and put
their job back in the queue, so a restarted (or another) worker resumes it at once.

Celery's warm shutdown (SIGTERM) waits for the running task; without this the task would
train to its end, and a supervisor's stop bound would kill it mid-run instead.

The shutdown of a worker that `bit serve` started is also bounded here: the process exits
`worker_stop_timeout_s` after the request, whatever it is doing. The supervisor kills a
worker that overruns the bound itself, but a worker whose `bit serve` was killed (it gets
SIGTERM through PR_SET_PDEATHSIG, service.supervisor) has no one left to do so, and must not
linger. Only there: a standalone `bit worker` is stopped by whatever runs it (systemd,
Kubernetes), and a test calling `request_shutdown` in its own process must not be exited.
"""

from __future__ import annotations

import os
import sys
import threading

from service.settings import get_settings
from service.supervisor import SUPERVISOR_PID_ENV

# The exit code of a worker that did not finish its shutdown within the bound.
EXIT_STOP_TIMEOUT = 70

_requested = threading.Event()
_deadline: threading.Timer | None = None


def request_shutdown() -> None:
    """Called from Celery's worker_shutting_down signal (in the main thread's handler)."""
    _requested.set()
    if os.environ.get(SUPERVISOR_PID_ENV):
        bound_shutdown(get_settings().worker_stop_timeout_s)


def shutdown_requested() -> bool:
    return _requested.is_set()


def bound_shutdown(after_s: float) -> None:
    """Exit the process `after_s` from the first call on (later calls change nothing).

    Only the main thread calls this (signal handlers run there), so no lock: one taken in
    a signal handler could deadlock against the code the handler interrupted.
    """
    global _deadline
    if _deadline is not None:
        return
    _deadline = threading.Timer(after_s, _exit_now, args=(after_s,))
    _deadline.daemon = True  # a worker that stops in time is not kept alive by it
    _deadline.start()


def _exit_now(after_s: float) -> None:
    print(
        f"worker: still running {after_s:g} s after its shutdown began "
        "(BIT_WORKER_STOP_TIMEOUT_S); exiting now, the job resumes from its last checkpoint",
        file=sys.stderr,
        flush=True,
    )
    os._exit(EXIT_STOP_TIMEOUT)
