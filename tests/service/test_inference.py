"""The inference layer alone: dynamic batching, the model cache and loading from the store."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch

import bit_core
from bit_core.backends import onnxruntime_installed
from bit_core.checkpoint import WEIGHTS_FILE
from bit_core.predict import Predictor
from service.db.artifacts import LocalArtifactStore
from service.errors import ApiError
from service.inference.batcher import Batcher
from service.inference.cache import (
    Backbones,
    ModelCache,
    ModelRef,
    load_from_store,
    predictor_bytes,
)
from service.inference.inference import Inference
from service.inference.timing import PredictTiming
from service.metrics import REGISTRY
from service.settings import Settings
from tests.factories import CLASSES, png_bytes, save_tiny_model

TIMEOUT_S = 30  # every wait in these tests is bounded by this


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("model") / "m"
    save_tiny_model(directory)
    return directory


@pytest.fixture(scope="module")
def predictor(model_dir: Path) -> Predictor:
    return Predictor.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def rows(predictor: Predictor) -> torch.Tensor:
    """Six preprocessed images."""
    return predictor.preprocess([png_bytes(i) for i in range(6)])


@pytest.fixture(scope="module")
def one_by_one(predictor: Predictor, rows: torch.Tensor) -> torch.Tensor:
    """The unbatched reference: each image forwarded alone."""
    return torch.cat([predictor.probabilities(row[None]) for row in rows])


class Recorder:
    """A forward that records batch sizes and threads; the first call can be held."""

    def __init__(self, predictor: Predictor, *, hold_first: bool = False) -> None:
        self.predictor = predictor
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        self.hold_first = hold_first
        self.first_started = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._running = 0
        self.max_running = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.sizes.append(len(batch))
            self.threads.add(threading.current_thread().name)
            self._running += 1
            self.max_running = max(self.max_running, self._running)
            first = len(self.sizes) == 1
        try:
            if first and self.hold_first:
                self.first_started.set()
                assert self.release.wait(TIMEOUT_S)
            return self.predictor.probabilities(batch)
        finally:
            with self._lock:
                self._running -= 1


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until `condition` holds (bounded; no timed sleeps)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


# --- batching ------------------------------------------------------------------------------


def test_concurrent_calls_share_one_forward_and_each_gets_its_rows(
    predictor: Predictor, rows: torch.Tensor, one_by_one: torch.Tensor
):
    forward = Recorder(predictor)
    before = REGISTRY.get_sample_value("bit_predict_batch_size_count") or 0.0

    async def main() -> tuple[list[torch.Tensor], float]:
        # A long max wait: the batch must close because it is full, not by the clock.
        batcher = Batcher(max_batch_size=len(rows), max_wait_s=TIMEOUT_S)
        began = time.perf_counter()
        calls = [batcher.run("m", forward, rows[i : i + 1]) for i in range(len(rows))]
        results = await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT_S)
        elapsed = time.perf_counter() - began
        await batcher.aclose()
        return results, elapsed

    results, elapsed = asyncio.run(main())
    assert forward.sizes == [len(rows)]  # 6 callers, 1 forward
    assert elapsed < TIMEOUT_S / 2
    for index, result in enumerate(results):
        assert torch.allclose(result, one_by_one[index : index + 1], atol=1e-5)
    after = REGISTRY.get_sample_value("bit_predict_batch_size_count") or 0.0
    assert after - before == 1


def test_calls_arriving_during_a_forward_form_the_next_batch(
    predictor: Predictor, rows: torch.Tensor, one_by_one: torch.Tensor
):
    forward = Recorder(predictor, hold_first=True)

    async def main() -> list[torch.Tensor]:
        batcher = Batcher(max_batch_size=32, max_wait_s=0.0)
        first = asyncio.create_task(batcher.run("m", forward, rows[:1]))
        assert await asyncio.to_thread(forward.first_started.wait, TIMEOUT_S)
        rest = [
            asyncio.create_task(batcher.run("m", forward, rows[i : i + 1])) for i in range(1, 6)
        ]
        await until(lambda: batcher.queued("m") == 5)
        forward.release.set()
        results = await asyncio.wait_for(asyncio.gather(first, *rest), TIMEOUT_S)
        await batcher.aclose()
        return results

    results = asyncio.run(main())
    assert forward.sizes == [1, 5]  # 6 calls, 2 forwards
    assert all(torch.allclose(r, one_by_one[i : i + 1], atol=1e-5) for i, r in enumerate(results))


def test_each_call_gets_its_wait_and_its_forwards_time(predictor: Predictor, rows: torch.Tensor):
    forward = Recorder(predictor, hold_first=True)
    timings = [PredictTiming() for _ in range(3)]

    async def main() -> float:
        batcher = Batcher(max_batch_size=32, max_wait_s=0.0)
        first = asyncio.create_task(batcher.run("m", forward, rows[:1], timings[0]))
        assert await asyncio.to_thread(forward.first_started.wait, TIMEOUT_S)
        rest = [
            asyncio.create_task(batcher.run("m", forward, rows[i : i + 1], timings[i]))
            for i in (1, 2)
        ]
        await until(lambda: batcher.queued("m") == 2)
        held_from = time.perf_counter()  # both queued: from here on they wait for the first
        await asyncio.to_thread(lambda: None)  # a round trip to a thread: held a while
        held = time.perf_counter() - held_from
        forward.release.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), TIMEOUT_S)
        await batcher.aclose()
        return held

    held = asyncio.run(main())
    assert forward.sizes == [1, 2]
    # (Its own wait, the hand-off to the forward thread, is not compared: under load a
    # thread's start can take longer than the hold.)
    assert timings[0].forward_s >= held
    # The two queued calls shared the second forward and waited out the first.
    assert timings[1].forward_s == timings[2].forward_s > 0
    assert min(timings[1].wait_s, timings[2].wait_s) >= held
    header = timings[1].header(0.25)
    assert header.startswith("decode;dur=0.00, wait;dur=") and header.endswith("total;dur=250.00")


def test_a_lone_call_does_not_wait_for_company(predictor: Predictor, rows: torch.Tensor):
    forward = Recorder(predictor)

    async def main() -> float:
        # Nobody else is on the way: the forward starts at once, not after max_wait_s.
        batcher = Batcher(max_batch_size=8, max_wait_s=TIMEOUT_S)
        began = asyncio.get_running_loop().time()
        await asyncio.wait_for(batcher.run("m", forward, rows[:1]), TIMEOUT_S)
        elapsed = asyncio.get_running_loop().time() - began
        await batcher.aclose()
        return elapsed

    elapsed = asyncio.run(main())
    assert forward.sizes == [1]
    assert elapsed < TIMEOUT_S / 2


async def _rows_when(ready: asyncio.Event, rows: torch.Tensor) -> torch.Tensor:
    """Rows that are still 'decoding' until `ready` is set."""
    await ready.wait()
    return rows


def test_a_batch_waits_at_most_max_wait_for_a_call_on_its_way(
    predictor: Predictor, rows: torch.Tensor
):
    forward = Recorder(predictor)

    async def main() -> float:
        batcher = Batcher(max_batch_size=8, max_wait_s=0.05)
        never = asyncio.Event()
        late = asyncio.create_task(batcher.run("m", forward, _rows_when(never, rows[1:2])))
        await until(lambda: batcher._on_the_way["m"] == 1)
        began = asyncio.get_running_loop().time()
        await asyncio.wait_for(batcher.run("m", forward, rows[:1]), TIMEOUT_S)
        elapsed = asyncio.get_running_loop().time() - began
        never.set()
        await asyncio.wait_for(late, TIMEOUT_S)
        await batcher.aclose()
        return elapsed

    elapsed = asyncio.run(main())
    assert forward.sizes == [1, 1]  # the late call missed the batch it was waited for
    assert 0.04 <= elapsed < TIMEOUT_S / 2


def test_a_call_on_its_way_joins_the_batch_waiting_for_it(
    predictor: Predictor, rows: torch.Tensor, one_by_one: torch.Tensor
):
    forward = Recorder(predictor)

    async def main() -> list[torch.Tensor]:
        batcher = Batcher(max_batch_size=2, max_wait_s=TIMEOUT_S)
        decoded = asyncio.Event()
        second = asyncio.create_task(batcher.run("m", forward, _rows_when(decoded, rows[1:2])))
        first = asyncio.create_task(batcher.run("m", forward, rows[:1]))
        # The collector holds the first call and waits for the one still decoding.
        await until(lambda: "m" in batcher._lanes and batcher.queued("m") == 0)
        decoded.set()
        results = await asyncio.wait_for(asyncio.gather(first, second), TIMEOUT_S)
        await batcher.aclose()
        return results

    first, second = asyncio.run(main())
    assert forward.sizes == [2]
    assert torch.allclose(first, one_by_one[:1], atol=1e-5)
    assert torch.allclose(second, one_by_one[1:2], atol=1e-5)


def test_a_call_that_fails_on_its_way_stops_the_wait(predictor: Predictor, rows: torch.Tensor):
    forward = Recorder(predictor)

    async def failing(ready: asyncio.Event) -> torch.Tensor:
        await ready.wait()
        raise ValueError("not an image")

    async def main() -> tuple[object, float]:
        batcher = Batcher(max_batch_size=8, max_wait_s=TIMEOUT_S)
        ready = asyncio.Event()
        doomed = asyncio.create_task(batcher.run("m", forward, failing(ready)))
        first = asyncio.create_task(batcher.run("m", forward, rows[:1]))
        await until(lambda: "m" in batcher._lanes and batcher.queued("m") == 0)
        began = asyncio.get_running_loop().time()
        ready.set()
        await asyncio.wait_for(first, TIMEOUT_S)
        elapsed = asyncio.get_running_loop().time() - began
        error = await asyncio.gather(doomed, return_exceptions=True)
        await batcher.aclose()
        return error[0], elapsed

    error, elapsed = asyncio.run(main())
    assert forward.sizes == [1]
    assert isinstance(error, ValueError)
    assert elapsed < TIMEOUT_S / 2  # the wait ended with the failure, not with max_wait_s


def test_large_calls_are_split_at_max_batch_size(
    predictor: Predictor, rows: torch.Tensor, one_by_one: torch.Tensor
):
    forward = Recorder(predictor)

    async def main() -> torch.Tensor:
        batcher = Batcher(max_batch_size=4, max_wait_s=0.0)
        result = await asyncio.wait_for(batcher.run("m", forward, rows), TIMEOUT_S)
        await batcher.aclose()
        return result

    result = asyncio.run(main())
    assert forward.sizes == [4, 2]
    assert torch.allclose(result, one_by_one, atol=1e-5)


def test_without_dynamic_batching_every_call_runs_alone(predictor: Predictor, rows: torch.Tensor):
    forward = Recorder(predictor)

    async def main() -> None:
        batcher = Batcher(max_batch_size=32, max_wait_s=TIMEOUT_S, enabled=False)
        calls = [batcher.run("m", forward, rows[i : i + 1]) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT_S)
        await batcher.aclose()

    asyncio.run(main())
    assert forward.sizes == [1, 1, 1, 1]
    assert forward.threads == {"bit-forward_0"}


def test_forwards_of_all_models_run_one_at_a_time_on_one_thread(
    predictor: Predictor, rows: torch.Tensor
):
    forward = Recorder(predictor)

    async def main() -> None:
        batcher = Batcher(max_batch_size=1, max_wait_s=0.0)
        calls = [batcher.run(f"m{i % 3}", forward, rows[i : i + 1]) for i in range(6)]
        await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT_S)
        await batcher.aclose()

    asyncio.run(main())
    assert len(forward.sizes) == 6
    assert forward.max_running == 1 and forward.threads == {"bit-forward_0"}


def test_a_failed_forward_fails_its_batch_only(predictor: Predictor, rows: torch.Tensor):
    failures = [RuntimeError("out of memory")]

    def flaky(batch: torch.Tensor) -> torch.Tensor:
        if failures:
            raise failures.pop()
        return predictor.probabilities(batch)

    async def main() -> list[object]:
        batcher = Batcher(max_batch_size=2, max_wait_s=TIMEOUT_S)
        calls = [batcher.run("m", flaky, rows[i : i + 1]) for i in range(2)]
        failed = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), TIMEOUT_S)
        after = await asyncio.wait_for(batcher.run("m", flaky, rows[:2]), TIMEOUT_S)
        await batcher.aclose()
        return [*failed, after]

    first, second, after = asyncio.run(main())
    assert isinstance(first, RuntimeError) and isinstance(second, RuntimeError)
    assert isinstance(after, torch.Tensor) and after.shape == (2, len(CLASSES))


def test_a_cancelled_call_is_left_out_of_the_forward(predictor: Predictor, rows: torch.Tensor):
    forward = Recorder(predictor, hold_first=True)

    async def main() -> None:
        batcher = Batcher(max_batch_size=32, max_wait_s=0.0)
        first = asyncio.create_task(batcher.run("m", forward, rows[:1]))
        assert await asyncio.to_thread(forward.first_started.wait, TIMEOUT_S)
        gone = asyncio.create_task(batcher.run("m", forward, rows[1:3]))
        kept = asyncio.create_task(batcher.run("m", forward, rows[3:4]))
        await until(lambda: batcher.queued("m") == 2)
        gone.cancel()  # the client went away
        forward.release.set()
        await asyncio.wait_for(asyncio.gather(first, kept), TIMEOUT_S)
        assert gone.cancelled()
        await batcher.aclose()

    asyncio.run(main())
    assert forward.sizes == [1, 1]


def test_close_finishes_queued_calls_then_refuses_new_ones(
    predictor: Predictor, rows: torch.Tensor
):
    forward = Recorder(predictor, hold_first=True)

    async def main() -> None:
        batcher = Batcher(max_batch_size=32, max_wait_s=0.0)
        first = asyncio.create_task(batcher.run("m", forward, rows[:1]))
        assert await asyncio.to_thread(forward.first_started.wait, TIMEOUT_S)
        queued = asyncio.create_task(batcher.run("m", forward, rows[1:2]))
        await until(lambda: batcher.queued("m") == 1)
        closing = asyncio.create_task(batcher.aclose())
        await until(lambda: batcher._closed)
        with pytest.raises(ApiError) as refused:
            await batcher.run("m", forward, rows[:1])
        assert refused.value.status == 503 and refused.value.code == "shutting_down"
        forward.release.set()
        await asyncio.wait_for(asyncio.gather(first, queued, closing), TIMEOUT_S)

    asyncio.run(main())
    assert forward.sizes == [1, 1]


def test_close_fails_calls_still_queued_after_its_timeout(predictor: Predictor, rows: torch.Tensor):
    forward = Recorder(predictor, hold_first=True)

    async def main() -> None:
        batcher = Batcher(max_batch_size=32, max_wait_s=0.0)
        first = asyncio.create_task(batcher.run("m", forward, rows[:1]))
        assert await asyncio.to_thread(forward.first_started.wait, TIMEOUT_S)
        queued = asyncio.create_task(batcher.run("m", forward, rows[1:2]))
        await until(lambda: batcher.queued("m") == 1)
        closing = asyncio.create_task(batcher.aclose(timeout_s=0.0))
        with pytest.raises(ApiError) as failed:
            await asyncio.wait_for(queued, TIMEOUT_S)
        assert failed.value.code == "shutting_down"
        forward.release.set()  # lets the held forward, and so the close, finish
        await asyncio.wait_for(closing, TIMEOUT_S)
        with pytest.raises(ApiError) as cut:  # its forward was abandoned by the close
            await first
        assert cut.value.code == "shutting_down"

    asyncio.run(main())


# --- the model cache ---------------------------------------------------------------------


def tiny_predictor() -> Predictor:
    return Predictor.from_model(
        bit_core.create_model("R14x0.5", 3), ["a", "b", "c"], 32, device="cpu"
    )


def ref(model_id: int) -> ModelRef:
    return ModelRef(id=model_id, uri=f"jobs/{model_id}/model", sha256="0" * 64)


def test_cache_evicts_least_recently_used_models_by_bytes():
    loads: list[int] = []

    def loader(r: ModelRef, _backbones: Backbones) -> Predictor:
        loads.append(r.id)
        return tiny_predictor()

    size = predictor_bytes(tiny_predictor())
    assert size > 0
    cache = ModelCache(loader, max_bytes=size + size // 2)  # room for one model
    first = cache.get(ref(1))
    assert cache.get(ref(1)) is first and loads == [1]
    cache.get(ref(2))
    assert cache.ids() == [2] and cache.used_bytes == size and 1 not in cache
    cache.get(ref(1))
    assert loads == [1, 2, 1]

    cache = ModelCache(loader, max_bytes=2 * size)  # room for two
    cache.get(ref(1)), cache.get(ref(2)), cache.get(ref(1))  # 1 is now the most recent
    cache.get(ref(3))
    assert cache.ids() == [1, 3]
    assert cache.evict(3) and not cache.evict(3)
    assert cache.ids() == [1] and cache.used_bytes == size


def test_a_model_over_the_whole_budget_is_still_served_alone():
    cache = ModelCache(lambda r, _: tiny_predictor(), max_bytes=1)
    cache.get(ref(1))
    cache.get(ref(2))
    assert cache.ids() == [2]


def test_concurrent_first_requests_load_a_model_once():
    loads: list[int] = []
    started, release = threading.Event(), threading.Event()
    shared = tiny_predictor()

    def loader(r: ModelRef, _backbones: Backbones) -> Predictor:
        loads.append(r.id)
        started.set()
        assert release.wait(TIMEOUT_S)
        return shared

    cache = ModelCache(loader, max_bytes=1 << 30)
    results: list[Predictor] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(ref(1)))) for _ in range(8)]
    for thread in threads:
        thread.start()
    assert started.wait(TIMEOUT_S)
    release.set()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads)
    assert loads == [1] and len(results) == 8 and all(r is shared for r in results)


def test_a_failed_load_is_not_cached_and_is_retried():
    failures = [ApiError(503, "artifact_store_unavailable", "the store is down")]

    def loader(r: ModelRef, _backbones: Backbones) -> Predictor:
        if failures:
            raise failures.pop()
        return tiny_predictor()

    cache = ModelCache(loader, max_bytes=1 << 30)
    with pytest.raises(ApiError):
        cache.get(ref(1))
    assert len(cache) == 0
    cache.get(ref(1))
    assert cache.ids() == [1]


def test_a_model_evicted_while_loading_is_served_but_not_cached():
    started, release = threading.Event(), threading.Event()

    def loader(r: ModelRef, _backbones: Backbones) -> Predictor:
        started.set()
        assert release.wait(TIMEOUT_S)
        return tiny_predictor()

    cache = ModelCache(loader, max_bytes=1 << 30)
    results: list[Predictor] = []
    thread = threading.Thread(target=lambda: results.append(cache.get(ref(1))))
    thread.start()
    assert started.wait(TIMEOUT_S)
    assert cache.evict(1)  # archived meanwhile
    release.set()
    thread.join(TIMEOUT_S)
    assert len(results) == 1 and 1 not in cache


# --- loading from the artifact store -----------------------------------------------------


@pytest.fixture
def stored(tmp_path: Path, model_dir: Path) -> tuple[LocalArtifactStore, ModelRef]:
    store = LocalArtifactStore(tmp_path / "artifacts")
    shutil.copytree(model_dir, store.path("jobs/1/model"))
    sha = bit_core.checkpoint.read_model_info(model_dir).sha256
    return store, ModelRef(id=1, uri="jobs/1/model", sha256=sha)


def test_load_from_store_checks_the_weights_against_the_row(
    stored: tuple[LocalArtifactStore, ModelRef],
):
    store, good = stored
    assert load_from_store(store, good, device="cpu").classes == CLASSES
    with pytest.raises(ApiError) as replaced:
        load_from_store(store, ModelRef(1, good.uri, "f" * 64), device="cpu")
    assert replaced.value.status == 500 and replaced.value.code == "model_corrupt"

    weights = store.path(good.uri) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ApiError) as tampered:
        load_from_store(store, good, device="cpu")
    assert tampered.value.code == "model_corrupt" and "fine-tune" in tampered.value.message

    with pytest.raises(ApiError) as missing:
        load_from_store(store, ModelRef(2, "jobs/2/model", good.sha256), device="cpu")
    assert missing.value.status == 500 and missing.value.code == "model_files_missing"


def test_inference_predicts_in_chunks_like_the_predictor(
    stored: tuple[LocalArtifactStore, ModelRef], predictor: Predictor
):
    store, model = stored
    images = [png_bytes(i, seed=3) for i in range(5)]
    names = [f"{i}.png" for i in range(5)]
    expected = predictor.predict(images, top_k=2)

    async def main() -> list[list[bit_core.predict.Prediction]]:
        inference = Inference(
            ModelCache(partial(load_from_store, store, device="cpu"), 1 << 30),
            Batcher(max_batch_size=2, max_wait_s=0.0),
        )
        try:
            result = await inference.predict(model, images, names, top_k=2)
            broken = [*images[:3], b"not an image", b"nor this"]
            with pytest.raises(ApiError) as bad:
                await inference.predict(model, broken, names, top_k=2)
            assert bad.value.status == 422 and bad.value.code == "invalid_image"
            assert bad.value.message.startswith("3.png:")  # the first bad file, by order
            return result
        finally:
            await inference.aclose()

    result = asyncio.run(main())
    assert [[p.label for p in row] for row in result] == [
        [p.label for p in row] for row in expected
    ]
    for row, reference in zip(result, expected, strict=True):
        for got, want in zip(row, reference, strict=True):
            assert got.probability == pytest.approx(want.probability, abs=1e-5)


def test_a_lone_small_predict_decodes_on_the_forward_thread(
    stored: tuple[LocalArtifactStore, ModelRef], predictor: Predictor, rows: torch.Tensor
):
    store, model = stored
    images = [png_bytes(i, seed=4) for i in range(6)]
    expected = predictor.predict(images[:1], top_k=2)
    decoded_on: list[str] = []
    real_preprocess = Predictor.preprocess

    def recording_preprocess(self: Predictor, *args, **kwargs):  # type: ignore[no-untyped-def]
        decoded_on.append(threading.current_thread().name.split("_")[0])
        return real_preprocess(self, *args, **kwargs)

    async def main() -> list[list[bit_core.predict.Prediction]]:
        inference = Inference(
            ModelCache(partial(load_from_store, store, device="cpu"), 1 << 30),
            Batcher(max_batch_size=4, max_wait_s=0.0),
        )
        try:
            alone = await inference.predict(model, images[:1], ["0.png"], top_k=2)
            await inference.predict(model, images, [f"{i}.png" for i in range(6)], top_k=2)
            with pytest.raises(ApiError) as bad:
                await inference.predict(model, [b"not an image"], ["bad.png"], top_k=2)
            assert bad.value.code == "invalid_image" and bad.value.message.startswith("bad.png:")
            return alone
        finally:
            await inference.aclose()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Predictor, "preprocess", recording_preprocess)
        alone = asyncio.run(main())
    # Alone: one hop. Two chunks: decoded in parallel on the decode threads, then batched.
    assert decoded_on == ["bit-forward", "bit-decode", "bit-decode", "bit-forward"]
    assert [p.label for p in alone[0]] == [p.label for p in expected[0]]
    assert alone[0][0].probability == pytest.approx(expected[0][0].probability, abs=1e-5)


def test_the_batcher_is_quiet_only_when_calls_come_one_at_a_time(
    predictor: Predictor, rows: torch.Tensor
):
    forward = Recorder(predictor, hold_first=True)

    async def main() -> list[bool]:
        batcher = Batcher(max_batch_size=32, max_wait_s=TIMEOUT_S)
        seen = [batcher.quiet()]
        first = asyncio.create_task(batcher.run("m", forward, rows[:1]))
        assert await asyncio.to_thread(forward.first_started.wait, TIMEOUT_S)
        seen.append(batcher.quiet())  # a forward running
        decoding: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        second = asyncio.create_task(batcher.run("m", forward, decoding))
        await asyncio.sleep(0)  # one turn of the loop: the second call starts waiting for rows
        forward.release.set()
        await asyncio.wait_for(first, TIMEOUT_S)
        seen.append(batcher.quiet())  # the second call is still on its way
        decoding.set_result(rows[1:2])
        await asyncio.wait_for(second, TIMEOUT_S)
        seen.append(batcher.quiet())
        pair = [batcher.run("m", forward, rows[i : i + 1]) for i in (2, 3)]
        await asyncio.wait_for(asyncio.gather(*pair), TIMEOUT_S)
        seen.append(batcher.quiet())  # idle, but its last forward served two calls
        await batcher.run("m", forward, rows[4:5])
        seen.append(batcher.quiet())
        await batcher.aclose()
        return seen

    assert asyncio.run(main()) == [True, False, False, True, False, True]
    assert forward.sizes == [1, 1, 2, 1]


@pytest.mark.skipif(
    not Path("/proc/self/task").is_dir() or "OpenMP" not in torch.__config__.parallel_info(),
    reason="counts OpenMP worker threads under /proc (Linux, torch built with OpenMP)",
)
@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one CPU thread: OpenMP forms no team")
def test_only_the_forward_thread_keeps_an_openmp_team(tmp_path: Path):
    """Decode threads, model loads and evaluations leave no OpenMP team behind.

    A second long-lived team makes libgomp stop spinning, which slowed an R50x1 forward on
    2 cores from 31 to 52 ms (service/inference/threads.py). Crop 128, so that the decoded
    batches are large enough for torch to run their ops in parallel.
    """
    store = LocalArtifactStore(tmp_path / "artifacts")
    info = save_tiny_model(store.path("jobs/1/model"), crop=128)
    probe = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.service.openmp_team_probe",
            str(store.root),
            "jobs/1/model",
            info.sha256,
        ],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    counts = json.loads(probe.stdout.splitlines()[-1])
    assert counts["expected"] > counts["before"]
    assert counts["after"] == counts["expected"], counts


def test_the_precision_and_backend_settings_reach_the_served_predictor(
    stored: tuple[LocalArtifactStore, ModelRef], tmp_path: Path
):
    store, model = stored

    async def served(settings: Settings) -> Predictor:
        inference = Inference.from_settings(settings, store)
        try:
            return await inference.predictor(model)
        finally:
            await inference.aclose()

    torch_bf16 = Settings(home=tmp_path, device="cpu", precision="bf16", inference_backend="torch")
    predictor = asyncio.run(served(torch_bf16))
    assert predictor.backend == "torch"
    assert predictor.features.precision == "bf16"  # type: ignore[attr-defined]
    if onnxruntime_installed():
        onnx = Settings(home=tmp_path, device="cpu", inference_backend="onnxruntime")
        assert asyncio.run(served(onnx)).backend == "onnxruntime"
        assert list((tmp_path / "cache" / "onnx").glob(f"{model.sha256}.*.onnx"))


def test_at_most_max_loads_models_load_at_once():
    """The budget bounds what is cached; this bounds what is loading (each load holds a
    whole model in memory until it is cached or dropped)."""
    active, peak = 0, 0
    guard = threading.Lock()
    all_started = threading.Barrier(4, timeout=TIMEOUT_S)

    def loader(r: ModelRef, _backbones: Backbones) -> Predictor:
        nonlocal active, peak
        with guard:
            active += 1
            peak = max(peak, active)
        predictor = tiny_predictor()
        with guard:
            active -= 1
        return predictor

    cache = ModelCache(loader, max_bytes=1 << 30, max_loads=1)

    def get(model_id: int) -> None:
        all_started.wait()  # the four requests arrive together
        cache.get(ref(model_id))

    threads = [threading.Thread(target=get, args=(i,)) for i in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(cache.ids()) == [1, 2, 3, 4] and peak == 1
