"""Run as its own process: serve predictions the way the API does and count OpenMP workers.

Usage: python -m tests.service.openmp_team_probe STORE_ROOT URI SHA256
Prints one JSON line: the native threads (OS threads Python does not know, i.e. OpenMP
workers) before and after, and torch's thread count. The main thread runs no torch op of
its own, as in the API process, where it runs the event loop.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import threading
import time
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image

from service.db.artifacts import LocalArtifactStore
from service.inference.batcher import Batcher
from service.inference.cache import ModelCache, ModelRef, load_from_store
from service.inference.inference import Inference
from service.inference.threads import to_fresh_thread
from tests.factories import png_bytes

SETTLE_S = 10.0  # a team of an exited thread leaves within this


def photo_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (900, 1200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def native_threads() -> int:
    return len(os.listdir("/proc/self/task")) - threading.active_count()


def settled(expected: int) -> int:
    """Native threads once no more than `expected` remain, or when SETTLE_S runs out."""
    deadline = time.monotonic() + SETTLE_S
    while native_threads() > expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return native_threads()


async def serve(store: LocalArtifactStore, ref: ModelRef) -> dict[str, Any]:
    # torch's backend: ONNX Runtime's sessions keep thread pools of their own, by design.
    inference = Inference(
        ModelCache(partial(load_from_store, store, device="cpu", backend="torch"), 1 << 30),
        Batcher(max_batch_size=4, max_wait_s=0.001),
        decode_threads=2,
    )
    # Small PNGs, and photos large enough that their resize would go parallel if it could.
    images = [png_bytes(i) for i in range(6)] + [photo_jpeg(i) for i in range(2)]
    names = [f"{i}" for i in range(8)]
    before = native_threads()
    for _ in range(3):  # concurrent calls: decode threads and the forward thread all busy
        await asyncio.gather(*(inference.predict(ref, images, names, top_k=1) for _ in range(3)))
    # Occasional heavy work (here a forward outside the batcher) on a fresh thread.
    predictor = await inference.predictor(ref)
    rows = predictor.preprocess(images)
    await to_fresh_thread(lambda: len(predictor.probabilities(rows)), name="bit-probe")
    expected = before + torch.get_num_threads() - 1  # the forward thread's team alone
    after = settled(expected)
    await inference.aclose()
    return {"before": before, "after": after, "expected": expected}


def main() -> None:
    root, uri, sha = sys.argv[1:4]
    store = LocalArtifactStore(root)
    print(json.dumps(asyncio.run(serve(store, ModelRef(1, uri, sha)))))


if __name__ == "__main__":
    main()
