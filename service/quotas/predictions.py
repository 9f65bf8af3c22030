"""The predictions-per-minute quota: a token bucket per tenant, on predict's hot path.

The bucket is service.rate_limit's (in Redis when the broker is Redis, so replicas share a
tenant's bucket), holding one minute's worth and refilling at the tenant's limit; each
image classified takes a token. The limit itself is read from the database at most once per
`lookup_cache_s` per tenant and API process (as service.lookups keeps keys and models), so a
predict on a warm cache makes no database query for it. What that costs: a limit changed by
another process takes effect here up to `lookup_cache_s` later; the admin route that
changes it forgets it in its own process at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import redis
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool

from service.auth import Principal
from service.db.session import session_factory
from service.errors import ApiError
from service.lookups import TtlCache
from service.quotas.service import effective_limits
from service.rate_limit import Buckets, buckets_for
from service.settings import Settings

log = logging.getLogger(__name__)


class PredictionQuota:
    """Each tenant's predictions a minute, over all its keys."""

    def __init__(
        self, settings: Settings, buckets: Buckets, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.buckets = buckets
        self.limits: TtlCache[str, int] = TtlCache(settings.lookup_cache_s, clock=clock)

    async def check(self, tenant: str, images: int) -> None:
        """Spend `images` of the tenant's predictions; 429 `quota_predictions_exceeded` with
        Retry-After when it has none left."""
        limit = self.limits.get(tenant)
        if limit is None:
            limit = await run_in_threadpool(self._read_limit, tenant)
            self.limits.put(tenant, limit)
        if limit <= 0:
            return  # no limit: not even a bucket to touch
        if self.buckets.blocking:
            wait = await run_in_threadpool(self.retry_after, tenant, limit, images)
        else:
            wait = self.retry_after(tenant, limit, images)
        if wait is None:
            return
        raise ApiError(
            429,
            "quota_predictions_exceeded",
            f"tenant '{tenant}' is over its predictions per minute quota of {limit:,} "
            f"images; retry in {wait} s, or ask an operator to raise the quota "
            f"(PUT /v1/tenants/{tenant}/quotas)",
            retry_after=wait,
            quota="predictions_per_minute",
            limit=limit,
        )

    def retry_after(self, tenant: str, limit: int, images: int) -> int | None:
        """Take `images` tokens: None if allowed, else whole seconds until one refills."""
        rate = limit / 60.0
        try:
            allowed, tokens = self.buckets.take(
                f"tenant:{tenant}", capacity=limit, rate=rate, cost=images
            )
        except redis.RedisError as exc:  # as for the per-key limit: a Redis blip is no outage
            log.warning("predictions quota not applied: Redis unreachable (%s)", type(exc).__name__)
            return None
        if allowed:
            return None
        return max(1, math.ceil((1 - tokens) / rate))

    def forget(self, tenant: str) -> None:
        """The tenant's limit changed here: read it again on its next predict."""
        self.limits.forget(tenant)

    def _read_limit(self, tenant: str) -> int:
        with session_factory(self.settings.database_url)() as session:
            return effective_limits(session, self.settings, tenant=tenant).predictions_per_minute


def install(app: FastAPI) -> None:
    """Give `app` its predictions quota (its buckets, when in-process, are this app's)."""
    settings: Settings = app.state.settings
    app.state.prediction_quota = PredictionQuota(settings, buckets_for(settings))


async def enforce_predictions(request: Request, principal: Principal, images: int) -> None:
    """Spend `images` of the caller's tenant's predictions (predict, once the model is known)."""
    quota: PredictionQuota = request.app.state.prediction_quota
    await quota.check(principal.tenant, images)
