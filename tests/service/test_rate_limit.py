"""Per-key rate limits: the token bucket in-process and in a real Redis (shared by replicas),
then through the app on both databases: 429 `rate_limited` with Retry-After, per key."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.rate_limit import LocalBuckets, RateLimiter, RedisBuckets, limiter_for
from service.settings import Settings
from tests.polling import wait_for
from tests.service.conftest import REDIS_URL, new_key

TIMEOUT_S = 10  # every wait here is bounded by this


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def prefix() -> Iterator[str]:
    """A Redis key prefix of this test alone; its keys are deleted afterwards."""
    value = f"test-{uuid.uuid4().hex[:12]}:"
    yield value
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{value}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_buckets(prefix: str) -> Iterator[RedisBuckets]:
    buckets = RedisBuckets(REDIS_URL, prefix)
    yield buckets
    buckets.close()


# --- the bucket ------------------------------------------------------------------------------


def test_local_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(LocalBuckets(clock), per_minute=60, capacity=3)
    assert [limiter.retry_after(1) for _ in range(3)] == [None, None, None]
    assert limiter.retry_after(1) == 1  # one token a second
    assert limiter.retry_after(2) is None  # another key has its own bucket
    clock.now += 0.5
    assert limiter.retry_after(1) == 1  # half a token: still refused, and rounded up
    clock.now += 0.5
    assert limiter.retry_after(1) is None
    clock.now += 3600
    assert [limiter.retry_after(1) for _ in range(4)] == [None, None, None, 1]  # capped at 3


def test_retry_after_is_whole_seconds_until_the_next_token() -> None:
    clock = FakeClock()
    limiter = RateLimiter(LocalBuckets(clock), per_minute=6, capacity=1)  # one per 10 s
    assert limiter.retry_after(1) is None
    assert limiter.retry_after(1) == 10
    clock.now += 2.5
    assert limiter.retry_after(1) == 8  # 7.5 s left, rounded up


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_concurrent_requests_never_spend_more_than_the_bucket(
    backend: str, redis_buckets: RedisBuckets
) -> None:
    buckets = LocalBuckets() if backend == "local" else redis_buckets
    limiter = RateLimiter(buckets, per_minute=1, capacity=10)  # no refill within the test
    results: list[int | None] = []
    lock = threading.Lock()

    def hammer() -> None:
        for _ in range(5):
            outcome = limiter.retry_after(7)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert len(results) == 40
    assert results.count(None) == 10


def test_redis_buckets_are_shared_by_replicas_and_expire(prefix: str) -> None:
    first, second = RedisBuckets(REDIS_URL, prefix), RedisBuckets(REDIS_URL, prefix)
    try:
        replica_a = RateLimiter(first, per_minute=60, capacity=4)
        replica_b = RateLimiter(second, per_minute=60, capacity=4)
        outcomes = [limiter.retry_after(5) for limiter in (replica_a, replica_b) * 2]
        assert outcomes == [None] * 4
        assert replica_b.retry_after(5) == 1 and replica_a.retry_after(5) == 1
        ttl_ms = redis.Redis.from_url(REDIS_URL).pttl(f"{prefix}bit:rate:5")
        # A full bucket needs 4 s to refill; the state lives that long plus a second.
        assert 0 < ttl_ms <= 5000
    finally:
        first.close()
        second.close()


def test_redis_bucket_refills(redis_buckets: RedisBuckets) -> None:
    limiter = RateLimiter(redis_buckets, per_minute=600, capacity=1)  # a token per 0.1 s
    assert limiter.retry_after(9) is None
    refusals: list[int] = []

    def refilled() -> bool:
        wait = limiter.retry_after(9)
        if wait is not None:
            refusals.append(wait)
        return wait is None

    wait_for(refilled, TIMEOUT_S, "the bucket to refill", interval=0.02)
    assert refusals and set(refusals) == {1}  # the request right after the first was refused


def test_an_unreachable_redis_lets_requests_through_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = RateLimiter(RedisBuckets("redis://127.0.0.1:1/0"), per_minute=1, capacity=1)
    with caplog.at_level(logging.WARNING, logger="service.rate_limit"):
        assert [limiter.retry_after(1) for _ in range(3)] == [None, None, None]
    assert "Redis unreachable" in caplog.text


def test_limiter_follows_the_settings(tmp_path: Path, prefix: str) -> None:
    assert limiter_for(Settings(home=tmp_path, rate_limit_per_minute=0)) is None
    local = limiter_for(Settings(home=tmp_path, rate_limit_per_minute=120))
    assert local is not None and isinstance(local.buckets, LocalBuckets)
    assert local.capacity == 120  # burst 0: one minute's worth
    shared = limiter_for(
        Settings(home=tmp_path, broker_url=REDIS_URL, broker_key_prefix=prefix, rate_limit_burst=5)
    )
    assert shared is not None and isinstance(shared.buckets, RedisBuckets)
    assert (shared.per_minute, shared.capacity) == (600, 5)
    assert shared.buckets.prefix == f"{prefix}bit:rate:"
    with pytest.raises(ValidationError):
        Settings(home=tmp_path, rate_limit_per_minute=-1)


# --- through the app -------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True], ids=["in-process", "redis"])
def test_the_api_answers_429_with_retry_after_per_key(
    shared: bool, settings: Settings, prefix: str
) -> None:
    limited = settings.model_copy(update={"rate_limit_per_minute": 2, "rate_limit_burst": 3})
    if shared:
        limited = limited.model_copy(update={"broker_url": REDIS_URL, "broker_key_prefix": prefix})
    first = {"Authorization": f"Bearer {new_key(limited, 'user', 'acme')}"}
    second = {"Authorization": f"Bearer {new_key(limited, 'admin', 'globex')}"}
    with TestClient(create_app(limited)) as client:
        statuses = [client.get("/v1/datasets", headers=first).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]
        refused = client.get("/v1/jobs", headers=first)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "rate_limited"
        assert "2 requests a minute" in error["message"] and "retry in" in error["message"]
        retry_after = int(refused.headers["Retry-After"])
        assert 1 <= retry_after <= 30 and error["retry_after"] == retry_after
        # Another key is not affected, and unauthenticated probes are not limited.
        assert client.get("/v1/datasets", headers=second).status_code == 200
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/datasets").status_code == 401


def test_the_default_limit_is_on_and_generous(settings: Settings) -> None:
    assert (settings.rate_limit_per_minute, settings.rate_limit_burst) == (600, 0)
    headers = {"Authorization": f"Bearer {new_key(settings)}"}
    with TestClient(create_app(settings)) as client:
        statuses = {client.get("/v1/models", headers=headers).status_code for _ in range(30)}
    assert statuses == {200}
