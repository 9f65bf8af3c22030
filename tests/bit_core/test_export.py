"""`bit export`: bundle, official .npz and ONNX, and a bundle read back on another machine."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import bit_core
from bit_core import weights
from bit_core.checkpoint import METADATA_FILE, WEIGHTS_FILE, ModelInfo, load_model, save_model
from bit_core.cli import main
from bit_core.data import LabeledImages
from bit_core.export import BundleError, export, read_bundle
from bit_core.predict import Predictor

CLASSES = ["cat", "dog", "fox"]
PICKLE = b"\x80\x04\x95pickle"  # what torch.save would start with


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = bit_core.create_model("R14x0.5", len(CLASSES))
    torch.nn.init.normal_(model.head.conv.weight, std=0.05)
    torch.nn.init.normal_(model.head.conv.bias, std=0.5)
    directory = tmp_path_factory.mktemp("export") / "m"
    save_model(directory, model, ModelInfo("R14x0.5", CLASSES, crop=48, temperature=1.7))
    return directory


def test_bundle_round_trip_predicts_the_same_through_the_cli(
    model_dir: Path, train_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    for suffix in (".zip", ".tar"):
        bundle = export(model_dir, "bundle", tmp_path / f"m{suffix}")
        info = read_bundle(bundle, tmp_path / f"unpacked{suffix}")
        assert info.classes == CLASSES and info.temperature == 1.7
        assert (tmp_path / f"unpacked{suffix}" / WEIGHTS_FILE).read_bytes() == (
            model_dir / WEIGHTS_FILE
        ).read_bytes()
    images = [str(p) for p in sorted(train_folder.rglob("*.png"))[:4]]
    assert images
    outputs = []
    for model in (model_dir, tmp_path / "m.zip"):
        assert main(["predict", str(model), *images, "--json", "--device", "cpu"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1]


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_bundles_are_checked_strictly(model_dir: Path, tmp_path: Path):
    weights_bytes = (model_dir / WEIGHTS_FILE).read_bytes()
    meta = json.loads((model_dir / METADATA_FILE).read_text())
    good = {WEIGHTS_FILE: weights_bytes, METADATA_FILE: json.dumps(meta).encode()}
    read_bundle(_zip(tmp_path / "ok.zip", good), tmp_path / "ok")

    cases = {
        "extra member": {**good, "evil.pkl": b"x"},
        "path in name": {"../" + WEIGHTS_FILE: weights_bytes, METADATA_FILE: good[METADATA_FILE]},
        "missing json": {WEIGHTS_FILE: weights_bytes},
        "not json": {**good, METADATA_FILE: b"\x80pickle"},
        "unknown field": {**good, METADATA_FILE: json.dumps({**meta, "x": 1}).encode()},
        "bad arch": {**good, METADATA_FILE: json.dumps({**meta, "arch": "R9"}).encode()},
        "bad crop type": {**good, METADATA_FILE: json.dumps({**meta, "crop": "48"}).encode()},
        "wrong sha": {**good, METADATA_FILE: json.dumps({**meta, "sha256": "0" * 64}).encode()},
        "class count": {
            **good,
            METADATA_FILE: json.dumps({**meta, "classes": ["a", "b"]}).encode(),
        },
        "pickle weights": {
            WEIGHTS_FILE: PICKLE,
            METADATA_FILE: json.dumps(
                {**meta, "sha256": hashlib.sha256(PICKLE).hexdigest()}
            ).encode(),
        },
    }
    for case, members in cases.items():
        with pytest.raises(BundleError):
            read_bundle(_zip(tmp_path / f"{case}.zip", members), tmp_path / case)
    # A tar with a link member is refused too.
    with tarfile.open(tmp_path / "link.tar", "w") as archive:
        data = good[METADATA_FILE]
        entry = tarfile.TarInfo(METADATA_FILE)
        entry.size = len(data)
        archive.addfile(entry, io.BytesIO(data))
        link = tarfile.TarInfo(WEIGHTS_FILE)
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
    with pytest.raises(BundleError):
        read_bundle(tmp_path / "link.tar", tmp_path / "link")
    # Size bound on the weights.
    with pytest.raises(BundleError, match="too large"):
        read_bundle(tmp_path / "ok.zip", tmp_path / "small", max_weights_bytes=1000)


def test_npz_export_holds_the_head_and_reloads_to_identical_logits(model_dir: Path, tmp_path: Path):
    npz = export(model_dir, "npz", tmp_path / "m.npz")
    assert weights.infer_npz_architecture(npz) == ("R14x0.5", len(CLASSES))
    with np.load(npz, allow_pickle=False) as archive:
        assert archive["resnet/head/conv2d/kernel"].shape[:2] == (1, 1)
        assert archive["resnet/root_block/standardized_conv2d/kernel"].shape[:3] == (7, 7, 3)
    original, _ = load_model(model_dir)
    fresh = bit_core.create_model("R14x0.5", len(CLASSES))
    bit_core.load_bit_npz(fresh, npz, load_head=True)
    x = torch.rand(3, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        assert torch.equal(original.eval()(x), fresh.eval()(x))


def test_weights_import_takes_a_bundle_as_a_base_model(model_dir: Path, tmp_path: Path):
    bundle = export(model_dir, "bundle", tmp_path / "pets.zip")
    assert main(["weights", "import", str(bundle), "--weights-dir", str(tmp_path / "w")]) == 0
    entry = weights.find("pets", tmp_path / "w")
    assert entry is not None and (entry.arch, entry.num_classes) == ("R14x0.5", len(CLASSES))
    base = bit_core.create_model("R14x0.5", 5)
    bit_core.load_bit_npz(base, entry.path, load_head=False)  # fine-tuning loads it so
    original, _ = load_model(model_dir)
    assert torch.equal(base.root.conv.weight, original.root.conv.weight)


def test_export_cli_refuses_an_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "x.npz"
    assert main(["export", str(tmp_path / "nope"), "--format", "npz", "--out", str(out)]) == 2
    assert "model.json" in capsys.readouterr().err and not out.exists()


def test_onnx_export_matches_the_predictor_on_real_images(
    model_dir: Path, train_folder: Path, tmp_path: Path
):
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package ([onnx] extra)")
    ort = pytest.importorskip("onnxruntime", reason="the ONNX check runs onnxruntime")
    import onnx

    out = tmp_path / "m.onnx"
    assert main(["export", str(model_dir), "--format", "onnx", "--out", str(out)]) == 0
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["bit.classes"]) == CLASSES
    assert meta["bit.crop"] == "48" and meta["bit.input_range"] == "[-1, 1]"
    assert json.loads(meta["bit.temperature"]) == 1.7
    # Standardization is folded: no reduction over kernels is left in the graph.
    ops = {node.op_type for node in proto.graph.node}
    assert "BatchNormalization" not in ops and "ReduceMean" not in ops

    predictor = Predictor.load(model_dir, device="cpu", precision="fp32")
    images = LabeledImages.from_folder(train_folder)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for size in (1, 7):  # dynamic batch
        batch = predictor.preprocess(list(images.sources)[:size])
        expected = predictor.probabilities(batch).numpy()
        _logits, probabilities = session.run(None, {"images": batch.numpy()})
        assert probabilities.shape == (size, len(CLASSES))
        assert np.abs(probabilities - expected).max() <= 1e-4
        assert not np.allclose(expected, expected[:, :1])  # the classes differ: a real check
