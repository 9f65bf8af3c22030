"""Linear models of one base share its backbone in the API process: one backbone in memory,
one backbone forward for a batch that mixes them, and each answer is its own model's."""

from __future__ import annotations

import asyncio
import io
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bit_core
from bit_core.backends import onnxruntime_installed
from bit_core.checkpoint import ModelInfo, save_shared_linear
from bit_core.predict import Predictor
from service.db.artifacts import LocalArtifactStore
from service.errors import ApiError
from service.inference.batcher import Batcher
from service.inference.cache import ModelCache, ModelRef, load_from_store, predictor_bytes
from service.inference.inference import ALONE_DECODE_BYTES, Inference
from service.models.bases import ArtifactBaseStore
from tests.factories import make_bit_npz, save_tiny_model

TIMEOUT_S = 30  # every wait in these tests is bounded by this
ARCH = "R14x0.5"
BACKENDS = ["torch"] + (["onnxruntime"] if onnxruntime_installed() else [])


def publish_linear(
    store: LocalArtifactStore, base: torch.nn.Module, model_id: int, classes: int
) -> ModelRef:
    """A linear model of `base` with a random head, stored as head + base reference."""
    model = bit_core.create_model(ARCH, classes)
    backbone = {k: v for k, v in base.state_dict().items() if not k.startswith("head.conv.")}
    model.load_state_dict(backbone, strict=False)
    generator = torch.Generator().manual_seed(model_id)
    with torch.no_grad():
        model.head.conv.weight.copy_(torch.randn(model.head.conv.weight.shape, generator=generator))
        model.head.bias.copy_(torch.randn(classes, generator=generator))
    shared = ArtifactBaseStore(store).put(model, arch=ARCH, name="test-base")
    key = f"jobs/{model_id}/model"
    directory = store.local_dir(key)
    info = ModelInfo(ARCH, [f"c{model_id}-{i}" for i in range(classes)], crop=32)
    info = save_shared_linear(directory, model, info, shared)
    store.publish_dir(key, directory)
    return ModelRef(model_id, key, info.sha256)


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalArtifactStore, list[ModelRef]]:
    """An artifact store with four linear models of one base (ids 1-4) and a whole model (9)."""
    root = tmp_path_factory.mktemp("shared")
    base = bit_core.create_model(ARCH, 10)
    bit_core.load_bit_npz(base, make_bit_npz(root / "base.npz", ARCH), load_head=False)
    store = LocalArtifactStore(root / "artifacts")
    refs = [publish_linear(store, base, i, classes=2 + i) for i in range(1, 5)]
    whole = save_tiny_model(store.path("jobs/9/model"))
    store.publish_dir("jobs/9/model", store.path("jobs/9/model"))
    return store, [*refs, ModelRef(9, "jobs/9/model", whole.sha256)]


def cache_for(store: LocalArtifactStore, backend: str, max_bytes: int = 1 << 30) -> ModelCache:
    return ModelCache(partial(load_from_store, store, device="cpu", backend=backend), max_bytes)


def big_png(seed: int) -> bytes:
    """Noise large enough that a call never decodes alone on the forward thread."""
    pixels = np.random.default_rng(seed).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    assert len(buffer.getvalue()) > ALONE_DECODE_BYTES
    return buffer.getvalue()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_models_of_one_base_hold_one_backbone(
    stored: tuple[LocalArtifactStore, list[ModelRef]], backend: str
):
    store, refs = stored
    cache = cache_for(store, backend)
    first = cache.get(refs[0])
    assert cache.backbone_loads == 1
    others = [cache.get(ref) for ref in refs[1:4]]
    # Ready with no load of its own: only the head (a few KB) was read.
    assert cache.backbone_loads == 1
    assert all(p.features is first.features for p in others)
    heads = sum(p.head_bytes for p in [first, *others])
    assert cache.used_bytes == first.features.nbytes + heads
    assert heads < first.features.nbytes // 10
    assert cache.backbone_keys() == [first.backbone_key]
    assert first.backbone_key.startswith("base:")


def test_evicting_a_head_never_evicts_a_base_that_others_use(
    stored: tuple[LocalArtifactStore, list[ModelRef]],
):
    store, refs = stored
    cache = cache_for(store, "torch")
    predictors = [cache.get(ref) for ref in refs[:3]]
    base_key = predictors[0].backbone_key
    assert cache.evict(refs[0].id)
    assert base_key in cache.backbone_keys() and cache.ids() == [2, 3]
    cache.get(refs[3])  # one more of the base: still no backbone load
    assert cache.backbone_loads == 1
    # The budget forces an eviction: the least recently used head goes, and the base
    # stays, since other models still use it.
    head = cache.get(refs[1]).head_bytes
    cache.get(refs[2]), cache.get(refs[3])  # model 2 is now the least recently used
    whole_bytes = predictor_bytes(cache_for(store, "torch").get(refs[4]))
    cache.max_bytes = cache.used_bytes + whole_bytes - head // 2
    cache.get(refs[4])
    assert cache.ids() == [3, 4, 9]
    assert base_key in cache.backbone_keys() and cache.backbone_loads == 2
    for ref in refs[:4]:
        cache.evict(ref.id)
    assert base_key not in cache.backbone_keys()  # its last user is gone: so is the base
    assert cache.ids() == [9]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batch_mixing_models_runs_one_backbone_forward(
    stored: tuple[LocalArtifactStore, list[ModelRef]], backend: str
):
    store, refs = stored
    linear = refs[:3]
    images = [[big_png(10 * ref.id + i) for i in range(2)] for ref in linear]

    async def main() -> tuple[list[list[list[float]]], int]:
        inference = Inference(
            cache_for(store, backend),
            Batcher(max_batch_size=32, max_wait_s=TIMEOUT_S),
            decode_threads=2,
        )
        try:
            predictors = [await inference.predictor(ref) for ref in linear]
            before = predictors[0].features.forwards
            answers = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        inference.predict(ref, sources, ["a", "b"], top_k=99)
                        for ref, sources in zip(linear, images, strict=True)
                    )
                ),
                TIMEOUT_S,
            )
            forwards = predictors[0].features.forwards - before
        finally:
            await inference.aclose()
        probabilities = [
            [[p.probability for p in sorted(row, key=lambda p: p.label)] for row in answer]
            for answer in answers
        ]
        return probabilities, forwards

    served, forwards = asyncio.run(main())
    assert forwards == 1  # three models, six images: one backbone forward
    bases = ArtifactBaseStore(store)
    for ref, sources, answer in zip(linear, images, served, strict=True):
        alone = Predictor.load(store.fetch_dir(ref.uri), device="cpu", backend=backend, bases=bases)
        expected = alone.probabilities(alone.preprocess(sources))
        order = sorted(range(len(alone.classes)), key=lambda i: alone.classes[i])
        assert torch.allclose(torch.tensor(answer), expected[:, order], atol=1e-5)


def test_a_whole_model_keeps_its_own_lane(stored: tuple[LocalArtifactStore, list[ModelRef]]):
    store, refs = stored
    cache = cache_for(store, "torch")
    shared, whole = cache.get(refs[0]), cache.get(refs[4])
    assert whole.backbone_key == f"model:{refs[4].sha256}"
    assert shared.features is not whole.features
    assert len(cache.backbone_keys()) == 2


def test_a_missing_base_is_reported_as_missing_files(tmp_path: Path):
    store = LocalArtifactStore(tmp_path / "artifacts")
    base = bit_core.create_model(ARCH, 10)
    ref = publish_linear(store, base, 1, classes=2)
    store.delete_prefix("bases")
    with pytest.raises(ApiError) as missing:
        cache_for(store, "torch").get(ref)
    assert missing.value.code == "model_files_missing"
