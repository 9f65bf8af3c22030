"""Short-lived memory of the two database reads every predict makes: whose API key it is,
and which model an id names.

Each read is a hop to a worker thread, a pooled connection and the ORM: a sizeable share of
the service's own overhead on a CPU predict (BENCHMARKS.md), more against PostgreSQL over a
network. So an API process keeps each answer for `lookup_cache_s` seconds (1 by default).

What that costs, and only that: a key revoked, or a model archived or deleted, by another
process is still accepted here for at most `lookup_cache_s`, and a model's threshold changed
there is applied here that much later. In this process the routes that archive, delete or
change a model, or revoke a key, forget it at once. Only answers that let a
request through are kept: a new key or model works at once, an unknown or revoked key is
asked about every time, and every error a caller sees is decided by the database, as
without the cache (an expired key's principal is kept: the API refuses it on every request
by its expiry, a check that needs no database).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Annotated, Generic, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool

from service.auth import Principal, authenticate, hash_key, visible
from service.db.session import session_factory
from service.inference.cache import ModelRef
from service.models import service
from service.settings import Settings

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """A bounded map whose entries expire `ttl_s` seconds after they were put.

    Thread-safe: the event loop reads and fills it, the routes that archive or delete a
    model (on worker threads) forget entries.
    """

    def __init__(
        self,
        ttl_s: float,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[K, tuple[float, V]] = {}  # key -> (expiry, value), oldest first

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._entries[key]
                return None
            return entry[1]

    def put(self, key: K, value: V) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            self._entries.pop(key, None)  # re-inserted last: the dict stays oldest first
            while len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = (self._clock() + self.ttl_s, value)

    def forget(self, key: K) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def forget_where(self, matches: Callable[[V], bool]) -> None:
        """Forget every entry whose value `matches` (a scan: for rare events, like a revoke)."""
        with self._lock:
            for key in [k for k, (_, value) in self._entries.items() if matches(value)]:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class ServedModel:
    """What a predict needs of a ready model's row: plain values, not an ORM object (the
    ref carries the model's threshold and temperature, so predict reads no other row)."""

    ref: ModelRef
    tenant: str

    def visible_to(self, principal: Principal) -> bool:
        return visible(principal, self)


class Lookups:
    """The caller of a key and the model of an id, each from memory when recently read."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.database_url = settings.database_url
        self.principals: TtlCache[str, Principal] = TtlCache(settings.lookup_cache_s, clock=clock)
        self.models: TtlCache[int, ServedModel] = TtlCache(settings.lookup_cache_s, clock=clock)
        # (tenant, "name" | "name@alias" | "name:3") -> (tenant, name, model id)
        self.names: TtlCache[tuple[str, str], tuple[str, str, int]] = TtlCache(
            settings.lookup_cache_s, clock=clock
        )

    async def principal(self, key: str) -> Principal | None:
        """The principal of a valid, unrevoked key (`auth.authenticate`); None otherwise."""
        key_hash = hash_key(key)  # what is kept in memory: the hash, as in the database
        principal = self.principals.get(key_hash)
        if principal is None:
            principal = await run_in_threadpool(self._authenticate, key)
            if principal is not None:
                self.principals.put(key_hash, principal)
        return principal

    async def model(self, principal: Principal, model_id: int) -> ServedModel:
        """A ready model the caller may use; the database's 404 or 409 otherwise."""
        model = self.models.get(model_id)
        if model is None or not model.visible_to(principal):
            # Not remembered, or not this caller's: the database decides, with its message.
            model = await run_in_threadpool(self._read_model, principal, model_id)
            self.models.put(model_id, model)
        return model

    async def model_id_of(self, principal: Principal, ref: str) -> int:
        """The id a model reference (`name`, `name@alias`, `name:3`) names in the caller's
        tenant, from memory when recently resolved; the database's 404 or 422 otherwise."""
        key = (principal.tenant, ref)
        entry = self.names.get(key)
        if entry is None:
            model_id = await run_in_threadpool(self._resolve, principal, ref)
            name = ref.split("@", 1)[0].split(":", 1)[0]
            entry = (principal.tenant, name, model_id)
            self.names.put(key, entry)
        return entry[2]

    def forget_name(self, tenant: str, name: str) -> None:
        """An alias moved, or a version archived here: resolve `name` afresh from now on."""
        self.names.forget_where(lambda entry: entry[0] == tenant and entry[1] == name)

    def forget_model(self, model_id: int) -> None:
        """Archived, deleted or changed here: read it afresh from the next request on."""
        self.models.forget(model_id)

    def forget_key(self, prefix: str) -> None:
        """Revoked here: refuse the key(s) with this prefix from the next request on (only
        hashes are kept, so the principals are matched by their prefix)."""
        self.principals.forget_where(lambda principal: principal.prefix == prefix)

    def _authenticate(self, key: str) -> Principal | None:
        with session_factory(self.database_url)() as session:
            return authenticate(session, key)

    def _resolve(self, principal: Principal, ref: str) -> int:
        with session_factory(self.database_url)() as session:
            return service.resolve_model_id(session, principal=principal, ref=ref)

    def _read_model(self, principal: Principal, model_id: int) -> ServedModel:
        with session_factory(self.database_url)() as session:
            row = service.model_for_prediction(session, principal=principal, model_id=model_id)
            return ServedModel(service.model_ref(row), row.tenant)


def install(app: FastAPI) -> None:
    """Give `app` its lookups (kept per app, as its settings are)."""
    app.state.lookups = Lookups(app.state.settings)


async def get_lookups(request: Request) -> Lookups:
    lookups: Lookups = request.app.state.lookups
    return lookups


LookupsDep = Annotated[Lookups, Depends(get_lookups)]
