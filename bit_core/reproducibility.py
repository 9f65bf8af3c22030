"""What makes a run repeat: seeded random sources and the deterministic-algorithms switch.

Every random draw of a run comes from its seed through a source made for that purpose and
passed down, never from torch's or NumPy's global state, so other code in the process (a
test, a web request, a library) cannot shift it:

- initial weights: `weights_generator(seed)`, a torch Generator (`bit_core.resnetv2`);
- batches: `StepSampler` draws from NumPy generators seeded by (seed, epoch or step);
- augmentation and MixUp: `augment.step_generator(seed, step)`;
- hold-out and cross-validation folds: `bit_core.holdout`, NumPy generators of the seed.

On a CPU that makes a run bit-identical to another of the same seed, plan, data and
versions. On a GPU some kernels (cuDNN's fastest convolutions, atomic adds) still vary from
run to run; `deterministic_mode` turns on PyTorch's deterministic algorithms for that.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import torch

# Read by the `bit` command (the flag's default) and by the service's settings.
DETERMINISTIC_ENV = "BIT_DETERMINISTIC"
# cuBLAS picks its reduction order by workspace; one fixed configuration makes its matmuls
# repeatable (NVIDIA's documented setting; PyTorch refuses deterministic mode without it).
CUBLAS_WORKSPACE_CONFIG = ":4096:8"
# Salt of the weights' seed: the initial weights and the data order of one seed are
# independent draws (the samplers use [seed, epoch] and [seed, step, salt]).
_WEIGHTS_SALT = 0x3E16


def weights_generator(seed: int) -> torch.Generator:
    """The random source of a run's initial weights: a CPU Generator fixed by `seed`."""
    state = np.random.SeedSequence([seed, _WEIGHTS_SALT]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def deterministic_from_env(environ: dict[str, str] | None = None) -> bool:
    """Whether BIT_DETERMINISTIC asks for deterministic mode (1/true/yes/on).

    Raises:
        ValueError: the variable holds something else; the message lists what it accepts.
    """
    value = (os.environ if environ is None else environ).get(DETERMINISTIC_ENV, "").strip()
    if value.lower() in ("", "0", "false", "no", "off"):
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{DETERMINISTIC_ENV}={value!r}: give 1/true/yes/on or 0/false/no/off")


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Inside: PyTorch's deterministic algorithms and cuDNN's deterministic kernels.

    An operation without a deterministic implementation then raises instead of varying.
    The process's previous settings come back on exit, so a worker that runs one job in
    this mode runs the next as configured. `enabled=False` changes nothing.
    """
    if not enabled:
        yield
        return
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    # cuBLAS reads it once, at the process's first GPU matmul: for the `bit` command that
    # comes later; a worker sets it at start when BIT_DETERMINISTIC is on (worker.celery_app).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False  # benchmarking may pick another kernel each run
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic = saved[2]
        torch.backends.cudnn.benchmark = saved[3]


def deterministic_enabled() -> bool:
    """Whether deterministic algorithms are on now (for the provenance of a run)."""
    return torch.are_deterministic_algorithms_enabled()
