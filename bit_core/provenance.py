"""Provenance: what made a model or a checkpoint, recorded with it.

A saved model keeps it in `model.json` (`ModelInfo.provenance`), a training checkpoint in
its metadata (`meta["provenance"]`, never compared on resume: a run may resume on another
host or version), a pre-training run beside its result. With it, a model can be traced to
its seed, plan, data and base weights, and retrained bit-identically on the same kind of
machine and versions (README, "Reproducibility").
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bit_core.device import resolve_precision
from bit_core.reproducibility import deterministic_enabled

DISTRIBUTION = "bit-service"
GIT_TIMEOUT_S = 5.0


@functools.lru_cache(maxsize=1)
def package_version() -> str | None:
    """This project's installed version; None when it runs from sources not installed."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs: unknown, not fatal
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# Cached for the process: the code that runs is the code imported at its start, even if
# the checkout moves on meanwhile.
@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """(commit, whether tracked files differ from it) of the checkout this package runs
    from; (None, None) for an installed wheel or where git cannot tell."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None, None
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return None, None
    changes = _git(root, "status", "--porcelain", "--untracked-files=no")
    return commit, None if changes is None else bool(changes)


def device_description(device: torch.device) -> str:
    """'cpu (N threads)' or 'cuda:0 (the GPU's name)': what ran the arithmetic."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        # The thread count can change how oneDNN splits a reduction, hence the last bits.
        return f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"
    return str(device)


def run_provenance(
    *,
    seed: int,
    plan: Mapping[str, Any],
    device: torch.device,
    precision: str,
    deterministic: bool = False,
    base_model: str | None = None,
    base_sha256: str | None = None,
    dataset_version: Mapping[str, Any] | None = None,
    data: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a run is made of, as JSON data.

    Args:
        seed: the run's seed (weights, batches, augmentation, hold-out).
        plan: the resolved plan (`Plan.to_dict()`, `UpstreamPlan.to_dict()`).
        device, precision: where and in what precision it trains ("auto" is resolved).
        deterministic: deterministic mode was asked for; also recorded as on when the
            process had PyTorch's deterministic algorithms on anyway.
        base_model, base_sha256: the base it starts from and its weights file's sha256
            (None, None: from scratch).
        dataset_version: the dataset version it learned from, where one exists (the service:
            dataset id, version id and number).
        data: where its images came from, as given (a folder or manifest of the CLI).
        extra: further entries (e.g. the world size of a data-parallel run).

    Returns:
        {"seed", "plan", "dataset_version", "data", "base_model", "base_sha256",
        "bit_service_version", "git_commit", "git_dirty", "python_version", "torch_version",
        "cuda_version", "cudnn_version", "device", "precision", "deterministic", ...extra};
        unknown entries are None.
    """
    commit, dirty = git_state()
    on_cuda = device.type == "cuda"
    return {
        "seed": seed,
        "plan": dict(plan),
        "dataset_version": dict(dataset_version) if dataset_version is not None else None,
        "data": data,
        "base_model": base_model,
        "base_sha256": base_sha256,
        "bit_service_version": package_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if on_cuda else None,
        "cudnn_version": torch.backends.cudnn.version() if on_cuda else None,
        "device": device_description(device),
        "precision": resolve_precision(device, precision),
        "deterministic": deterministic or deterministic_enabled(),
        **(extra or {}),
    }
