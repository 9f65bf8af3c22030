"""A live service for end-to-end tests: a uvicorn API process and Celery worker processes,
configured only through the environment, as in production."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from service.cli import worker_command
from tests.factories import CLASS_STYLES, draw_example
from tests.polling import free_port, wait_for


def answers_ok(url: str) -> bool:
    """A GET of `url` answers 200 (False while the server is not listening yet)."""
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def png_bytes(style: str, colour: tuple[int, int, int], seed: int) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    Image.fromarray(draw_example(style, colour, np.random.default_rng(seed))).save(buffer, "PNG")
    return buffer.getvalue()


def labeled_uploads(
    per_class: int, seed: int
) -> tuple[list[tuple[str, tuple[str, bytes, str]]], list[str]]:
    """Multipart `files` parts and their labels: per_class images of each class."""
    files, labels = [], []
    for index, (name, (colour, style)) in enumerate(CLASS_STYLES.items()):
        for i in range(per_class):
            data = png_bytes(style, colour, seed * 1000 + index * 100 + i)
            files.append(("files", (f"{name}-{i}.png", data, "image/png")))
            labels.append(name)
    return files, labels


def submit_finetune(client: httpx.Client, plan: dict[str, Any], seed: int = 3) -> int:
    """Upload 5 images of each class with a tiny R14x0.5 fine-tune of `plan`; the job id."""
    files, labels = labeled_uploads(per_class=5, seed=seed)
    response = client.post(
        "/v1/finetune/upload",
        files=files,
        data={"labels": labels, "base_model": "R14x0.5", "overrides": json.dumps(plan)},
    )
    assert response.status_code in (200, 201, 202), response.text
    return int(response.json()["id"])


@dataclass
class LiveService:
    home: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    key: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60
        )

    def _spawn(self, command: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.home / log, "ab") as handle:  # the child keeps its own descriptor
            return subprocess.Popen(
                command,
                env={**os.environ, **self.env},
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def bit(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "service", *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return done.stdout.strip()

    def start(self) -> LiveService:
        self.home.mkdir(parents=True, exist_ok=True)
        self.bit("migrate")
        self.key = self.bit(
            "admin", "create-key", "--role", "user", "--tenant", "e2e"
        ).splitlines()[-1]
        return self.start_api()

    def start_api(self) -> LiveService:
        """Start the API process (again, after `kill_api`) and wait until it is ready."""
        self.api = self._spawn(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "service.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            "api.log",
        )
        wait_for(self._ready, 60, "the API to be ready")
        return self

    def _ready(self) -> bool:
        return answers_ok(f"{self.url}/readyz")

    def kill_api(self) -> None:
        """kill -9 the API process: no shutdown hooks, no cleanup."""
        assert self.api is not None
        os.killpg(self.api.pid, signal.SIGKILL)
        self.api.wait(timeout=30)

    def start_worker(self) -> subprocess.Popen[bytes]:
        worker = self._spawn(
            worker_command(["finetune", "pretrain"], "INFO"), f"worker{len(self.workers)}.log"
        )
        self.workers.append(worker)
        return worker

    def kill_worker(self, worker: subprocess.Popen[bytes]) -> None:
        os.killpg(worker.pid, signal.SIGKILL)  # the whole process group: kill -9, no cleanup
        worker.wait(timeout=30)

    def stop(self) -> None:
        for process in [*self.workers, self.api]:
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}"
            for path in sorted(self.home.glob("*.log"))
        )

    def wait_job(
        self, client: httpx.Client, job_id: int, statuses: tuple[str, ...], timeout: float
    ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            job = client.get(f"/v1/jobs/{job_id}").json()
            return job if job["status"] in statuses else None

        try:
            return wait_for(reached, timeout, f"job {job_id} to reach {statuses}", interval=0.5)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\n{client.get(f'/v1/jobs/{job_id}').json()}\n{self.logs()}"
            ) from exc


def start_redis(home: Path, port: int) -> subprocess.Popen[bytes]:
    """A private redis-server without persistence (so a restart loses queued messages)."""
    server = shutil.which("redis-server")
    assert server, "redis-server is not installed"
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(home),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    wait_for(answers, 20, f"redis on port {port}")
    return process
