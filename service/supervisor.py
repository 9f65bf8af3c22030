"""`bit serve`'s workers (a WorkerSupervisor each: the job worker and the webhook worker):
started with the API, restarted when they die, stopped within a bound.

- A worker that exits while not asked to (OOM killer, kill -9, a crash) is logged with its
  exit code or signal and started again after a backoff: `worker_restart_backoff_s`,
  doubling up to `worker_restart_backoff_max_s`, back to the start once a worker has run
  `worker_stable_s` (a worker that dies at once is not restarted in a tight loop).
- The dead worker's leases are marked run out (`expire_leases_of`), so the reconciler of
  the next worker re-sends its job on its first pass, and the job resumes from its
  checkpoint, instead of waiting `lease_s` for the lease to run out.
- `stop()` gives the worker a warm shutdown (SIGTERM: its run stops at the next step,
  checkpoints and requeues itself; worker.shutdown) and SIGKILLs it after
  `worker_stop_timeout_s`.
- The worker dies with `bit serve`, even on kill -9: it is started with PR_SET_PDEATHSIG =
  SIGTERM (a warm shutdown, so its job requeues itself), and, told by SUPERVISOR_PID_ENV,
  bounds its own shutdown (worker.shutdown), so an orphan never lingers.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from service.settings import Settings

log = logging.getLogger("bit.supervisor")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Set in a supervised worker's environment (to `bit serve`'s pid): its shutdown is bounded
# (worker.shutdown), so that as an orphan it never lingers.
SUPERVISOR_PID_ENV = "BIT_SUPERVISOR_PID"
# The exit code of a worker that found its parent gone before it could ask to die with it.
EXIT_PARENT_GONE = 75


def describe_exit(returncode: int) -> str:
    """`exited with code 1` or `was killed by SIGKILL` (Popen's negative codes)."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def worker_owner(pid: int) -> str:
    """The lease owner name of the worker process `pid` (worker.celery_app.worker_name: the
    solo-pool worker is the process we start, so its pid is the Popen pid)."""
    return f"{socket.gethostname()}:{pid}"


def die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGTERM when its parent dies.

    Hazards: (1) PDEATHSIG fires when the *thread* that forked the child exits, so the
    supervisor forks from its own thread, which outlives every worker it starts. (2) The
    parent may die between fork and prctl; then the child has already been reparented and
    would never get the signal, so it checks its parent and leaves. libc is loaded here, in
    the parent: the child of a threaded process should do as little as possible.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:
            os._exit(EXIT_PARENT_GONE)

    return preexec


class WorkerSupervisor:
    """Runs `command` as the worker, restarts it when it dies, and stops it on `stop()`."""

    def __init__(
        self,
        settings: Settings,
        command: Sequence[str],
        *,
        expire_leases: Callable[[str], list[int]] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.settings, self.command = settings, list(command)
        self.env = dict(env or {})  # added to the worker's environment
        self.expire_leases = expire_leases or self._expire_leases_in_db
        self.restarts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a worker is started or stopped, never both at once
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor")

    @property
    def pid(self) -> int | None:
        """The current worker's pid (None before the first start)."""
        process = self._process
        return process.pid if process is not None else None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int | None:
        """Warm-shut the worker down, SIGKILL it after the stop bound; returns its exit code
        (None if none was running). Nothing is left behind when this returns."""
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is not None and process.poll() is None:
            bound = self.settings.worker_stop_timeout_s
            log.info(
                "stopping the worker (pid %d); killed if still running in %g s", process.pid, bound
            )
            began = time.monotonic()
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=bound)
            except subprocess.TimeoutExpired:
                log.warning(
                    "the worker (pid %d) did not stop in %g s: killing it", process.pid, bound
                )
                process.kill()
                process.wait()
            log.info(
                "the worker (pid %d) %s, %.1f s after the stop request",
                process.pid,
                describe_exit(process.returncode),
                time.monotonic() - began,
            )
        if self._thread.is_alive():
            # It only marks the worker's leases; a database that does not answer must not
            # keep `bit serve` from exiting (the leases then run out on their own).
            self._thread.join(timeout=10)
        return process.returncode if process is not None else None

    # --- the supervising thread ---------------------------------------------------------

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.command,
            # Its own session: a terminal's Ctrl-C reaches only `bit serve`, which stops the
            # worker with one SIGTERM (a second Ctrl-C would make Celery's shutdown cold).
            start_new_session=True,
            preexec_fn=die_with_parent(os.getpid()),
            env={**os.environ, **self.env, SUPERVISOR_PID_ENV: str(os.getpid())},
        )

    def _supervise(self) -> None:
        delay = self.settings.worker_restart_backoff_s
        while True:
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._process = process = self._spawn()
                except OSError:
                    log.exception("could not start the worker (%s)", " ".join(self.command))
                    process = None
            if process is not None:
                if self.restarts:
                    log.warning("worker restarted (pid %d, restart %d)", process.pid, self.restarts)
                else:
                    log.info("worker started (pid %d)", process.pid)
                began = time.monotonic()
                process.wait()
                ran = time.monotonic() - began
                self._release(process.pid)
                if self._stopping.is_set():
                    return
                log.warning(
                    "the worker (pid %d) %s after %.1f s",
                    process.pid,
                    describe_exit(process.returncode),
                    ran,
                )
                if ran >= self.settings.worker_stable_s:
                    delay = self.settings.worker_restart_backoff_s
            log.warning("restarting the worker in %g s", delay)
            if self._stopping.wait(delay):
                return
            delay = min(2 * delay, self.settings.worker_restart_backoff_max_s)
            self.restarts += 1

    def _release(self, pid: int) -> None:
        owner = worker_owner(pid)
        try:
            jobs = self.expire_leases(owner)
        except Exception:  # the database is down: the leases run out on their own
            log.warning("could not release the leases of worker %s", owner, exc_info=True)
            return
        if jobs:
            log.warning("jobs %s of worker %s resume on the next worker", jobs, owner)

    def _expire_leases_in_db(self, owner: str) -> list[int]:
        from service.db.session import session_scope
        from service.jobs.lifecycle import expire_leases_of
        from service.webhooks.outbox import expire_delivery_leases_of

        with session_scope(self.settings.database_url) as session:
            expire_delivery_leases_of(session, owner)  # a webhook worker's POSTs in flight
            return expire_leases_of(session, owner)
