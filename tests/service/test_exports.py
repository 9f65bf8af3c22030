"""GET /v1/models/{id}/export and POST /v1/models/import, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import bit_core
from bit_core.checkpoint import METADATA_FILE, WEIGHTS_FILE, read_model_info
from bit_core.export import read_bundle
from bit_core.predict import Predictor
from service.settings import Settings
from tests.service.conftest import error_of, predict_files, register_model, uploads


@pytest.fixture(autouse=True)
def cpu_inference(settings: Settings) -> None:
    settings.device = "cpu"


def test_bundle_export_imports_into_another_tenant_and_predicts_the_same(
    client: TestClient,
    settings: Settings,
    user_headers,
    other_tenant_headers,
    template: Path,
    tmp_path: Path,
):
    model_id = register_model(settings, template)
    response = client.get(f"/v1/models/{model_id}/export?format=bundle", headers=user_headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-disposition"] == 'attachment; filename="shapes-v1.zip"'
    (tmp_path / "b.zip").write_bytes(response.content)
    info = read_bundle(tmp_path / "b.zip", tmp_path / "unpacked")
    assert info.sha256 == read_model_info(template).sha256

    # The other tenant cannot export it, but can import the file as its own model.
    denied = client.get(f"/v1/models/{model_id}/export", headers=other_tenant_headers)
    assert denied.status_code == 404
    imported = client.post(
        "/v1/models/import",
        files={"bundle": ("b.zip", response.content, "application/zip")},
        data={"name": "pets"},
        headers=other_tenant_headers,
    )
    assert imported.status_code == 201, imported.text
    body = imported.json()
    assert (body["name"], body["version_number"], body["classes"]) == ("pets", 1, info.classes)
    assert body["version"] == info.sha256[:12]
    assert body["id"] != model_id
    mine = predict_files(client, user_headers, model_id, uploads(3)).json()
    theirs = predict_files(client, other_tenant_headers, body["id"], uploads(3)).json()
    assert [p["top_k"] for p in mine["predictions"]] == [p["top_k"] for p in theirs["predictions"]]


def test_import_refuses_anything_but_a_clean_bundle(
    client: TestClient, settings: Settings, user_headers, template: Path
):
    def send(members: dict[str, bytes]):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, data in members.items():
                archive.writestr(name, data)
        return client.post(
            "/v1/models/import",
            files={"bundle": ("x.zip", buffer.getvalue(), "application/zip")},
            headers=user_headers,
        )

    good = {
        WEIGHTS_FILE: (template / WEIGHTS_FILE).read_bytes(),
        METADATA_FILE: (template / METADATA_FILE).read_bytes(),
    }
    meta = json.loads(good[METADATA_FILE])
    for members in (
        {**good, "extra.pkl": b"\x80\x04"},
        {**good, METADATA_FILE: json.dumps({**meta, "sha256": "0" * 64}).encode()},
        {**good, METADATA_FILE: b"not json"},
        {WEIGHTS_FILE: good[WEIGHTS_FILE]},
    ):
        status, code, message = error_of(send(members))
        assert (status, code) == (422, "invalid_bundle")
        assert "bit export" in message and "/tmp" not in message
    not_a_zip = client.post(
        "/v1/models/import",
        files={"bundle": ("x.zip", b"hello", "application/zip")},
        headers=user_headers,
    )
    assert error_of(not_a_zip)[:2] == (422, "invalid_bundle")
    assert client.get("/v1/models", headers=user_headers).json()["total"] == 0
    accepted = send(good)
    assert accepted.status_code == 201 and accepted.json()["name"] == "imported"


def test_npz_export_reloads_with_its_head(
    client: TestClient, settings: Settings, user_headers, template: Path, tmp_path: Path
):
    model_id = register_model(settings, template)
    response = client.get(f"/v1/models/{model_id}/export?format=npz", headers=user_headers)
    assert response.status_code == 200, response.text
    (tmp_path / "m.npz").write_bytes(response.content)
    info = read_model_info(template)
    model = bit_core.create_model(info.arch, len(info.classes))
    bit_core.load_bit_npz(model, tmp_path / "m.npz", load_head=True)
    reference = Predictor.load(template, device="cpu")
    with np.load(tmp_path / "m.npz") as archive:
        assert "resnet/head/conv2d/bias" in archive.files
    predictor = Predictor.from_model(model, info.classes, info.crop, device="cpu", info=info)
    batch = reference.preprocess([b for _, (_, b, _) in uploads(2)])
    assert np.allclose(predictor.probabilities(batch), reference.probabilities(batch), atol=1e-6)


def test_onnx_export_is_a_download(
    client: TestClient, settings: Settings, user_headers, template: Path
):
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package ([onnx] extra)")
    model_id = register_model(settings, template)
    response = client.get(f"/v1/models/{model_id}/export?format=onnx", headers=user_headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-disposition"].endswith('filename="shapes-v1.onnx"')
    import onnx

    proto = onnx.load_from_string(response.content)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["bit.classes"]) == read_model_info(template).classes
    bad = client.get(f"/v1/models/{model_id}/export?format=pickle", headers=user_headers)
    assert bad.status_code == 422


def test_import_counts_against_the_models_quota(
    client: TestClient, settings: Settings, user_headers, template: Path
):
    settings.quota_models = 1
    model_id = register_model(settings, template)
    response = client.get(f"/v1/models/{model_id}/export", headers=user_headers)
    assert response.status_code == 200, response.text
    refused = client.post(
        "/v1/models/import",
        files={"bundle": ("b.zip", response.content, "application/zip")},
        headers=user_headers,
    )
    assert error_of(refused)[:2] == (429, "quota_models_exceeded")
    assert client.get("/v1/models", headers=user_headers).json()["total"] == 1
