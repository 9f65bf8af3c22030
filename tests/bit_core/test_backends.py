"""Inference backends agree with torch, and linear models share their base's backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bit_core.backends import (
    BackendUnavailable,
    available_backends,
    make_features,
    onnx_cache_path,
    onnxruntime_installed,
    resolve_backend,
)
from bit_core.checkpoint import (
    HEAD_FILE,
    WEIGHTS_FILE,
    LocalBaseStore,
    load_model,
    read_model_info,
)
from bit_core.data import LabeledImages
from bit_core.export import BundleError, export, read_bundle
from bit_core.hyperrule import hyperrule
from bit_core.predict import Predictor
from bit_core.recipe import resolve_base, run_finetune
from tests.factories import make_bit_npz

BACKENDS = ["torch"] + (["onnxruntime"] if onnxruntime_installed() else [])
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bit_npz(tmp_path_factory.mktemp("w") / "base.npz", "R14x0.5", num_classes=10)


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real handwritten digits (scikit-learn's scans), 3 classes, as PNG files."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    root = tmp_path_factory.mktemp("digits")
    for label in (0, 1, 7):
        folder = root / f"digit{label}"
        folder.mkdir()
        rows = np.flatnonzero(digits.target == label)[:6]
        for row in rows:
            pixels = (digits.images[row] * (255 / 16)).astype(np.uint8)
            image = Image.fromarray(pixels).resize((40, 40), Image.Resampling.BILINEAR)
            image.convert("RGB").save(folder / f"{row}.png")
    return root


@pytest.fixture(scope="module")
def fitted(
    pretrained: Path, digits_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Path]:
    """(whole linear model, the same model stored as head + shared base, bases folder)."""
    train = LabeledImages.from_folder(digits_folder)
    plan = hyperrule(len(train), (40, 40), mode="linear", precrop=48, crop=48)
    root = tmp_path_factory.mktemp("models")
    base = resolve_base(str(pretrained))
    _, whole = run_finetune(train, base, plan, root / "whole")
    bases = LocalBaseStore(root / "bases")
    _, shared = run_finetune(train, base, plan, root / "shared", bases=bases)
    assert whole is not None and shared is not None
    return root / "whole", root / "shared", root / "bases"


def test_auto_picks_onnxruntime_on_a_cpu_only_when_installed():
    expected = "onnxruntime" if onnxruntime_installed() else "torch"
    assert resolve_backend("auto", CPU) == expected
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_backend("torch", CPU) == "torch"
    with pytest.raises(ValueError, match="unknown inference backend 'tensorflow'"):
        resolve_backend("tensorflow", CPU)


def test_available_backends_need_a_cuda_provider_on_a_gpu(monkeypatch: pytest.MonkeyPatch):
    assert available_backends(CPU) == BACKENDS
    if onnxruntime_installed():
        import onnxruntime

        monkeypatch.setattr(
            onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"]
        )
        assert available_backends(torch.device("cuda")) == ["torch"]
        monkeypatch.setattr(
            onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider"]
        )
        assert available_backends(torch.device("cuda")) == ["torch", "onnxruntime"]


def test_a_missing_onnxruntime_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("bit_core.backends.onnxruntime_installed", lambda: False)
    assert resolve_backend("auto", CPU) == "torch"
    with pytest.raises(BackendUnavailable, match=r"pip install 'bit-service\[onnxruntime\]'"):
        resolve_backend("onnxruntime", CPU)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_matches_torch_on_real_images(
    backend: str, fitted: tuple[Path, Path, Path], digits_folder: Path, tmp_path: Path
):
    whole, _, _ = fitted
    images = sorted(str(p) for p in digits_folder.rglob("*.png"))
    reference = Predictor.load(whole, device="cpu", backend="torch")
    predictor = Predictor.load(whole, device="cpu", backend=backend, onnx_cache_dir=tmp_path)
    assert predictor.backend == backend
    batch = reference.preprocess(images)  # the same preprocessing for both
    expected, got = reference.probabilities(batch), predictor.probabilities(batch)
    assert got.shape == (len(images), 3)
    assert (got - expected).abs().max().item() <= 1e-4
    # The fitted head separates these digits: the comparison is not of near-uniform rows.
    assert expected.max(dim=1).values.mean() > 0.5
    # Batch 1 and odd batch sizes take the same graph (dynamic batch).
    single = predictor.probabilities(batch[:1])
    assert (single - expected[:1]).abs().max().item() <= 1e-4


@pytest.mark.skipif(not onnxruntime_installed(), reason="needs onnxruntime")
def test_the_onnx_graph_is_cached_by_the_weights_sha256(
    fitted: tuple[Path, Path, Path], tmp_path: Path
):
    whole, _, _ = fitted
    sha = read_model_info(whole).sha256
    Predictor.load(whole, device="cpu", backend="onnxruntime", onnx_cache_dir=tmp_path)
    cached = onnx_cache_path(tmp_path, sha)
    assert cached.is_file()
    stamp = cached.stat().st_mtime_ns
    Predictor.load(whole, device="cpu", backend="onnxruntime", onnx_cache_dir=tmp_path)
    assert cached.stat().st_mtime_ns == stamp  # reused, not exported again
    # One graph serves every image size: height and width are dynamic.
    model, _ = load_model(whole)
    features = make_features(model, sha, backend="onnxruntime", device=CPU, onnx_cache_dir=tmp_path)
    assert features(torch.zeros(2, 3, 64, 64)).shape == (2, model.num_features)
    assert features(torch.zeros(1, 3, 40, 40)).shape == (1, model.num_features)


def test_a_shared_linear_model_is_its_head_and_a_reference(fitted: tuple[Path, Path, Path]):
    whole, shared, bases = fitted
    info = read_model_info(shared)
    assert info.shared_base is not None and info.shared_base["layer"] == "pre_logits"
    assert not (shared / WEIGHTS_FILE).exists()
    head_bytes = (shared / HEAD_FILE).stat().st_size
    assert head_bytes < 16 * 1024 < (whole / WEIGHTS_FILE).stat().st_size
    base_dir = bases / info.shared_base["sha256"]
    meta = json.loads((base_dir / "base.json").read_text())
    assert meta["sha256"] == info.shared_base["sha256"] and meta["arch"] == "R14x0.5"
    # Put together, it is the whole model, tensor for tensor.
    rebuilt, _ = load_model(shared, bases=LocalBaseStore(bases))
    original, _ = load_model(whole)
    for key, value in original.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


def test_models_of_one_base_store_it_once(
    fitted: tuple[Path, Path, Path], pretrained: Path, digits_folder: Path, tmp_path: Path
):
    _, shared, bases = fitted
    train = LabeledImages.from_folder(digits_folder)
    plan = hyperrule(len(train), (40, 40), mode="linear", precrop=48, crop=48)
    _, again = run_finetune(
        train, resolve_base(str(pretrained)), plan, tmp_path / "m2", bases=LocalBaseStore(bases)
    )
    assert again is not None and again.shared_base == read_model_info(shared).shared_base
    assert len([p for p in bases.iterdir() if p.is_dir()]) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_shared_model_predicts_as_its_whole_copy(
    backend: str, fitted: tuple[Path, Path, Path], digits_folder: Path, tmp_path: Path
):
    whole, shared, bases = fitted
    images = sorted(str(p) for p in digits_folder.rglob("*.png"))[:5]
    kwargs = {"device": "cpu", "backend": backend, "onnx_cache_dir": tmp_path}
    one = Predictor.load(whole, **kwargs)  # type: ignore[arg-type]
    two = Predictor.load(shared, bases=LocalBaseStore(bases), **kwargs)  # type: ignore[arg-type]
    batch = one.preprocess(images)
    assert (one.probabilities(batch) - two.probabilities(batch)).abs().max().item() <= 1e-5


def test_a_missing_base_says_what_to_do(fitted: tuple[Path, Path, Path], tmp_path: Path):
    _, shared, _ = fitted
    with pytest.raises(FileNotFoundError, match="bit export --format bundle"):
        Predictor.load(shared, device="cpu", bases=LocalBaseStore(tmp_path / "empty"))


def test_a_bundle_of_a_shared_model_is_self_contained(
    fitted: tuple[Path, Path, Path], digits_folder: Path, tmp_path: Path
):
    whole, shared, bases = fitted
    bundle = export(shared, "bundle", tmp_path / "m.zip", bases=LocalBaseStore(bases))
    info = read_bundle(bundle, tmp_path / "unpacked")
    assert info.shared_base is None and (tmp_path / "unpacked" / WEIGHTS_FILE).is_file()
    images = sorted(str(p) for p in digits_folder.rglob("*.png"))[:3]
    unpacked = Predictor.load(tmp_path / "unpacked", device="cpu", backend="torch")
    original = Predictor.load(whole, device="cpu", backend="torch")
    batch = original.preprocess(images)
    assert torch.allclose(unpacked.probabilities(batch), original.probabilities(batch))


def test_a_bundle_that_references_a_base_is_refused(
    fitted: tuple[Path, Path, Path], tmp_path: Path
):
    import zipfile

    _, shared, _ = fitted
    forged = tmp_path / "forged.zip"
    with zipfile.ZipFile(forged, "w") as archive:
        archive.write(shared / "model.json", "model.json")
        archive.writestr(WEIGHTS_FILE, (shared / HEAD_FILE).read_bytes())
    with pytest.raises(BundleError, match="whole model"):
        read_bundle(forged, tmp_path / "out")


def test_scratch_linear_models_stay_whole(digits_folder: Path, tmp_path: Path):
    """A random backbone is nobody's base: sharing it would store one per seed."""
    train = LabeledImages.from_folder(digits_folder)
    plan = hyperrule(len(train), (40, 40), mode="linear", precrop=48, crop=48)
    bases = LocalBaseStore(tmp_path / "bases")
    _, info = run_finetune(train, resolve_base("R14x0.5"), plan, tmp_path / "m", bases=bases)
    assert info is not None and info.shared_base is None
    assert not bases.root.exists()


def test_a_whole_model_in_memory_has_a_backbone_key(fitted: tuple[Path, Path, Path]):
    whole, _, _ = fitted
    model, info = load_model(whole)
    predictor = Predictor.from_model(model, info.classes, info.crop, device="cpu", info=info)
    assert predictor.backbone_key == info.sha256
    assert predictor.weight.shape == (3, model.num_features)  # the head, split off
