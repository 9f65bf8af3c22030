"""A bounded load run on loopback against a live API: predict and upload at concurrency 64.

Zero errors allowed, the API process's resident memory must stay bounded, and the figures
(requests, errors, p50/p99 latency, throughput, RSS) are printed with the suite's others.
The model is trained once here, in linear mode on a small architecture (seconds on a CPU).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import service_env
from tests.e2e.live import LiveService, labeled_uploads
from tests.reliability import figures
from tests.reliability.harness import fresh_database  # noqa: F401 (fixture `database`)
from tests.service.conftest import REDIS_URL

pytestmark = [pytest.mark.slow, pytest.mark.services]

CONCURRENCY = 64
ROUNDS, PER_ROUND = 2, 200  # requests of each kind: 400
# The first round may warm caches, pools and allocator arenas; a leak would grow again in the
# second, by about as much as in the first.
RSS_GROWTH_MIB, RSS_REGROWTH_MIB = 200, 48


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid`, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@dataclass
class Run:
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, other: Run) -> None:
        self.latencies_ms += other.latencies_ms
        self.failures += other.failures
        self.seconds += other.seconds

    def report(self, kind: str) -> None:
        ordered = sorted(self.latencies_ms)
        figures.put(f"load {kind} requests", len(ordered) + len(self.failures))
        figures.put(f"load {kind} errors", len(self.failures))
        figures.put(f"load {kind} p50 ms", statistics.median(ordered))
        figures.put(f"load {kind} p99 ms", ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)])
        figures.put(f"load {kind} requests/s", len(ordered) / self.seconds)


async def hammer(
    url: str, key: str, requests: list[Callable[[httpx.AsyncClient], Any]], expect: int
) -> Run:
    """Send every request, at most CONCURRENCY at once; time each one."""
    run = Run()
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=300
    ) as client:

        async def one(send: Callable[[httpx.AsyncClient], Any]) -> None:
            async with gate:
                began = time.perf_counter()
                try:
                    response = await send(client)
                except httpx.HTTPError as exc:
                    run.failures.append(f"{type(exc).__name__}: {exc}")
                    return
                if response.status_code != expect:
                    run.failures.append(f"{response.status_code}: {response.text[:200]}")
                    return
                run.latencies_ms.append((time.perf_counter() - began) * 1000)

        began = time.perf_counter()
        await asyncio.gather(*(one(send) for send in requests))
        run.seconds = time.perf_counter() - began
    return run


def train_small_model(live: LiveService) -> int:
    files, labels = labeled_uploads(per_class=5, seed=0)
    with live.client() as client:
        created = client.post(
            "/v1/finetune/upload",
            files=files,
            data={
                "labels": labels,
                "base_model": "R14x0.5",
                "mode": "linear",
                "overrides": json.dumps({"precrop": 40, "crop": 32}),
            },
        )
        assert created.status_code == 202, created.text
        done = live.wait_job(client, created.json()["id"], ("succeeded", "failed"), timeout=300)
    assert done["status"] == "succeeded", done
    return int(done["model_id"])


def test_predict_and_upload_at_concurrency_64(tmp_path: Path, database: str):
    env = service_env(
        tmp_path,
        BIT_DATABASE_URL=database,
        BIT_BROKER_URL=REDIS_URL,
        BIT_BROKER_KEY_PREFIX=f"bit-load-{uuid.uuid4().hex[:8]}:",
        BIT_RATE_LIMIT_PER_MINUTE="0",  # the limiter is tested elsewhere; here: raw capacity
        BIT_QUOTA_PREDICTIONS_PER_MINUTE="0",  # and so is the tenant's predictions quota
    )
    live = LiveService(tmp_path, env).start()
    try:
        live.start_worker()
        model_id = train_small_model(live)
        assert live.api is not None
        predict_files = [labeled_uploads(per_class=1, seed=100 + i)[0][:1] for i in range(16)]
        uploads = [labeled_uploads(per_class=2, seed=1000 + i) for i in range(ROUNDS * PER_ROUND)]

        def predict(i: int) -> Callable[[httpx.AsyncClient], Any]:
            data = {"model_id": str(model_id), "top_k": "2"}
            files = predict_files[i % len(predict_files)]
            return lambda client: client.post("/v1/predict", files=files, data=data)

        def upload(i: int) -> Callable[[httpx.AsyncClient], Any]:
            files, labels = uploads[i]
            return lambda client: client.post(
                "/v1/datasets", files=files, data={"labels": labels, "name": f"load-{i}"}
            )

        # Warm up (model cache, connection pools), then measure memory before the load.
        asyncio.run(hammer(live.url, live.key, [predict(i) for i in range(8)], 200))
        rss = [rss_mib(live.api.pid)]
        predicted, uploaded = Run(), Run()
        for round_ in range(ROUNDS):
            ids = range(round_ * PER_ROUND, (round_ + 1) * PER_ROUND)
            predicted.add(asyncio.run(hammer(live.url, live.key, [predict(i) for i in ids], 200)))
            uploaded.add(asyncio.run(hammer(live.url, live.key, [upload(i) for i in ids], 201)))
            rss.append(rss_mib(live.api.pid))

        predicted.report("predict")
        uploaded.report("upload")
        figures.put("load API RSS before MiB", rss[0])
        figures.put("load API RSS after MiB", rss[-1])
        assert predicted.failures == [], predicted.failures[:5]
        assert uploaded.failures == [], uploaded.failures[:5]
        assert len(predicted.latencies_ms) == len(uploaded.latencies_ms) == ROUNDS * PER_ROUND
        assert rss[-1] - rss[0] < RSS_GROWTH_MIB, rss
        assert rss[-1] - rss[1] < RSS_REGROWTH_MIB, rss  # no growth with the request count
        with live.client() as client:  # every upload was kept
            listed = client.get("/v1/datasets", params={"limit": 1}).json()
        assert listed["total"] == ROUNDS * PER_ROUND + 1  # and the training set
    finally:
        live.stop()
