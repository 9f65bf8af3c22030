"""A thread-safe LRU cache of loaded predictors, keyed by model id and bounded by memory.

Loading a model (read the weights, build the network, standardize its kernels) takes from
a fraction of a second to several seconds, so the API keeps recently used models in
memory. The budget is the sum of each backbone's and each head's bytes; the least
recently used models are dropped first. Concurrent first requests for one model wait for
a single load instead of each loading their own copy.

Linear models of one base share its backbone: the cache holds each backbone once, with
the models that use it, so N such models cost one backbone plus N heads, and a new one
loads only its head. Dropping a model never drops a backbone that another model uses.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from bit_core.backends import FeatureExtractor, make_features, resolve_backend
from bit_core.checkpoint import load_base, load_model, read_model_info
from bit_core.device import resolve_device
from bit_core.predict import Predictor, head_of
from bit_core.resnetv2 import ResNetV2
from service.db.artifacts import ArtifactStore
from service.errors import ApiError
from service.metrics import MODEL_CACHE
from service.models.bases import ArtifactBaseStore

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


Backbones = Callable[[str, Callable[[], FeatureExtractor]], FeatureExtractor]
"""(key, make) -> the cached backbone under `key`, made by `make` on first use."""

Loader = Callable[[ModelRef, Backbones], Predictor]
"""Loads a model's predictor, taking its backbone from the cache's `Backbones`."""


def predictor_bytes(predictor: Predictor) -> int:
    """Memory held by a predictor on its own: its backbone's weights and its head."""
    return predictor.features.nbytes + predictor.head_bytes


def load_from_store(
    store: ArtifactStore,
    ref: ModelRef,
    backbones: Backbones | None = None,
    *,
    device: str = "auto",
    precision: str = "auto",
    backend: str = "auto",
    onnx_cache_dir: Path | None = None,
) -> Predictor:
    """Load a model directory from the artifact store; failures become ApiErrors.

    A remote store's files are fetched into this host's cache and checked against the
    model's manifest first. bit_core checks the weights against the sha256 in model.json;
    we also check that model.json is the one the database row recorded, so a replaced
    directory is caught. A shared linear model takes its base's backbone from `backbones`
    (loading it from `bases/{sha256}` only if no model has yet); a whole model's backbone
    is its own.
    """
    backbones = backbones or (lambda _key, make: make())
    resolved = resolve_device(device)
    chosen = resolve_backend(backend, resolved)

    def features_of(model: ResNetV2, sha256: str, crop: int) -> FeatureExtractor:
        return make_features(
            model,
            sha256,
            backend=chosen,
            device=resolved,
            precision=precision,
            crop=crop,
            onnx_cache_dir=onnx_cache_dir,
        )

    try:
        directory = store.fetch_dir(ref.uri)  # a remote store's files, checked, in the cache
        info = read_model_info(directory)
        if info.sha256 != ref.sha256:
            raise _replaced(ref)
        if info.shared_base is not None:
            base_sha = info.shared_base["sha256"]
            bases = ArtifactBaseStore(store)
            key = f"base:{base_sha}"
            features = backbones(
                key,
                lambda: features_of(load_base(bases.get(base_sha), base_sha), base_sha, info.crop),
            )
            predictor = Predictor.on_backbone(features, key, directory, info)
        else:
            model, info = load_model(directory)
            key = f"model:{info.sha256}"
            features = backbones(key, lambda: features_of(model, info.sha256, info.crop))
            predictor = Predictor(
                features, head_of(model), info.classes, info.crop, backbone_key=key, info=info
            )
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
        raise _replaced(ref)
    # The row's temperature is the truth (model.json's is where it came from): the forward
    # thread's one division per batch, per model, applies it.
    predictor.temperature = ref.temperature
    return predictor


def _replaced(ref: ModelRef) -> ApiError:
    log.error("model %s: model.json sha256 differs from the database row", ref.id)
    return ApiError(
        500,
        "model_corrupt",
        f"the stored files of model {ref.id} are not the ones it was registered with; "
        "an operator must restore them, or fine-tune the model again",
    )


@dataclass
class _Entry:
    predictor: Predictor
    sha256: str
    size: int  # the head's bytes; its backbone is counted once, in _Backbone


@dataclass
class _Backbone:
    features: FeatureExtractor
    users: set[int] = field(default_factory=set)  # ids of the cached models on it


class ModelCache:
    """LRU of predictors by model id, at most `max_bytes` of weights (thread-safe).

    A single model larger than the whole budget is still served: it is cached alone.
    Evicting a model that a request is using is safe; the request keeps its reference.
    """

    def __init__(self, loader: Loader, max_bytes: int, *, max_loads: int = 2) -> None:
        """`max_loads`: models loading at once, at most. The budget bounds what is cached,
        not what is loading: without this bound, concurrent requests for many models that
        do not fit would each hold a whole model in memory while it loads."""
        self._loader = loader
        self.max_bytes = max_bytes
        self._loads = threading.BoundedSemaphore(max(1, max_loads))
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._loading: dict[int, Future[Predictor]] = {}
        self._backbones: dict[str, _Backbone] = {}
        self._backbones_loading: dict[str, Future[FeatureExtractor]] = {}
        self._pins: Counter[str] = Counter()  # backbones a model load in flight is using
        self.backbone_loads = 0  # backbones loaded so far (observability and tests)

    @property
    def used_bytes(self) -> int:
        """Bytes of weights held now: every backbone once, plus every head."""
        with self._lock:
            return self._used()

    def _used(self) -> int:
        heads = sum(entry.size for entry in self._entries.values())
        return heads + sum(b.features.nbytes for b in self._backbones.values())

    def ids(self) -> list[int]:
        """Cached model ids, least recently used first."""
        with self._lock:
            return list(self._entries)

    def backbone_keys(self) -> list[str]:
        """Keys of the backbones held now ('base:<sha256>' or 'model:<sha256>')."""
        with self._lock:
            return list(self._backbones)

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
        pinned: list[str] = []

        def backbone(key: str, make: Callable[[], FeatureExtractor]) -> FeatureExtractor:
            with self._lock:
                self._pins[key] += 1  # kept until this load is cached or has failed
                pinned.append(key)
            return self._backbone(key, make)

        try:
            with self._loads:
                predictor = self._loader(ref, backbone)
        except BaseException as exc:
            # Not cached: the next request tries again (the store may be back by then).
            with self._lock:
                if self._loading.get(ref.id) is pending:
                    del self._loading[ref.id]
                self._unpin(pinned)
            pending.set_exception(exc)
            raise
        with self._lock:
            # evict() during the load removed our marker: serve this request, cache nothing.
            if self._loading.get(ref.id) is pending:
                del self._loading[ref.id]
                self._insert(ref, predictor)
            self._unpin(pinned)
        pending.set_result(predictor)
        return predictor

    def _backbone(self, key: str, make: Callable[[], FeatureExtractor]) -> FeatureExtractor:
        """The backbone under `key`, made once however many models ask at the same time."""
        with self._lock:
            held = self._backbones.get(key)
            if held is not None:
                return held.features
            pending = self._backbones_loading.get(key)
            makes_here = pending is None
            if pending is None:
                pending = self._backbones_loading[key] = Future()
        if not makes_here:
            return pending.result()
        try:
            features = make()
        except BaseException as exc:
            with self._lock:
                del self._backbones_loading[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._backbones_loading[key]
            self._backbones[key] = _Backbone(features)
            self.backbone_loads += 1
        log.info("model cache: loaded backbone %s (%d bytes)", key, features.nbytes)
        pending.set_result(features)
        return features

    def _unpin(self, keys: list[str]) -> None:
        for key in keys:  # callers hold the lock
            self._pins[key] -= 1
            if not self._pins[key]:
                del self._pins[key]
        self._drop_unused_backbones()

    def _drop_unused_backbones(self) -> None:
        for key in [k for k, b in self._backbones.items() if not b.users and k not in self._pins]:
            dropped = self._backbones.pop(key)
            log.info("model cache: dropped backbone %s (%d bytes)", key, dropped.features.nbytes)
        self._report()

    def _report(self) -> None:
        """The cache's size on /metrics (callers hold the lock)."""
        MODEL_CACHE.labels("models").set(len(self._entries))
        MODEL_CACHE.labels("backbones").set(len(self._backbones))
        MODEL_CACHE.labels("bytes").set(self._used())

    def _remove(self, model_id: int) -> _Entry | None:
        entry = self._entries.pop(model_id, None)  # callers hold the lock
        if entry is not None:
            held = self._backbones.get(entry.predictor.backbone_key)
            if held is not None:
                held.users.discard(model_id)
        return entry

    def _insert(self, ref: ModelRef, predictor: Predictor) -> None:
        self._remove(ref.id)
        key = predictor.backbone_key
        held = self._backbones.get(key)
        if held is None or held.features is not predictor.features:
            # A loader that did not go through `Backbones` (or a reloaded model): its own.
            key = predictor.backbone_key = f"model-id:{ref.id}:{ref.sha256}"
            held = self._backbones[key] = _Backbone(predictor.features)
        held.users.add(ref.id)
        self._entries[ref.id] = _Entry(predictor, ref.sha256, predictor.head_bytes)
        for evicted_id in list(self._entries):
            if self._used() <= self.max_bytes:
                break
            if evicted_id == ref.id:
                continue
            evicted = self._remove(evicted_id)
            self._drop_unused_backbones()
            log.info("model cache: evicted model %s", evicted_id if evicted else None)
        self._drop_unused_backbones()
        log.info(
            "model cache: loaded model %s on backbone %s (%d bytes in use)",
            ref.id,
            key,
            self._used(),
        )

    def evict(self, model_id: int) -> bool:
        """Drop a model (archived or deleted); True if it was cached or loading. Its
        backbone goes too, unless another cached model uses it."""
        with self._lock:
            loading = self._loading.pop(model_id, None) is not None
            entry = self._remove(model_id)
            self._drop_unused_backbones()
            return loading or entry is not None

    def clear(self) -> None:
        """Drop every model and backbone."""
        with self._lock:
            self._entries.clear()
            self._loading.clear()
            self._backbones.clear()
            self._report()
