"""Fake Slurm commands for tests: `python commands.py sbatch|scancel|squeue|scontrol|srun ...`
(the test puts wrappers of these names first on PATH). Each call appends a JSON line to
$FAKE_SLURM_DIR/calls.jsonl; the jobs' state lives in $FAKE_SLURM_DIR/jobs/<id>/.

Like Slurm: `sbatch --parsable --wait` prints the job id at once, then runs the script with
bash as the batch step and exits when it ends, non-zero for a cancelled job; `srun` (a job
step) records its argv and runs until `scancel` cancels the job. Every wait is bounded.
$FAKE_SLURM_CLUSTER makes sbatch print "id;cluster" as a federated cluster does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

TIMEOUT_S = 30.0  # a job nobody cancels ends by itself (exit 3) after this long
POLL_S = 0.02
FIRST_ID = 1000


def state_dir() -> Path:
    return Path(os.environ["FAKE_SLURM_DIR"])


def job_dir(job_id: str) -> Path:
    return state_dir() / "jobs" / job_id


def is_cancelled(job_id: str) -> bool:
    return (job_dir(job_id) / "cancelled").exists()


def record(command: str, argv: list[str], **extra: object) -> None:
    entry = {"cmd": command, "argv": argv, "pid": os.getpid(), **extra}
    with open(state_dir() / "calls.jsonl", "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def new_job() -> str:
    (state_dir() / "jobs").mkdir(exist_ok=True)
    for number in range(FIRST_ID, FIRST_ID + 1000):
        try:
            job_dir(str(number)).mkdir()  # atomic: concurrent sbatch calls get distinct ids
        except FileExistsError:
            continue
        return str(number)
    raise SystemExit("fake sbatch: out of job ids")


def sbatch(argv: list[str]) -> int:
    job_id = new_job()
    record("sbatch", argv, job_id=job_id)
    cluster = os.environ.get("FAKE_SLURM_CLUSTER")
    if "--parsable" in argv:
        print(f"{job_id};{cluster}" if cluster else job_id, flush=True)
    else:
        print(f"Submitted batch job {job_id}", flush=True)
    if "--wait" not in argv:
        return 0
    env = {**os.environ, "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "node-a"}
    with open(job_dir(job_id) / "output.log", "ab") as output:
        step = subprocess.run(["bash", argv[-1]], env=env, stdout=output, stderr=output)
    if is_cancelled(job_id):
        print(f"sbatch: error: Job {job_id} ended with state CANCELLED", file=sys.stderr)
        return 1
    return step.returncode


def srun(argv: list[str]) -> int:
    job_id = os.environ["SLURM_JOB_ID"]
    record("srun", argv, job_id=job_id)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if is_cancelled(job_id):
            return 1  # what srun says of a step Slurm killed
        time.sleep(POLL_S)  # polling interval, bounded by the deadline
    return 3


def scancel(argv: list[str]) -> int:
    record("scancel", argv)
    code = 0
    for job_id in (a for a in argv if not a.startswith("-")):
        if job_dir(job_id).is_dir():
            (job_dir(job_id) / "cancelled").touch()
        else:
            print(f"scancel: error: Invalid job id {job_id}", file=sys.stderr)
            code = 1
    return code


def squeue(argv: list[str]) -> int:
    record("squeue", argv)
    job_id = next(a.removeprefix("--jobs=") for a in argv if a.startswith("--jobs="))
    if not job_dir(job_id).is_dir():
        print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
        return 1
    if not is_cancelled(job_id):
        print("RUNNING")
    return 0


def scontrol(argv: list[str]) -> int:
    record("scontrol", argv)
    assert argv[:2] == ["show", "hostnames"], argv
    print("\n".join(argv[2].split(",")))
    return 0


COMMANDS = {
    "sbatch": sbatch,
    "srun": srun,
    "scancel": scancel,
    "squeue": squeue,
    "scontrol": scontrol,
}

if __name__ == "__main__":
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
