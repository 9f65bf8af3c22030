"""`Inference`: one predict call through the model cache and the batcher.

Load (cached) → decode and resize on decode threads → batched forward on the single forward
thread → top-k. One instance lives on `app.state.inference`, created on first use
(`get_inference`) and closed with the app (`install`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any

import torch
from fastapi import Depends, FastAPI, Request

from bit_core.backends import resolve_backend
from bit_core.device import resolve_device
from bit_core.images import ImageDecodeError, ImageSource
from bit_core.predict import Prediction, Predictor
from service.db.artifacts import ArtifactStore, store_for
from service.errors import ApiError
from service.inference.batcher import Batcher, Forward
from service.inference.cache import ModelCache, ModelRef, load_from_store
from service.inference.threads import to_fresh_thread
from service.inference.timing import PredictTiming
from service.metrics import BACKBONE_FORWARDS
from service.settings import Settings

log = logging.getLogger(__name__)

# On a CPU a forward over many rows is slower per image than several over a few: past a
# few rows a batch's activations no longer fit in the CPU's caches, and at large crops one
# row at a time is fastest. So on a CPU a batch is run as forwards of at most this many
# pixels (8 rows at 128 px, 1 from 384 px); the measurements behind the budget are in
# BENCHMARKS.md (benchmarks/predict_speed.py, and service_speed.py through the service).
# A GPU wants whole batches: no limit there.
CPU_FORWARD_PIXELS = 8 * 128 * 128


# A lone request decodes on the forward thread (Batcher.run_alone) only up to this size: a
# call arriving meanwhile waits for that decode too, so only a small image's decode is
# worth the hand-offs it saves (decode times per image size: BENCHMARKS.md).
ALONE_DECODE_BYTES = 256 * 1024


def forward_rows(predictor: Predictor) -> int | None:
    """Most rows per forward call for this predictor; None: the whole batch at once."""
    if predictor.device.type != "cpu":
        return None
    return max(1, CPU_FORWARD_PIXELS // (predictor.crop * predictor.crop))


def batched_forward(predictor: Predictor) -> Forward:
    """The predictor's backbone (images -> features), in slices of `forward_rows` rows on
    a CPU; `predictor.finish` turns the features into its probabilities."""
    rows = forward_rows(predictor)
    forwards = BACKBONE_FORWARDS.labels(predictor.backend)

    def features(batch: torch.Tensor) -> torch.Tensor:
        forwards.inc()
        return predictor.features(batch)

    if rows is None:
        return features

    def forward(batch: torch.Tensor) -> torch.Tensor:
        if len(batch) <= rows:
            return features(batch)
        return torch.cat([features(part) for part in batch.split(rows)])

    return forward


def check_inference_settings(settings: Settings) -> str:
    """The backend predict will use; raises BackendUnavailable (saying what to install or
    set) when the one configured cannot run here, so a process refuses to start."""
    backend = resolve_backend(settings.inference_backend, resolve_device(settings.device))
    log.info(
        "inference backend: %s (BIT_INFERENCE_BACKEND=%s)", backend, settings.inference_backend
    )
    return backend


def _image_error(exc: ImageDecodeError) -> ApiError:
    if exc.code == "image_too_large":
        return ApiError(413, "image_too_large", str(exc), file=exc.name)
    return ApiError(422, "invalid_image", str(exc), file=exc.name)


class Inference:
    """Loaded models, decode threads and the batcher of one API process."""

    def __init__(self, cache: ModelCache, batcher: Batcher, *, decode_threads: int = 4) -> None:
        self.cache = cache
        self.batcher = batcher
        # Decoding is Pillow work that mostly releases the GIL; its own pool keeps it from
        # starving the threads that serve FastAPI's sync routes.
        self._decode = ThreadPoolExecutor(decode_threads, thread_name_prefix="bit-decode")

    @classmethod
    def from_settings(cls, settings: Settings, store: ArtifactStore) -> Inference:
        """Cache budget, batch size, wait and device as configured."""
        loader = partial(
            load_from_store,
            store,
            device=settings.device,
            precision=settings.precision,
            backend=settings.inference_backend,
            onnx_cache_dir=settings.onnx_cache_dir,
        )
        return cls(
            ModelCache(loader, settings.model_cache_bytes),
            Batcher(
                max_batch_size=settings.batch_max_size,
                max_wait_s=settings.batch_max_wait_ms / 1000,
                enabled=settings.dynamic_batching,
            ),
            decode_threads=min(4, os.cpu_count() or 1),
        )

    async def predictor(self, ref: ModelRef) -> Predictor:
        """The model's predictor; the first use loads it on a fresh thread (threads.py)."""
        predictor = self.cache.cached(ref)
        if predictor is not None:
            return predictor
        return await to_fresh_thread(partial(self.cache.get, ref), name=f"bit-load-{ref.id}")

    async def predict(
        self,
        ref: ModelRef,
        sources: list[bytes],
        names: list[str],
        *,
        top_k: int,
        timing: PredictTiming | None = None,
    ) -> list[list[Prediction]]:
        """Top-k predictions per image, in input order; `timing` gets the stages' times.

        Images go through in chunks of one batch: chunks decode in parallel on the decode
        threads and each is queued for a forward as soon as it is ready, so decoding a
        large request overlaps with its first forwards.
        """
        predictor = await self.predictor(ref)
        forward = batched_forward(predictor)
        loop = asyncio.get_running_loop()
        step = self.batcher.max_batch_size

        decode_s: list[float] = []  # appended to by the threads that decode (atomic)

        def decode(start: int) -> torch.Tensor:
            chunk_sources: list[ImageSource] = [*sources[start : start + step]]  # invariant
            chunk_names: list[str] | None = names[start : start + step]
            began = time.perf_counter()
            try:
                return predictor.preprocess(chunk_sources, chunk_names)
            finally:
                decode_s.append(time.perf_counter() - began)

        # A small request, when calls come one at a time, decodes on the forward thread.
        alone = (
            len(sources) <= step
            and sum(map(len, sources)) <= ALONE_DECODE_BYTES
            and self.batcher.quiet()
        )

        def chunk(start: int) -> Awaitable[torch.Tensor]:
            if alone:
                return self.batcher.run_alone(
                    forward, partial(decode, start), timing, predictor.finish
                )
            rows = loop.run_in_executor(self._decode, decode, start)
            # Handed over while decoding: a batch on this backbone waits for it. Models
            # sharing the backbone share its batches; each call's head finishes its rows.
            return self.batcher.run(predictor.backbone_key, forward, rows, timing, predictor.finish)

        results = await asyncio.gather(
            *(chunk(start) for start in range(0, len(sources), step)), return_exceptions=True
        )
        if timing is not None:
            timing.decode_s += sum(decode_s)
        # The first failure in input order, so the error names the first bad file.
        for result in results:
            if isinstance(result, ImageDecodeError):
                raise _image_error(result)
            if isinstance(result, BaseException):
                raise result
        probabilities = torch.cat([r for r in results if isinstance(r, torch.Tensor)])
        return predictor.top_k(probabilities, top_k)

    def evict(self, model_id: int) -> None:
        """Forget a model (archived or deleted) so its memory is freed."""
        self.cache.evict(model_id)

    async def aclose(self) -> None:
        """Finish queued forwards, stop the threads, drop the models."""
        await self.batcher.aclose()
        self._decode.shutdown(wait=False, cancel_futures=True)
        self.cache.clear()


async def get_inference(request: Request) -> Inference:
    """The app's Inference, created on first use (async: no two requests race to make it)."""
    state = request.app.state
    inference: Inference | None = getattr(state, "inference", None)
    if inference is None:
        settings: Settings = state.settings
        inference = state.inference = Inference.from_settings(settings, store_for(settings))
    return inference


InferenceDep = Annotated[Inference, Depends(get_inference)]


def install(app: FastAPI) -> None:
    """Close the app's Inference at shutdown, around whatever lifespan the app already has."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with inner(app_) as state:
            try:
                yield state
            finally:
                inference: Inference | None = getattr(app.state, "inference", None)
                app.state.inference = None
                if inference is not None:
                    await inference.aclose()

    app.router.lifespan_context = lifespan
