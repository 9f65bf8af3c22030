"""Dynamic batching: concurrent predict calls for one model share a forward pass.

Each model has a lane: a queue of preprocessed row chunks and a collector task. The
collector takes the oldest chunk and, while other calls for the model are still on their
way (their images decoding), waits at most `max_wait_s` for them (or until
`max_batch_size` rows); then it runs one forward for all it has. While that forward runs,
new calls queue up, so under load batches grow by themselves, and a lone call does not
wait at all: waiting for calls nobody has sent would slow every quiet predict. A lane's
collector exits when its queue is empty; the next call starts a new one, so idle models
cost nothing.

Models that share a backbone (linear models of one base) share a lane: the lane's key is
the backbone, each call brings its model's `finish` (head, temperature, softmax), and a
batch that mixes such models runs one backbone forward, then each call's head on its rows.

Every forward, of every model, runs on one dedicated thread: the event loop never blocks
on a model, and forwards never compete with each other for the CPU cores (PyTorch
already uses them all inside one forward).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from service.errors import ApiError
from service.inference.timing import PredictTiming
from service.metrics import PREDICT_BATCH

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]
"""A model forward: preprocessed rows (N, ...) -> probabilities (N, C), or a shared
backbone's features (N, F) that each call's `Finish` turns into its probabilities."""

Finish = Callable[[torch.Tensor], torch.Tensor]
"""One model's last step on its own rows of a shared forward: features -> probabilities."""

T = TypeVar("T")


def _shutting_down() -> ApiError:
    return ApiError(
        503,
        "shutting_down",
        "the server is shutting down; retry the request in a few seconds",
        retry_after=5,
    )


def _given(rows: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: rows


def _finished(forward: Forward, finish: Finish | None) -> Forward:
    """`forward` followed by `finish`: one call's whole computation."""
    if finish is None:
        return forward
    return lambda rows: finish(forward(rows))


@dataclass
class _Chunk:
    forward: Forward
    rows: torch.Tensor
    future: asyncio.Future[torch.Tensor]
    timing: PredictTiming | None = None
    finish: Finish | None = None
    ready_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Lane:
    """One model's waiting chunks and the task that batches them."""

    queue: deque[_Chunk] = field(default_factory=deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Batcher:
    """Batches concurrent forwards per model and runs them one at a time on one thread.

    Args:
        max_batch_size: most rows in one forward; a call with more rows is split.
        max_wait_s: longest time the first chunk of a batch waits for calls on their way.
        enabled: False runs every call alone (still on the forward thread).
    """

    def __init__(
        self, *, max_batch_size: int = 32, max_wait_s: float = 0.002, enabled: bool = True
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(0.0, max_wait_s)
        self.enabled = enabled
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bit-forward")
        self._lanes: dict[Hashable, _Lane] = {}
        self._on_the_way: Counter[Hashable] = Counter()  # calls still awaiting their rows
        self._busy = 0  # forwards handed to the thread and not yet done
        self._last_calls = 0  # calls the last forward served
        self._closed = False

    def queued(self, key: Hashable) -> int:
        """Chunks waiting for a forward in a model's lane (observability and tests)."""
        lane = self._lanes.get(key)
        return len(lane.queue) if lane is not None else 0

    async def run(
        self,
        key: Hashable,
        forward: Forward,
        rows: torch.Tensor | Awaitable[torch.Tensor],
        timing: PredictTiming | None = None,
        finish: Finish | None = None,
    ) -> torch.Tensor:
        """Probabilities for `rows`, computed with concurrent calls sharing the same `key`.

        `key` names what the forward runs (a model, or a backbone that several models
        share); calls with one key must pass the same forward, since their rows are
        concatenated into one batch. `finish`, if given, turns this call's rows of the
        forward's output into its probabilities (its own model's head). `rows` may be still
        coming (an awaitable, e.g. the decoding of a request's images): while it is, a
        batch of this model waits for it (at most `max_wait_s`). `timing`, if given, gets
        the call's wait for the forward thread and its forwards' durations added.
        """
        if self._closed:
            raise _shutting_down()
        if not isinstance(rows, torch.Tensor):
            rows = await self._arrival(key, rows)
            if self._closed:
                raise _shutting_down()
        chunks = rows.split(self.max_batch_size)
        if not self.enabled:
            ready: list[tuple[PredictTiming, float | None]] = (
                [(timing, time.perf_counter())] if timing is not None else []
            )
            whole = _finished(forward, finish)
            return torch.cat([await self._forward(whole, _given(c), ready) for c in chunks])
        loop = asyncio.get_running_loop()
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        futures: list[asyncio.Future[torch.Tensor]] = []
        for chunk in chunks:
            futures.append(loop.create_future())
            lane.queue.append(_Chunk(forward, chunk, futures[-1], timing, finish))
        lane.arrived.set()
        if lane.task is None:
            lane.task = asyncio.create_task(self._collect(key, lane), name=f"batcher:{key}")
        # A cancelled caller (client gone) cancels its futures; the collector skips them.
        results = await asyncio.gather(*futures, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        return torch.cat([r for r in results if isinstance(r, torch.Tensor)])

    async def _arrival(self, key: Hashable, rows: Awaitable[torch.Tensor]) -> torch.Tensor:
        self._on_the_way[key] += 1
        try:
            return await rows
        finally:
            # The caller queues its chunks right after this, with no await in between, so
            # a collector woken here sees them; one woken by a failure stops waiting.
            self._on_the_way[key] -= 1
            if not self._on_the_way[key]:
                del self._on_the_way[key]
            lane = self._lanes.get(key)
            if lane is not None:
                lane.arrived.set()

    async def _collect(self, key: Hashable, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        batch: list[_Chunk] = []
        try:
            while lane.queue:
                batch = [lane.queue.popleft()]
                size = len(batch[0].rows)
                deadline = loop.time() + self.max_wait_s
                while size < self.max_batch_size:
                    if lane.queue:
                        if size + len(lane.queue[0].rows) > self.max_batch_size:
                            break  # it leads the next batch
                        batch.append(lane.queue.popleft())
                        size += len(batch[-1].rows)
                        continue
                    if not self._on_the_way[key]:
                        break  # nobody else is coming: do not wait for nothing
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    lane.arrived.clear()
                    try:
                        await asyncio.wait_for(lane.arrived.wait(), remaining)
                    except TimeoutError:
                        break
                await self._run_batch([c for c in batch if not c.future.done()])
        finally:
            # Cancelled (shutdown): no caller may wait forever on a chunk taken or queued.
            for chunk in [*batch, *lane.queue]:
                if not chunk.future.done():
                    chunk.future.set_exception(_shutting_down())
            # No await between the empty check and this: a new call either saw this lane
            # (and its chunk was taken above) or finds no lane and starts a fresh one.
            if self._lanes.get(key) is lane:
                del self._lanes[key]

    async def _run_batch(self, batch: list[_Chunk]) -> None:
        if not batch:
            return
        self._last_calls = len(batch)
        timed: list[tuple[PredictTiming, float | None]] = [
            (c.timing, c.ready_at) for c in batch if c.timing is not None
        ]
        parts = [c.rows for c in batch]
        forward, finishes = batch[0].forward, [c.finish for c in batch]

        def concat() -> torch.Tensor:
            # The copy into one batch (tens of MB at 384 px) runs on the thread, not the loop.
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        def forward_and_finish(rows: torch.Tensor) -> list[torch.Tensor]:
            # One forward for every call, then each call's own head on its rows.
            shared = forward(rows).split([len(part) for part in parts])
            return [out if f is None else f(out) for f, out in zip(finishes, shared, strict=True)]

        try:
            results = await self._forward(forward_and_finish, concat, timed)
        except Exception as exc:
            for chunk in batch:
                if not chunk.future.done():
                    chunk.future.set_exception(exc)
            return
        for chunk, part in zip(batch, results, strict=True):
            if not chunk.future.done():
                chunk.future.set_result(part)

    def quiet(self) -> bool:
        """Calls come one at a time: no forward running or queued, no call on its way, and
        the last forward served a single call. Idle alone is not enough: under load the
        first call after a batch also finds the thread idle (its company is still being
        sent or parsed), and running it alone would halve the next batches."""
        return not self._busy and not self._on_the_way and not self._lanes and self._last_calls <= 1

    async def run_alone(
        self,
        forward: Forward,
        make_rows: Callable[[], torch.Tensor],
        timing: PredictTiming | None = None,
        finish: Finish | None = None,
    ) -> torch.Tensor:
        """`forward(make_rows())` in one job on the forward thread, for a call that found
        the batcher `quiet` with its rows still to make (decode): it saves the hand-offs
        from a decode thread back to the loop and on to the forward thread (what that
        saves: BENCHMARKS.md). Calls that come meanwhile queue as usual."""
        if self._closed:
            raise _shutting_down()
        self._last_calls = 1
        whole = _finished(forward, finish)
        return await self._forward(whole, make_rows, [(timing, None)] if timing else [])

    async def _forward(
        self,
        forward: Callable[[torch.Tensor], T],
        make_batch: Callable[[], torch.Tensor],
        timed: list[tuple[PredictTiming, float | None]],
    ) -> T:
        """One forward on the forward thread of the batch `make_batch` returns there;
        each (timing, rows ready at) in `timed` gets its wait and the forward's duration
        added (ready at None: rows made in this job, no wait)."""
        began = ended = 0.0

        def make_and_forward() -> T:
            nonlocal began, ended
            batch = make_batch()
            PREDICT_BATCH.observe(len(batch))
            began = time.perf_counter()
            try:
                return forward(batch)
            finally:
                ended = time.perf_counter()

        loop = asyncio.get_running_loop()
        self._busy += 1
        try:
            return await loop.run_in_executor(self._executor, make_and_forward)
        finally:
            self._busy -= 1
            for timing, ready_at in timed if began else ():
                timing.wait_s += 0.0 if ready_at is None else began - ready_at
                timing.forward_s += ended - began

    async def aclose(self, timeout_s: float = 30.0) -> None:
        """Refuse new calls, finish queued ones (up to `timeout_s`), stop the thread."""
        self._closed = True
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # Waits for a forward still running on the thread, without blocking the loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
