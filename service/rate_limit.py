"""Per-API-key rate limits: a token bucket per key id; over it, 429 with Retry-After.

Why a token bucket: a client may send a burst (a batch of predictions) and then a steady
rate, and there is no window edge at which it can send twice the limit, as a fixed window
allows. The bucket holds `rate_limit_burst` tokens, refills at `rate_limit_per_minute`
and every authenticated `/v1` request takes one.

Where the buckets live: in Redis when the broker is Redis, so several API replicas share
each key's bucket. A bucket is one hash updated by one Lua script, so two replicas cannot
both spend the last token, and the script reads Redis's clock, so replicas whose clocks
disagree still refill alike. In the embedded mode (one process, no server) a dict under a
lock does the same job with the same arithmetic.

`take` also spends several tokens at once (`cost`), for the per-tenant predictions quota
(service.quotas.predictions), which counts images, not requests: a request is let through
while the bucket holds a token, and may leave it in debt, which later requests wait out. So
a batch is never refused for its size alone, and the sustained rate still holds.

If Redis cannot be reached the request is let through, with a warning: the limit guards
against a runaway client and must not turn a Redis blip into an API outage (the endpoints
that need the broker answer for themselves).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Protocol

import redis
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool

from service.auth import Principal
from service.errors import ApiError
from service.settings import Settings

log = logging.getLogger(__name__)

# KEYS[1]: the bucket; ARGV: capacity, tokens per second, cost. Returns {allowed, tokens left}.
# Numbers go back as strings: Redis turns a Lua number reply into an integer.
_TAKE_SCRIPT = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
-- A full bucket is the same as no bucket: let the state expire once it would be full again.
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1000)
return {allowed, tostring(tokens)}
"""


class Buckets(Protocol):
    """Where token buckets live; `take` spends `cost` tokens of `key` if it has one."""

    blocking: bool  # whether `take` waits on I/O (then the event loop must not call it)

    def take(
        self, key: str, *, capacity: float, rate: float, cost: float = 1
    ) -> tuple[bool, float]:
        """(whether tokens were taken, tokens left after the refill; below 0: in debt)."""
        ...


class LocalBuckets:
    """Buckets in this process (the embedded mode: one API process)."""

    blocking = False  # a dict under a lock

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, monotonic time)

    def take(
        self, key: str, *, capacity: float, rate: float, cost: float = 1
    ) -> tuple[bool, float]:
        with self._lock:
            now = self._clock()
            tokens, at = self._state.get(key, (capacity, now))
            tokens = min(capacity, tokens + (now - at) * rate)
            allowed = tokens >= 1
            if allowed:
                tokens -= cost
            self._state[key] = (tokens, now)
            return allowed, tokens


class RedisBuckets:
    """Buckets in Redis, shared by every API replica on the same Redis."""

    blocking = True  # a round trip to Redis

    def __init__(self, url: str, prefix: str = "") -> None:
        # Short timeouts: a request waits at most this long for a Redis that hangs.
        self._client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._script = self._client.register_script(_TAKE_SCRIPT)
        self.prefix = f"{prefix}bit:rate:"

    def take(
        self, key: str, *, capacity: float, rate: float, cost: float = 1
    ) -> tuple[bool, float]:
        allowed, tokens = self._script(keys=[self.prefix + key], args=[capacity, rate, cost])
        return bool(allowed), float(tokens)

    def close(self) -> None:
        self._client.close()


class RateLimiter:
    """A token bucket per API key: `capacity` requests at once, `per_minute` sustained."""

    def __init__(self, buckets: Buckets, *, per_minute: int, capacity: int) -> None:
        if per_minute <= 0 or capacity < 1:
            raise ValueError("a rate limit needs per_minute > 0 and capacity >= 1")
        self.buckets = buckets
        self.per_minute = per_minute
        self.capacity = capacity
        self._rate = per_minute / 60.0  # tokens per second

    def retry_after(self, key_id: int) -> int | None:
        """Take a token for `key_id`: None if allowed, else whole seconds until one refills."""
        try:
            allowed, tokens = self.buckets.take(
                str(key_id), capacity=self.capacity, rate=self._rate
            )
        except redis.RedisError as exc:
            log.warning("rate limit not applied: Redis unreachable (%s)", type(exc).__name__)
            return None
        if allowed:
            return None
        return max(1, math.ceil((1 - tokens) / self._rate))

    def check(self, principal: Principal) -> None:
        """Raise 429 `rate_limited` when the caller's key has no token left."""
        wait = self.retry_after(principal.key_id)
        if wait is None:
            return
        raise ApiError(
            429,
            "rate_limited",
            f"this API key is over its rate limit of {self.per_minute} requests a minute "
            f"(bursts of {self.capacity}); retry in {wait} s, or ask the operator to raise "
            "BIT_RATE_LIMIT_PER_MINUTE",
            retry_after=wait,
            limit_per_minute=self.per_minute,
        )


def buckets_for(settings: Settings) -> Buckets:
    """Buckets in the broker's Redis when it is Redis (shared by replicas), else here."""
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return RedisBuckets(settings.broker_url, settings.broker_key_prefix)
    return LocalBuckets()


def limiter_for(settings: Settings) -> RateLimiter | None:
    """The limiter the settings ask for; None when limits are off (per minute = 0)."""
    if settings.rate_limit_per_minute <= 0:
        return None
    return RateLimiter(
        buckets_for(settings),
        per_minute=settings.rate_limit_per_minute,
        capacity=settings.rate_limit_burst or settings.rate_limit_per_minute,
    )


def install(app: FastAPI) -> None:
    """Give `app` its limiter (its buckets, when in-process, are this app's)."""
    app.state.rate_limiter = limiter_for(app.state.settings)


async def enforce(request: Request, principal: Principal) -> None:
    """Spend one of the caller's tokens; called once the API key is authenticated."""
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is None:
        return
    if limiter.buckets.blocking:
        await run_in_threadpool(limiter.check, principal)
    else:
        limiter.check(principal)
