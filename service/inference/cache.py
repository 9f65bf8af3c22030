"""A thread-safe LRU cache of loaded predictors, keyed by model id and bounded by memory.

Loading a model (read the weights, build the network, standardize its kernels) takes from
a fraction of a second to several seconds, so the API keeps recently used models in
memory. The budget is the sum of each model's parameter and buffer bytes; the least
recently used models are dropped first. Concurrent first requests for one model wait for
a single load instead of each loading their own copy.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from bit_core.predict import Predictor
from service.db.artifacts import ArtifactStore
from service.errors import ApiError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """What the cache needs from a `Model` row: plain values, safe to pass between threads.

    `threshold` and `temperature` ride along so that predict reads no more rows: the
    default probability threshold (None: keep every class) and the temperature dividing
    the logits before the softmax (None: 1).
    """

    id: int
    uri: str
    sha256: str
    threshold: float | None = None
    temperature: float | None = None


Loader = Callable[[ModelRef], Predictor]


def predictor_bytes(predictor: Predictor) -> int:
    """Memory held by a predictor's model: its parameters and buffers, in bytes."""
    tensors = [*predictor.model.parameters(), *predictor.model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def load_from_store(
    store: ArtifactStore, ref: ModelRef, *, device: str = "auto", precision: str = "auto"
) -> Predictor:
    """Load a model directory from the artifact store; failures become ApiErrors.

    A remote store's files are fetched into this host's cache and checked against the
    model's manifest first. bit_core checks the weights against the sha256 in model.json;
    we also check that model.json is the one the database row recorded, so a replaced
    directory is caught.
    """
    try:
        directory = store.fetch_dir(ref.uri)  # a remote store's files, checked, in the cache
        predictor = Predictor.load(directory, device=device, precision=precision)
    except FileNotFoundError as exc:
        log.error("model %s: files missing under %r: %s", ref.id, ref.uri, exc)
        raise ApiError(
            500,
            "model_files_missing",
            f"the stored files of model {ref.id} are missing; an operator must restore the "
            "artifact store, or fine-tune the model again",
        ) from exc
    except ValueError as exc:  # sha256 mismatch or unreadable model.json
        log.error("model %s: corrupt files under %r: %s", ref.id, ref.uri, exc)
        raise ApiError(
            500,
            "model_corrupt",
            f"the stored weights of model {ref.id} fail their integrity check; an operator "
            "must restore them from a backup, or fine-tune the model again",
        ) from exc
    except OSError as exc:
        log.warning("artifact store unreachable loading model %s: %s", ref.id, exc)
        raise ApiError(
            503,
            "artifact_store_unavailable",
            f"the files of model {ref.id} cannot be read right now; retry in a few seconds",
            retry_after=5,
        ) from exc
    if predictor.info is None or predictor.info.sha256 != ref.sha256:
        log.error("model %s: model.json sha256 differs from the database row", ref.id)
        raise ApiError(
            500,
            "model_corrupt",
            f"the stored files of model {ref.id} are not the ones it was registered with; "
            "an operator must restore them, or fine-tune the model again",
        )
    # The row's temperature is the truth (model.json's is where it came from): the forward
    # thread's one division per batch, per model, applies it.
    predictor.temperature = ref.temperature
    return predictor


@dataclass
class _Entry:
    predictor: Predictor
    sha256: str
    size: int


class ModelCache:
    """LRU of predictors by model id, at most `max_bytes` of weights (thread-safe).

    A single model larger than the whole budget is still served: it is cached alone.
    Evicting a model that a request is using is safe; the request keeps its reference.
    """

    def __init__(self, loader: Loader, max_bytes: int) -> None:
        self._loader = loader
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._loading: dict[int, Future[Predictor]] = {}
        self._used = 0

    @property
    def used_bytes(self) -> int:
        """Bytes of weights held now."""
        return self._used

    def ids(self) -> list[int]:
        """Cached model ids, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, model_id: object) -> bool:
        with self._lock:
            return model_id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def cached(self, ref: ModelRef) -> Predictor | None:
        """The predictor of `ref` if it is loaded, else None (never blocks on a load)."""
        with self._lock:
            return self._lookup(ref)

    def _lookup(self, ref: ModelRef) -> Predictor | None:
        entry = self._entries.get(ref.id)  # callers hold the lock
        if entry is None or entry.sha256 != ref.sha256:
            return None
        self._entries.move_to_end(ref.id)
        return entry.predictor

    def get(self, ref: ModelRef) -> Predictor:
        """The predictor of `ref`, loading it on first use (blocks; call it off the loop)."""
        with self._lock:
            predictor = self._lookup(ref)
            if predictor is not None:
                return predictor
            pending = self._loading.get(ref.id)
            loads_here = pending is None
            if pending is None:
                pending = self._loading[ref.id] = Future()
        if not loads_here:
            return pending.result()  # another thread is loading it: share its result
        try:
            predictor = self._loader(ref)
            size = predictor_bytes(predictor)
        except BaseException as exc:
            # Not cached: the next request tries again (the store may be back by then).
            with self._lock:
                if self._loading.get(ref.id) is pending:
                    del self._loading[ref.id]
            pending.set_exception(exc)
            raise
        with self._lock:
            # evict() during the load removed our marker: serve this request, cache nothing.
            if self._loading.get(ref.id) is pending:
                del self._loading[ref.id]
                self._insert(ref, predictor, size)
        pending.set_result(predictor)
        return predictor

    def _insert(self, ref: ModelRef, predictor: Predictor, size: int) -> None:
        old = self._entries.pop(ref.id, None)
        if old is not None:
            self._used -= old.size
        while self._entries and self._used + size > self.max_bytes:
            evicted_id, evicted = self._entries.popitem(last=False)
            self._used -= evicted.size
            log.info("model cache: evicted model %s (%d bytes)", evicted_id, evicted.size)
        self._entries[ref.id] = _Entry(predictor, ref.sha256, size)
        self._used += size
        log.info("model cache: loaded model %s (%d bytes, %d in use)", ref.id, size, self._used)

    def evict(self, model_id: int) -> bool:
        """Drop a model (archived or deleted); True if it was cached or loading."""
        with self._lock:
            loading = self._loading.pop(model_id, None) is not None
            entry = self._entries.pop(model_id, None)
            if entry is not None:
                self._used -= entry.size
            return loading or entry is not None

    def clear(self) -> None:
        """Drop every model."""
        with self._lock:
            self._entries.clear()
            self._loading.clear()
            self._used = 0
