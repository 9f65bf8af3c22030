"""What every benchmark script shares: load and CPU accounting, the report's header lines,
and the marked sections of BENCHMARKS.md that each run replaces.

The machines these run on are shared (2 cores, other engineers' tests), so every script
waits (bounded) for a quiet machine, interleaves the paths it compares round by round,
re-runs rounds that other processes disturbed, and writes down how loaded it was.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# The service benchmarks reuse the e2e tests' live-service helpers (tests/e2e/live.py); an
# editable install exposes only the packages, so put the checkout itself on the path.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

SECTION_BEGIN = "<!-- {tag}:begin {key} -->"
SECTION_END = "<!-- {tag}:end {key} -->"
FILE_HEADER = """# Speed

Figures written by the scripts in `benchmarks/` (`make bench` runs them all). Each run
replaces only its own section (keyed by script, device, torch version and options); text
outside the sections is kept.
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- CPU accounting: how much did other processes run while we measured? --------------------


def _busy_jiffies() -> float | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return float(user + nice + system + irq + softirq + steal)


def _own_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class CpuWatch:
    """Average number of cores used by *other* processes between start and stop.

    `exclude` returns the CPU seconds used so far by processes of ours that are not
    waited-for children (a server under test, DataLoader workers still alive), which
    RUSAGE_CHILDREN does not count yet.
    """

    def __init__(self, exclude: Callable[[], float] | None = None) -> None:
        self.exclude = exclude or (lambda: 0.0)
        self.busy0, self.t0 = _busy_jiffies(), time.perf_counter()
        self.own0 = _own_cpu_s() + self.exclude()

    def own_cores(self) -> float:
        wall = time.perf_counter() - self.t0
        own = _own_cpu_s() + self.exclude() - self.own0
        return own / wall if wall > 0 else 0.0

    def others_cores(self) -> float | None:
        busy = _busy_jiffies()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        total_s = (busy - self.busy0) / os.sysconf("SC_CLK_TCK")
        own_s = _own_cpu_s() + self.exclude() - self.own0
        return max(0.0, (total_s - own_s) / wall) if wall > 0 else None


def process_cpu_s(pid: int) -> float:
    """utime + stime of a live process (0 once it is gone), from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class RoundPolicy:
    """A timed round during which other processes used more than `max_others` cores on
    average is thrown away and run again, at most `max_redo` times per block."""

    max_others: float = 0.5
    max_redo: int = 3
    redone: int = 0
    contended_kept: int = 0
    others: list[float] = field(default_factory=list)
    exclude: Callable[[], float] | None = None  # see CpuWatch

    def run(self, rounds: int, one_round: Callable[[int], Any]) -> list[Any]:
        kept: list[Any] = []
        index = 0
        while len(kept) < rounds:
            watch = CpuWatch(self.exclude)
            data = one_round(index)
            index += 1
            others = watch.others_cores()
            if others is not None and others > self.max_others:
                if self.redone < self.max_redo:
                    self.redone += 1
                    log(f"round disturbed (others used {others:.1f} cores): running it again")
                    continue
                self.contended_kept += 1
            self.others.append(others or 0.0)
            kept.append(data)
        return kept

    def summary(self) -> str:
        parts = []
        if self.redone:
            parts.append(f"{self.redone} disturbed round(s) re-run")
        if self.contended_kept:
            parts.append(f"{self.contended_kept} kept although disturbed")
        return ", ".join(parts)

    def note(self, name: str, gate: str = "") -> str:
        """'name: <mean other cores> (re-runs, gate)' for the report's load line."""
        others = statistics.mean(self.others) if self.others else None
        extra = ", ".join(part for part in (self.summary(), gate) if part)
        return f"{name}: {_num(others, 2)}" + (f" ({extra})" if extra else "")


# --- load -------------------------------------------------------------------------------------


def wait_for_quiet(max_load: float, retries: int, wait_s: float) -> tuple[float, int, bool]:
    """Wait (bounded) until the 1-minute load average drops below `max_load`."""
    load = os.getloadavg()[0]
    for attempt in range(retries + 1):
        load = os.getloadavg()[0]
        if load < max_load:
            return load, attempt, True
        if attempt < retries:
            log(f"1-min load average {load:.2f} >= {max_load}: waiting {wait_s:.0f} s")
            time.sleep(wait_s)
    return load, retries, False


def quiet_gate(name: str, max_others: float, waits: int, wait_s: float) -> str:
    """Before a block: sample other processes' CPU use for 3 s while we sleep; wait
    (bounded) while it is above `max_others` cores. Returns a note for the report."""
    others = None
    for attempt in range(waits + 1):
        watch = CpuWatch()
        time.sleep(3.0)
        others = watch.others_cores()
        if others is None or others <= max_others:
            return "" if attempt == 0 else f"waited {attempt} × {wait_s:.0f} s before it"
        if attempt < waits:
            log(f"{name}: other processes use {others:.1f} cores; waiting {wait_s:.0f} s")
            time.sleep(wait_s)
    return f"other processes still used {others:.1f} cores at its start"


def raise_priority(increment: int = -5) -> str:
    """Run ahead of the other engineers' tests where allowed (root); say what happened."""
    try:
        return f"nice {os.nice(increment)}"
    except OSError:
        return f"default priority (nice {os.nice(0)}; raising it is not permitted here)"


def script_parser(doc: str) -> argparse.ArgumentParser:
    """--device, --out and the load options, which every new script takes."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--out", type=Path, help="write/update this run's section in a file")
    add_load_args(parser)
    return parser


def add_load_args(parser: Any, *, max_load: float = 1.5) -> None:
    """The load options every script takes (same meaning as engine_speed.py's)."""
    parser.add_argument("--max-load", type=float, default=max_load, help="1-min load to start")
    parser.add_argument("--load-retries", type=int, default=5)
    parser.add_argument("--load-wait", type=float, default=60.0, help="seconds per retry")
    parser.add_argument(
        "--max-others",
        type=float,
        default=0.5,
        help="a timed round during which other processes used more cores than this is re-run",
    )
    parser.add_argument("--max-redo", type=int, default=3, help="re-runs per block (3)")
    parser.add_argument("--block-waits", type=int, default=2, help="30 s waits per block (2)")


# --- report -----------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def pick_device(name: str) -> torch.device | None:
    """auto | cpu | cuda; None (with a message) when CUDA is asked for and absent."""
    if name == "cuda" and not torch.cuda.is_available():
        print(
            f"CUDA is not available on this machine (torch {torch.__version__}): no GPU "
            "figures measured. Run on a GPU host, or use --device cpu.",
            file=sys.stderr,
        )
        return None
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@dataclass
class RunInfo:
    """When, where and how loaded a run was: the header lines of its section."""

    device: torch.device
    started: dt.datetime
    began: float
    load: float
    load_waits: int
    quiet: bool
    priority: str

    @classmethod
    def start(cls, device: torch.device, args: Any) -> RunInfo:
        priority = raise_priority()
        load, waits, quiet = wait_for_quiet(args.max_load, args.load_retries, args.load_wait)
        log(f"device {device}, torch {torch.__version__}, load {load:.2f}, {priority}")
        return cls(
            device, dt.datetime.now(dt.UTC), time.perf_counter(), load, waits, quiet, priority
        )

    def header(self, title: str, args: Any, load_notes: list[str], threads: str = "") -> str:
        gpu = f", {torch.cuda.get_device_name(self.device)}" if self.device.type == "cuda" else ""
        command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
        load_line = f"1-min load average {self.load:.2f} at start" + (
            f" (after waiting {self.load_waits} × {args.load_wait:.0f} s)"
            if self.load_waits
            else ""
        )
        if not self.quiet:
            load_line += (
                f" — still ≥ {args.max_load} after {args.load_retries} retries: other work "
                "was running, figures may be noisy"
            )
        elapsed = (time.perf_counter() - self.began) / 60
        threads = threads or (
            f"torch threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})"
        )
        return "\n".join(
            [
                f"### {title} · {self.device.type.upper()} · torch {torch.__version__}",
                "",
                f"- Machine: {cpu_model()}, {os.cpu_count()} logical CPUs{gpu}; {threads}; "
                f"{self.priority}",
                f"- torch {torch.__version__}, Python {platform.python_version()}",
                f"- Date (UTC): {self.started:%Y-%m-%d %H:%M}; run took {elapsed:.1f} min",
                f"- Command: `{command}`",
                f"- Load: {load_line}. Other processes' CPU use during the kept timed rounds "
                f"(average cores; a round above {args.max_others} is re-run, at most "
                f"{args.max_redo} per block): " + "; ".join(load_notes),
            ]
        )


def write_section(path: Path, tag: str, key: str, body: str) -> None:
    """Replace the section `tag`/`key` of `path` (or append it); keep everything else."""
    begin, end = SECTION_BEGIN.format(tag=tag, key=key), SECTION_END.format(tag=tag, key=key)
    text = path.read_text() if path.exists() else FILE_HEADER
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def section_key(device: torch.device, *parts: str) -> str:
    return " ".join([device.type, f"torch-{torch.__version__}", *[p for p in parts if p]])


def publish(body: str, out: Path | None, tag: str, key: str) -> int:
    """Print the section; with `out`, write it there too. Returns the exit status (0)."""
    print(body)
    if out:
        write_section(out, tag, key, body)
        log(f"wrote section '{tag}: {key}' in {out}")
    return 0


def photo_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A JPEG of smooth colour blobs with noise (compresses and decodes like a photo)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 40 + 1, width // 40 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, 10, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between order statistics."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
