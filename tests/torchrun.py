"""2-process runs of `bit_core.pretrain_run` under torchrun (gloo, CPU), and their progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.polling import free_port


def torchrun(run_dir: Path, *, max_restarts: int = 0) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--max-restarts",
        str(max_restarts),
        "-m",
        "bit_core.pretrain_run",
        str(run_dir),
    ]
    log = open(run_dir / "torchrun.log", "wb")  # noqa: SIM115 (kept open by the child)
    return subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "progress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
