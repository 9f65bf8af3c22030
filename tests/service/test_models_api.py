"""Models and predict through the app, on SQLite and PostgreSQL, with a real tiny model."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from bit_core.checkpoint import WEIGHTS_FILE, read_model_info
from bit_core.predict import Predictor
from service.db.models import Job, Model
from service.db.session import session_scope
from service.settings import Settings
from tests.factories import CLASSES, png_bytes
from tests.service.conftest import error_of, predict_files, register_model, store_of, uploads


@pytest.fixture(autouse=True)
def cpu_inference(settings: Settings) -> None:
    """Answers are compared with a CPU Predictor to 1e-5; CUDA's bf16 would not match."""
    settings.device = "cpu"


@pytest.fixture(scope="module")
def reference(template: Path) -> Predictor:
    return Predictor.load(template, device="cpu")


# --- predict -------------------------------------------------------------------------------


def test_predict_multipart_answers_like_the_predictor(
    client: TestClient, settings: Settings, user_headers, template: Path, reference: Predictor
):
    model_id = register_model(settings, template)
    images = [png_bytes(i) for i in range(4)]
    response = predict_files(client, user_headers, model_id, uploads(4))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == model_id and body["time_ms"] >= 0
    stages = dict(part.split(";dur=") for part in response.headers["server-timing"].split(", "))
    assert list(stages) == ["decode", "wait", "forward", "total"]
    assert float(stages["total"]) == pytest.approx(body["time_ms"], abs=0.01)
    assert 0 < float(stages["decode"]) + float(stages["forward"]) <= float(stages["total"])
    assert body["model_version"] == read_model_info(template).sha256[:12]
    assert [p["filename"] for p in body["predictions"]] == [f"img{i}.png" for i in range(4)]
    for prediction, expected in zip(
        body["predictions"], reference.predict(images, top_k=3), strict=True
    ):
        assert [r["label"] for r in prediction["top_k"]] == [e.label for e in expected]
        assert [r["probability"] for r in prediction["top_k"]] == pytest.approx(
            [e.probability for e in expected], abs=1e-5
        )


def test_predict_base64_json_answers_like_multipart(
    client: TestClient, settings: Settings, user_headers, template: Path
):
    model_id = register_model(settings, template)
    encoded = [base64.b64encode(png_bytes(i)).decode() for i in range(3)]
    encoded[1] = "data:image/png;base64," + encoded[1]  # what a browser's FileReader sends
    as_json = client.post(
        "/v1/predict",
        json={"model_id": model_id, "images": encoded, "top_k": 3},
        headers=user_headers,
    )
    as_files = predict_files(client, user_headers, model_id, uploads(3))
    assert as_json.status_code == 200, as_json.text
    json_predictions = as_json.json()["predictions"]
    assert [p["filename"] for p in json_predictions] == [None, None, None]
    for from_json, from_files in zip(json_predictions, as_files.json()["predictions"], strict=True):
        assert [r["label"] for r in from_json["top_k"]] == [r["label"] for r in from_files["top_k"]]


def test_top_k_is_ordered_and_capped_at_the_class_count(
    client: TestClient, settings: Settings, user_headers, template: Path
):
    model_id = register_model(settings, template)
    two = predict_files(client, user_headers, model_id, uploads(2), top_k="2").json()
    for prediction in two["predictions"]:
        probabilities = [r["probability"] for r in prediction["top_k"]]
        assert len(probabilities) == 2 and probabilities[0] >= probabilities[1]
    everything = predict_files(client, user_headers, model_id, uploads(1), top_k="1000").json()
    ranked = everything["predictions"][0]["top_k"]
    assert sorted(r["label"] for r in ranked) == sorted(CLASSES)
    assert sum(r["probability"] for r in ranked) == pytest.approx(1.0, abs=1e-4)
    assert [r["probability"] for r in ranked] == sorted(
        (r["probability"] for r in ranked), reverse=True
    )


def test_predict_input_errors_have_stable_codes(
    client: TestClient, settings: Settings, user_headers, template: Path
):
    model_id = register_model(settings, template)
    for top_k in ("0", "1001", "many"):
        response = predict_files(client, user_headers, model_id, uploads(1), top_k=top_k)
        assert error_of(response)[:2] == (422, "invalid_top_k")
    response = client.post(
        "/v1/predict",
        json={"model_id": model_id, "images": ["aGk="], "top_k": 0},
        headers=user_headers,
    )
    assert error_of(response)[:2] == (422, "invalid_top_k")

    response = client.post(
        "/v1/predict",
        json={"model_id": model_id, "images": ["not base64!"]},
        headers=user_headers,
    )
    status, code, message = error_of(response)
    assert (status, code) == (422, "invalid_base64") and "images[0]" in message

    files = [*uploads(1), ("files", ("notes.txt", b"just some text", "text/plain"))]
    status, code, message = error_of(predict_files(client, user_headers, model_id, files))
    assert (status, code) == (422, "invalid_image") and "notes.txt" in message
    garbage = base64.b64encode(b"\x00\x01garbage").decode()
    response = client.post(
        "/v1/predict", json={"model_id": model_id, "images": [garbage]}, headers=user_headers
    )
    assert error_of(response)[:2] == (422, "invalid_image")
    assert response.json()["error"]["file"] == "images[0]"

    many = [("files", (f"{i}.png", b"x", "image/png")) for i in range(257)]
    assert error_of(predict_files(client, user_headers, model_id, many))[:2] == (
        413,
        "too_many_images",
    )
    response = client.post(
        "/v1/predict", json={"model_id": model_id, "images": ["aGk="] * 257}, headers=user_headers
    )
    assert error_of(response)[:2] == (413, "too_many_images")

    response = client.post(
        "/v1/predict", json={"model_id": model_id, "images": []}, headers=user_headers
    )
    assert error_of(response)[:2] == (422, "no_images")
    response = client.post("/v1/predict", json={"images": ["aGk="]}, headers=user_headers)
    status, code, message = error_of(response)
    assert (status, code) == (422, "invalid_request") and "model_id" in message
    response = client.post("/v1/predict", content=b"model_id=1", headers=user_headers)
    assert error_of(response)[:2] == (415, "unsupported_media_type")

    settings.max_image_bytes = 100  # the client's app reads this very settings object
    status, code, message = error_of(predict_files(client, user_headers, model_id, uploads(1)))
    assert (status, code) == (413, "image_too_large") and "img0.png" in message


def test_prediction_needs_an_api_key(client: TestClient, settings: Settings, template: Path):
    model_id = register_model(settings, template)
    response = predict_files(client, {}, model_id, uploads(1))
    assert error_of(response)[:2] == (401, "unauthenticated")


# --- tenants and lookups -------------------------------------------------------------------


def test_unknown_and_other_tenants_models_are_not_found(
    client: TestClient, settings: Settings, user_headers, other_tenant_headers, template: Path
):
    model_id = register_model(settings, template, tenant="acme")
    status, code, message = error_of(predict_files(client, user_headers, 999_999, uploads(1)))
    assert (status, code) == (404, "model_not_found") and "999999" in message

    assert error_of(predict_files(client, other_tenant_headers, model_id, uploads(1)))[:2] == (
        404,
        "model_not_found",
    )
    for method, path in (
        ("GET", f"/v1/models/{model_id}"),
        ("POST", f"/v1/models/{model_id}/archive"),
        ("DELETE", f"/v1/models/{model_id}"),
    ):
        response = client.request(method, path, headers=other_tenant_headers)
        assert error_of(response)[:2] == (404, "model_not_found"), (method, path)
    assert client.get("/v1/models", headers=other_tenant_headers).json()["total"] == 0
    # Nothing of the owner's was touched.
    assert client.get(f"/v1/models/{model_id}", headers=user_headers).json()["status"] == "ready"
    with session_scope(settings.database_url) as session:
        row = session.get(Model, model_id)
        assert row is not None and store_of(settings).exists(f"{row.uri}/{WEIGHTS_FILE}")


def test_a_job_id_that_is_still_running_hints_to_wait(
    client: TestClient, settings: Settings, user_headers, other_tenant_headers
):
    with session_scope(settings.database_url) as session:
        job = Job(tenant="acme", kind="finetune", status="running", base_model="R14x0.5")
        session.add(job)
        session.flush()
        job_id = job.id
    status, code, message = error_of(predict_files(client, user_headers, job_id, uploads(1)))
    assert (status, code) == (404, "model_not_found")
    assert f"job {job_id} is running" in message and "wait" in message
    # Another tenant learns nothing about the job.
    message = error_of(predict_files(client, other_tenant_headers, job_id, uploads(1)))[2]
    assert "job" not in message


def test_get_model_shows_classes_metrics_base_model_plan_and_job(
    client: TestClient, settings: Settings, user_headers, template: Path
):
    model_id = register_model(settings, template)
    response = client.get(f"/v1/models/{model_id}", headers=user_headers)
    assert response.status_code == 200, response.text
    model = response.json()
    info = read_model_info(template)
    assert model["classes"] == CLASSES and model["num_classes"] == 3
    assert model["metrics"] == info.metrics and model["plan"] == info.plan
    assert model["base_model"] == info.base_model and model["arch"] == "R14x0.5"
    assert model["crop"] == info.crop and model["status"] == "ready"
    assert model["version"] == info.sha256[:12] and model["size_bytes"] > 0
    with session_scope(settings.database_url) as session:
        row = session.get(Model, model_id)
        assert row is not None and model["job_id"] == row.job_id is not None


def test_list_is_paginated_and_tenant_filtered_and_admins_see_all(
    client: TestClient,
    settings: Settings,
    user_headers,
    other_tenant_headers,
    admin_headers,
    template: Path,
):
    mine = [register_model(settings, template, name=f"m{i}") for i in range(3)]
    theirs = register_model(settings, template, tenant="globex")

    first = client.get("/v1/models?limit=2", headers=user_headers).json()
    second = client.get("/v1/models?limit=2&offset=2", headers=user_headers).json()
    assert first["total"] == 3 and (first["limit"], first["offset"]) == (2, 0)
    listed = [m["id"] for m in first["items"] + second["items"]]
    assert sorted(listed) == sorted(mine) and listed == sorted(listed, reverse=True)
    assert {m["tenant"] for m in first["items"]} == {"acme"}

    assert [
        m["id"] for m in client.get("/v1/models", headers=other_tenant_headers).json()["items"]
    ] == [theirs]
    everything = client.get("/v1/models", headers=admin_headers).json()
    assert everything["total"] == 4
    only_globex = client.get("/v1/models?tenant=globex", headers=admin_headers).json()
    assert [m["id"] for m in only_globex["items"]] == [theirs]
    response = client.get("/v1/models?tenant=globex", headers=user_headers)
    assert error_of(response)[:2] == (403, "admin_required")
    response = client.get("/v1/models?status=deleted", headers=user_headers)
    assert error_of(response)[:2] == (422, "invalid_status")
    response = client.get("/v1/models?limit=0", headers=user_headers)
    assert response.status_code == 422


# --- archive and delete --------------------------------------------------------------------


def test_archive_stops_predictions_and_evicts_the_model(
    client: TestClient, settings: Settings, user_headers, template: Path
):
    model_id = register_model(settings, template)
    assert predict_files(client, user_headers, model_id, uploads(1)).status_code == 200
    cache = client.app.state.inference.cache  # type: ignore[attr-defined]
    assert model_id in cache

    archived = client.post(f"/v1/models/{model_id}/archive", headers=user_headers)
    assert archived.status_code == 200 and archived.json()["status"] == "archived"
    assert model_id not in cache
    status, code, message = error_of(predict_files(client, user_headers, model_id, uploads(1)))
    assert (status, code) == (409, "model_archived") and "archived" in message
    again = client.post(f"/v1/models/{model_id}/archive", headers=user_headers)
    assert again.status_code == 200  # idempotent
    listed = client.get("/v1/models?status=archived", headers=user_headers).json()
    assert [m["id"] for m in listed["items"]] == [model_id]
    assert client.get("/v1/models?status=ready", headers=user_headers).json()["total"] == 0


def test_delete_removes_the_row_and_the_files(
    client: TestClient, settings: Settings, user_headers, template: Path
):
    model_id = register_model(settings, template)
    kept = register_model(settings, template)
    with session_scope(settings.database_url) as session:
        row = session.get(Model, model_id)
        assert row is not None
        directory = store_of(settings).path(row.uri)
    assert (directory / WEIGHTS_FILE).exists()
    assert predict_files(client, user_headers, model_id, uploads(1)).status_code == 200

    response = client.delete(f"/v1/models/{model_id}", headers=user_headers)
    assert response.status_code == 204 and response.content == b""
    assert not directory.exists()
    assert model_id not in client.app.state.inference.cache  # type: ignore[attr-defined]
    assert error_of(client.get(f"/v1/models/{model_id}", headers=user_headers))[:2] == (
        404,
        "model_not_found",
    )
    assert error_of(predict_files(client, user_headers, model_id, uploads(1)))[1] == (
        "model_not_found"
    )
    assert error_of(client.delete(f"/v1/models/{model_id}", headers=user_headers))[0] == 404
    assert predict_files(client, user_headers, kept, uploads(1)).status_code == 200


def test_a_corrupt_model_answers_model_corrupt(
    client: TestClient, settings: Settings, user_headers, template: Path
):
    model_id = register_model(settings, template)
    with session_scope(settings.database_url) as session:
        row = session.get(Model, model_id)
        assert row is not None
        weights = store_of(settings).path(row.uri) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    status, code, message = error_of(predict_files(client, user_headers, model_id, uploads(1)))
    assert (status, code) == (500, "model_corrupt") and f"model {model_id}" in message


def test_the_forward_runs_with_no_database_connection_held(
    client: TestClient, settings: Settings, user_headers, template: Path
):
    """Requests in flight may outnumber the pool's connections: none may wait on a forward."""
    from service.db.session import get_engine
    from service.inference.inference import Inference

    model_id = register_model(settings, template)
    pool = get_engine(settings.database_url).pool
    held: list[int] = []
    real_predict = Inference.predict

    async def predict_and_count(self: Inference, *args, **kwargs):  # type: ignore[no-untyped-def]
        held.append(pool.checkedout())  # type: ignore[attr-defined]
        return await real_predict(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Inference, "predict", predict_and_count)
        response = predict_files(client, user_headers, model_id, uploads(2))
    assert response.status_code == 200, response.text
    assert held == [0]
