"""Fault-injection tools for the reliability suite, built on the e2e LiveService.

- `FileGate`: hold a worker at the moment it opens a file (a checkpoint's temporary file,
  the model's weights), so a kill lands exactly then, not "about then".
- `PostgresCluster`: a private PostgreSQL on a free port that a test may stop and start
  (never the shared server other tests use).
- `small_filesystem`: a size-limited tmpfs for the artifact store (full, read-only).
- `check_invariants` / `orphan_files`: what must hold after any fault, read from the
  database and the artifact store themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import hashlib
import itertools
import os
import select
import shutil
import struct
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from bit_core.checkpoint import load_training_state
from service.db.models import Dataset, Image, Job, JobEvent, JobMetric, Model
from service.jobs.lifecycle import TERMINAL
from tests.e2e.live import LiveService
from tests.polling import wait_for
from tests.service.conftest import POSTGRES_ADMIN_URL

# --- holding a process at the moment it opens a file ----------------------------------------

FAN_CLOEXEC, FAN_CLASS_CONTENT, FAN_MARK_ADD, FAN_MARK_MOUNT = 0x1, 0x4, 0x1, 0x10
FAN_OPEN_PERM, FAN_EVENT_ON_CHILD, FAN_ALLOW = 0x10000, 0x08000000, 0x1
AT_FDCWD = -100
_FAN_EVENT = struct.Struct("IBBHQii")  # fanotify_event_metadata: len, vers, -, hdr, mask, fd, pid
_FAN_RESPONSE = struct.Struct("iI")  # fanotify_response: fd, response


class FileGate(threading.Thread):
    """Holds every process that opens a file in the watched folders until it has looked at
    the open (Linux fanotify permission events), so a kill lands at exactly that moment:
    a checkpoint's temporary file created but not yet written, a model file being saved.

    `arm(match, action)`: the next open whose path matches runs `action(pid, path)` while
    the opener is still held; every open is then allowed (a killed opener never returns).
    """

    def __init__(self) -> None:
        super().__init__(name="file-gate", daemon=True)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.fanotify_mark.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_char_p,
        ]
        self.fd = self._libc.fanotify_init(FAN_CLASS_CONTENT | FAN_CLOEXEC, os.O_RDONLY)
        if self.fd < 0:
            pytest.skip(f"fanotify is not available here: {os.strerror(ctypes.get_errno())}")
        self._armed: tuple[Callable[[str], bool], Callable[[int, str], None]] | None = None
        self._hit = threading.Event()
        self.hit_path = ""
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self.start()

    def watch(self, folder: Path, *, mount: bool = False) -> None:
        """Opens of the files in `folder` (or, with `mount`, anywhere on the mount there)."""
        flags = FAN_MARK_ADD | (FAN_MARK_MOUNT if mount else 0)
        mask = FAN_OPEN_PERM | (0 if mount else FAN_EVENT_ON_CHILD)
        if self._libc.fanotify_mark(self.fd, flags, mask, AT_FDCWD, os.fsencode(folder)):
            raise OSError(ctypes.get_errno(), f"fanotify_mark {folder} failed")

    def arm(self, match: Callable[[str], bool], action: Callable[[int, str], None]) -> None:
        with self._lock:
            self._hit.clear()
            self._armed = (match, action)

    def wait_hit(self, timeout: float, what: str) -> str:
        if not self._hit.wait(timeout):
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        return self.hit_path

    def run(self) -> None:
        held: list[tuple[int, threading.Thread]] = []  # openers waiting for their action
        while not self._closing.is_set():
            for fd, action in list(held):
                if not action.is_alive():
                    self._allow(fd)
                    held.remove((fd, action))
            ready, _, _ = select.select([self.fd], [], [], 0.05 if held else 0.5)
            if not ready:
                continue
            data = os.read(self.fd, 64 * 1024)
            offset = 0
            while offset + _FAN_EVENT.size <= len(data):
                length, _, _, _, _, fd, pid = _FAN_EVENT.unpack_from(data, offset)
                offset += length
                action = self._matching(fd)
                if action is None:
                    self._allow(fd)
                    continue
                # The action runs beside this loop, which keeps allowing other opens: an
                # action that itself opens files on a watched mount must not wait on us.
                path = os.readlink(f"/proc/self/fd/{fd}")
                thread = threading.Thread(target=self._act, args=(action, pid, path))
                thread.start()
                held.append((fd, thread))
        for fd, action in held:
            action.join()
            self._allow(fd)

    def _matching(self, fd: int) -> Callable[[int, str], None] | None:
        if fd < 0:  # FAN_NOFD: the queue overflowed; nothing to answer
            return None
        with self._lock:
            if self._armed is None or not self._armed[0](os.readlink(f"/proc/self/fd/{fd}")):
                return None
            action, self._armed = self._armed[1], None
            return action

    def _act(self, action: Callable[[int, str], None], pid: int, path: str) -> None:
        action(pid, path)
        self.hit_path = path
        self._hit.set()

    def _allow(self, fd: int) -> None:
        if fd >= 0:
            os.write(self.fd, _FAN_RESPONSE.pack(fd, FAN_ALLOW))
            os.close(fd)

    def close(self) -> None:
        self._closing.set()
        self.join(timeout=5)
        os.close(self.fd)  # the kernel allows whatever is still held


# --- a private PostgreSQL --------------------------------------------------------------------

PG_BIN = Path("/usr/lib/postgresql/15/bin")


class PostgresCluster:
    """initdb + pg_ctl on a free port in a temporary folder, run as the `postgres` user
    when the tests run as root (initdb refuses root)."""

    def __init__(self, port: int) -> None:
        if not (PG_BIN / "initdb").exists():
            pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN}")
        self.port = port
        self.folder = Path(tempfile.mkdtemp(prefix="bit-pg-"))
        self.data = self.folder / "data"
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        command = [str(PG_BIN / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200"
        )
        log = str(self.folder / "postgres.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "start")

    def stop(self) -> None:
        """Stop at once (`immediate`: like a crash; clients see their connections drop)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


# --- a small filesystem for the artifact store -----------------------------------------------


@contextlib.contextmanager
def small_filesystem(folder: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of `size_bytes` mounted at `folder` (skips the test where mount is refused)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


def remount(folder: Path, *, read_only: bool) -> None:
    mode = "ro" if read_only else "rw"
    subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], check=True, timeout=30)


@pytest.fixture(name="database")
def fresh_database() -> Iterator[str]:
    """A fresh database on the shared PostgreSQL, so the invariants see this test's rows."""
    name = f"bit_rel_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


# --- worker processes ------------------------------------------------------------------------


def job_row(database_url: str, job_id: int) -> Job | None:
    """A fresh read of a job's row (own connection: safe while databases restart)."""
    engine = sa.create_engine(database_url, poolclass=NullPool)
    try:
        with Session(engine) as session:
            return session.get(Job, job_id)
    finally:
        engine.dispose()


def runner_pid(database_url: str, job_id: int) -> int:
    """The pid of the worker holding job `job_id`'s lease (names are host:pid)."""
    job = job_row(database_url, job_id)
    assert job is not None and job.lease_owner, f"job {job_id} is not leased: {job}"
    return int(job.lease_owner.rsplit(":", 1)[1])


def kill_pid(live: LiveService, pid: int) -> None:
    """kill -9 our worker process `pid` (and its children) and forget it."""
    worker = next((w for w in live.workers if w.pid == pid), None)
    assert worker is not None, f"process {pid} is not one of this test's workers"
    live.kill_worker(worker)
    live.workers.remove(worker)


# --- what must hold after any fault ----------------------------------------------------------


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _aware(at: dt.datetime) -> dt.datetime:
    return at if at.tzinfo else at.replace(tzinfo=dt.UTC)


def check_one_run_at_a_time(job: Job, events: list[JobEvent], metrics: list[JobMetric]) -> int:
    """No two runs of `job` overlapped; returns how many runs it had.

    A new run may start only after the previous one ended (and the job was retried) or the
    reconciler found its lease expired (a `requeued` event between the two starts). And the
    progress points written after each run started go strictly up in step: a second run
    alive at the same time would interleave its own, lower steps.
    """
    starts = [e for e in events if e.kind in ("started", "resumed")]
    for before, after in itertools.pairwise(starts):
        between = [e.kind for e in events if before.id < e.id < after.id]
        assert {"requeued", *TERMINAL} & set(between), (
            f"job {job.id}: run {after.attempt} started with run {before.attempt}'s lease "
            f"never expired: {[e.kind for e in events]}"
        )
    edges = [_aware(e.at) for e in starts] + [dt.datetime.max.replace(tzinfo=dt.UTC)]
    for index, (begin, end) in enumerate(itertools.pairwise(edges)):
        steps = [m.step for m in metrics if begin <= _aware(m.at) < end]
        assert all(a < b for a, b in itertools.pairwise(steps)), (
            f"job {job.id}: progress of run {index + 1} is not one run's: steps {steps}"
        )
    return len(starts)


@dataclass
class Checked:
    jobs: int = 0
    runs: int = 0
    models: int = 0
    checkpoints: int = 0
    images: int = 0


def check_invariants(
    database_url: str, artifacts: Path, *, total_steps: dict[int, int] | None = None
) -> Checked:
    """Every job ended exactly once, no job ran twice at once, each succeeded job has one
    model whose file matches the database (and `total_steps[id]` steps if given), every
    checkpoint is whole, every image row's file exists with the bytes its sha256 names."""
    checked = Checked()
    engine = sa.create_engine(database_url, poolclass=NullPool)
    try:
        with Session(engine) as session:
            for job in session.scalars(sa.select(Job).order_by(Job.id)):
                checked.jobs += 1
                events = list(
                    session.scalars(
                        sa.select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)
                    )
                )
                kinds = [e.kind for e in events]
                assert job.status in TERMINAL, f"job {job.id} is still {job.status}: {kinds}"
                # Each life of the job (a retry starts the next) ends exactly once.
                lives = " ".join(kinds).split("retried")
                ends = [[k for k in life.split() if k in TERMINAL] for life in lives]
                assert all(len(e) == 1 for e in ends), f"job {job.id} ended {ends}: {kinds}"
                assert ends[-1] == [job.status], f"job {job.id} ended {ends}, is {job.status}"
                metrics = list(
                    session.scalars(
                        sa.select(JobMetric)
                        .where(JobMetric.job_id == job.id)
                        .order_by(JobMetric.at, JobMetric.id)
                    )
                )
                checked.runs += check_one_run_at_a_time(job, events, metrics)
                models = list(session.scalars(sa.select(Model).where(Model.job_id == job.id)))
                if job.status == "succeeded":
                    assert [m.id for m in models] == [job.model_id], (job.id, job.model_id)
                    assert job.step == job.total_steps > 0, (job.step, job.total_steps)
                    if total_steps and job.id in total_steps:
                        assert job.step == total_steps[job.id], (job.id, job.step)
                else:
                    assert not models, f"job {job.id} is {job.status} but has models"
                for model in models:
                    weights = artifacts / model.uri / "weights.safetensors"
                    assert sha256_of(weights) == model.sha256, f"model {model.id}: {weights}"
                    assert weights.stat().st_size == model.size_bytes
                    checked.models += 1
                state = artifacts / "jobs" / str(job.id) / "state.safetensors"
                if state.exists():
                    saved = load_training_state(state)  # whole: it parses
                    if job.kind == "finetune" and job.status == "succeeded":
                        assert saved.step == job.step, (job.id, saved.step, job.step)
                    checked.checkpoints += 1
            for image in session.scalars(sa.select(Image)):
                path = artifacts / image.uri
                assert path.is_file(), f"image {image.id} of dataset {image.dataset_id}: no file"
                assert sha256_of(path) == image.sha256, f"image {image.id}: bytes differ"
                checked.images += 1
            datasets = set(session.scalars(sa.select(Dataset.id)))
            with_images = set(session.scalars(sa.select(Image.dataset_id).distinct()))
            assert datasets <= with_images, f"datasets without images: {datasets - with_images}"
    finally:
        engine.dispose()
    return checked


def orphan_files(database_url: str, artifacts: Path) -> list[str]:
    """Files no row references: temporary files, images without their row."""
    engine = sa.create_engine(database_url, poolclass=NullPool)
    try:
        with Session(engine) as session:
            known = set(session.scalars(sa.select(Image.uri)))
    finally:
        engine.dispose()
    found = []
    for path in artifacts.rglob("*"):
        key = path.relative_to(artifacts).as_posix()
        if not path.is_file():
            continue
        if path.name.endswith((".partial", ".swept")) or (
            key.startswith("datasets/") and key not in known
        ):
            found.append(key)
    return sorted(found)


def wait_no_orphans(database_url: str, artifacts: Path, timeout: float) -> None:
    """The worker's sweeper removes what killed processes left; wait until it has."""
    try:
        wait_for(lambda: not orphan_files(database_url, artifacts), timeout, "the orphan sweep")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {orphan_files(database_url, artifacts)}") from exc
