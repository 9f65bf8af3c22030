"""The package as the Docker image installs it, without a Docker engine.

`build_image` reads the Dockerfile, copies what its COPY lines copy into a fresh build
context, and runs its `pip install` line with a fresh venv's pip: the same sources, the
same extras, the same ENV. What it returns, `Installed`, runs the venv's commands from any
folder with none of the checkout on the path, and supervises long-running ones
(`Installed.spawn` -> `Process`, one log file each).

    installed.bin("bit")                      # the venv's console script
    installed.env(data, BIT_X="1")            # the image's ENV (its /data moved to `data`)
    installed.run(["bit", "migrate"], cwd=data, env=env)
    process = installed.spawn("api", ["bit", "api", ...], cwd=data, env=env)
    process.stop()                            # SIGTERM, bounded wait, SIGKILL
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from tests.polling import wait_for

# The pip flag dropped from the Dockerfile's install: an image must not keep pip's cache,
# a test run reuses it (the fresh install takes ~40 s with it, minutes without).
DROPPED_PIP_FLAGS = ("--no-cache-dir",)

# Variables of the test runner's own environment that a container would not have: the
# checkout on the path, the runner's venv, any BIT_ setting the runner was started with.
HOST_ONLY = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")


@dataclass
class Dockerfile:
    """What a local build needs from a Dockerfile: COPY (sources, destination), the ENV,
    the RUN commands and the WORKDIR at each COPY and at the end."""

    copies: list[tuple[list[str], str, PurePosixPath]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    runs: list[tuple[str, PurePosixPath]] = field(default_factory=list)  # (command, workdir)
    workdir: PurePosixPath = field(default_factory=lambda: PurePosixPath("/"))

    @classmethod
    def parse(cls, text: str) -> Dockerfile:
        """Instructions in order; a trailing backslash continues a line, `#` starts a comment."""
        result = cls()
        for instruction, argument in _instructions(text):
            if instruction == "WORKDIR":
                result.workdir = result.workdir / argument  # relative WORKDIRs stack
            elif instruction == "ENV":
                result.env.update(_env_pairs(argument))
            elif instruction == "COPY":
                words = [w for w in _words(argument) if not w.startswith("--")]  # --chown=...
                if len(words) < 2:
                    raise ValueError(
                        f"Dockerfile: COPY needs a source and a destination: {argument}"
                    )
                result.copies.append((words[:-1], words[-1], result.workdir))
            elif instruction == "RUN":
                result.runs.append((argument, result.workdir))
        return result

    def pip_install(self) -> tuple[list[str], PurePosixPath]:
        """The one RUN line that installs the package (its words, its WORKDIR)."""
        installs = [(shlex.split(c), w) for c, w in self.runs if c.startswith("pip install")]
        if len(installs) != 1:
            raise ValueError(
                f"Dockerfile: expected one `RUN pip install ...`, found {len(installs)}"
            )
        return installs[0]


def _instructions(text: str) -> list[tuple[str, str]]:
    logical, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    result = []
    for line in logical:
        instruction, _, argument = line.partition(" ")
        result.append((instruction.upper(), argument.strip()))
    return result


def _words(argument: str) -> list[str]:
    if argument.startswith("["):  # exec form: a JSON array
        import json

        return [str(word) for word in json.loads(argument)]
    return shlex.split(argument)


def _env_pairs(argument: str) -> dict[str, str]:
    words = shlex.split(argument)
    if words and "=" not in words[0]:  # legacy form: ENV KEY value with spaces
        return {words[0]: argument.split(None, 1)[1] if len(words) > 1 else ""}
    return dict(word.split("=", 1) for word in words)


def build_image(root: Path, into: Path) -> Installed:
    """Build the image as `root`'s Dockerfile does, into the empty folder `into`.

    Only COPY'd files reach the build context, so a stale `build/` or egg-info in the
    checkout cannot leak into the install. The other RUN lines (the `bit` user, /data's
    owner) concern the container, not the package, and are not run.
    """
    dockerfile = Dockerfile.parse((root / "Dockerfile").read_text())
    context = into / "context"  # stands for the image's root: /app becomes context/app
    for sources, destination, workdir in dockerfile.copies:
        target = context / (workdir / destination).relative_to("/")
        # Docker: a folder's contents go to the destination; files go into it when it ends
        # with "/" or there are several, else the destination is the file's new name.
        into_folder = destination.endswith("/") or len(sources) > 1
        for source in sources:
            path = root / source
            if not path.exists():
                raise FileNotFoundError(
                    f"Dockerfile: COPY {' '.join(sources)} {destination}: {path} does not "
                    "exist; fix the COPY line or add the file"
                )
            if path.is_dir():
                shutil.copytree(
                    path, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                file_target = target / path.name if into_folder else target
                file_target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, file_target)

    venv = into / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    words, workdir = dockerfile.pip_install()
    command = [str(venv / "bin" / "pip"), *(w for w in words[1:] if w not in DROPPED_PIP_FLAGS)]
    cwd = context / workdir.relative_to("/")
    done = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=600, env=_container_env()
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"the Dockerfile's install failed: {shlex.join(command)} in {cwd}\n"
            f"{(done.stdout + done.stderr)[-4000:]}"
        )
    return Installed(venv=venv, image_env=dockerfile.env, workdir=dockerfile.workdir)


def _container_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in HOST_ONLY and not k.startswith("BIT_")}


@dataclass
class Installed:
    """A venv holding the package as the image installs it, and the image's ENV."""

    venv: Path
    image_env: dict[str, str]
    workdir: PurePosixPath  # the image's final WORKDIR (/data): where its commands run

    def bin(self, name: str) -> Path:
        """A command of the venv (`bit`, `python`, `pip`)."""
        return self.venv / "bin" / name

    def command(self, words: Sequence[str]) -> list[str]:
        """`words` with its first word, when the venv has it, resolved to the venv's."""
        first = self.bin(words[0])
        return [str(first) if first.exists() else words[0], *words[1:]]

    def env(self, data: Path | None = None, /, **overrides: str) -> dict[str, str]:
        """The environment of a process in the container: the runner's, less what points at
        the checkout (PYTHONPATH, its venv, BIT_ settings), the venv's bin/ first on PATH,
        the image's ENV with its WORKDIR (/data) moved to the folder `data`, then
        `overrides`. Without `data`, `overrides` must replace every image ENV value that
        points into /data (BIT_HOME): nothing here writes to this machine's /data."""
        image = {
            k: self._moved(k, v, data) for k, v in self.image_env.items() if k not in overrides
        }
        path = f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**_container_env(), "PATH": path, **image, **overrides}

    def _moved(self, key: str, value: str, data: Path | None) -> str:
        workdir = str(self.workdir)
        if value == workdir or value.startswith(workdir + "/"):
            if data is None:
                raise ValueError(
                    f"the image's ENV {key}={value} points into its {workdir}: pass "
                    f"env(<a folder>) or override {key}"
                )
            return str(data) + value[len(workdir) :]
        return value

    def run(
        self, words: Sequence[str], cwd: Path, env: dict[str, str], timeout: float = 120
    ) -> str:
        """Run a one-shot command to completion; its stdout, or an error with its output."""
        command = self.command(words)
        done = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise AssertionError(
                f"{shlex.join(words)} exited {done.returncode} in {cwd}:\n"
                f"{(done.stdout + done.stderr)[-4000:]}"
            )
        return done.stdout

    def spawn(
        self,
        name: str,
        words: Sequence[str],
        cwd: Path,
        env: dict[str, str],
        log_dir: Path | None = None,
    ) -> Process:
        """Start a long-running command in its own session (so `stop` reaches its children),
        its output in <log_dir or cwd>/<name>.log."""
        log = (log_dir or cwd) / f"{name}.log"
        with open(log, "ab") as handle:  # the child keeps its own descriptor
            popen = subprocess.Popen(
                self.command(words),
                cwd=cwd,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return Process(name, popen, log)


@dataclass
class Process:
    """A process started by `Installed.spawn`: its log, its exit, stopping it."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} (exit {self.popen.poll()}), {self.log}\n{text[-chars:]}"

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to its process group, up to `timeout` s to exit, then SIGKILL."""
        if self.alive():
            os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):  # the group: children it left behind
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)


def tails(processes: Sequence[Process], chars: int = 3000) -> str:
    """The last `chars` of each process's log, for an assertion message."""
    return "\n".join(process.tail(chars) for process in processes)


def wait_while_running(
    processes: Sequence[Process], condition: Callable[[], Any], timeout: float, what: str
) -> Any:
    """`wait_for(condition)`, failing at once if one of `processes` exits meanwhile; either
    failure carries the processes' log tails."""

    def check() -> Any:
        dead = [process for process in processes if not process.alive()]
        if dead:
            raise AssertionError(
                f"{', '.join(p.name for p in dead)} exited while waiting for {what}\n"
                f"{tails(processes)}"
            )
        return condition()

    try:
        return wait_for(check, timeout, what, interval=0.5)
    except AssertionError as exc:
        if "exited while waiting" in str(exc):
            raise
        raise AssertionError(f"{exc}\n{tails(processes)}") from exc
