"""Which threads of the API process may run torch, and why.

PyTorch's CPU build runs its parallel ops on GNU OpenMP (libgomp). Every thread that runs
a parallel op becomes the master of its own team of worker threads, kept while that thread
lives. Once a process holds more OpenMP threads than it has CPUs, libgomp's workers stop
spinning between ops and sleep instead, so every op of every forward pays a wake-up: a
forward on all the cores then runs slower than on one thread.

So in the API process:

- forwards run on the one forward thread (`Batcher`), the only long-lived team;
- decode threads and the event loop run no parallel torch op (`Predictor.preprocess` is
  NumPy and a resize kernel that runs serially, `bit_core.images.TORCH_RESIZE`; what the
  loop does with probabilities is far below torch's parallel grain);
- occasional heavy work (loading a model) runs on a fresh thread
  that exits when done, which takes its team with it.

With the onnxruntime backend a backbone's forward runs on its session's own thread pool
(one per loaded backbone, sized like torch's); only the pool that just ran spins, and the
forward thread still runs the heads in torch.

A GPU is not affected: its kernels run on the device whichever thread launches them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def run_in_fresh_thread(fn: Callable[[], T], *, name: str) -> Future[T]:
    """Run `fn` on a new thread that exits when it returns; its result as a Future."""
    future: Future[T] = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the waiter, who re-raises it
            future.set_exception(exc)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future


async def to_fresh_thread(fn: Callable[[], T], *, name: str) -> T:
    """`run_in_fresh_thread`, awaited from the event loop."""
    return await asyncio.wrap_future(run_in_fresh_thread(fn, name=name))
