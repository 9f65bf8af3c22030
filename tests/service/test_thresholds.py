"""Thresholds and temperature in predict, on SQLite and PostgreSQL, with a real tiny model:
the model's default threshold (PATCH /v1/models/{id}), a request's override,
`below_threshold`, and the model's temperature dividing the logits."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from bit_core.checkpoint import load_model
from bit_core.data import LabeledImages
from bit_core.evaluate import predict_logits
from bit_core.predict import Predictor
from service.app import create_app
from service.db.models import Model
from service.db.session import session_scope
from service.settings import Settings
from tests.factories import CLASSES, png_bytes
from tests.service.conftest import error_of, new_key, register_model, uploads

IMAGES = 6


@pytest.fixture(autouse=True)
def cpu_inference(settings: Settings) -> None:
    """Answers are compared with CPU references to 1e-5; CUDA's bf16 would not match."""
    settings.device = "cpu"


@pytest.fixture(scope="module")
def top1(template: Path) -> list[float]:
    """Each test image's highest probability, as the model (no temperature) gives it."""
    predictor = Predictor.load(template, device="cpu")
    batch = predictor.preprocess([png_bytes(i) for i in range(IMAGES)])
    return predictor.probabilities(batch).max(dim=1).values.tolist()


def patch(client: TestClient, headers: dict, model_id: int, body: object):
    return client.patch(f"/v1/models/{model_id}", json=body, headers=headers)


def predict(client: TestClient, headers: dict, model_id: int, **form: str) -> dict:
    files = uploads(IMAGES)
    data = {"model_id": str(model_id), "top_k": "3", **form}
    response = client.post("/v1/predict", files=files, data=data, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def check_threshold_honoured(body: dict, threshold: float, top1: list[float]) -> None:
    assert body["threshold"] == threshold
    for prediction, best in zip(body["predictions"], top1, strict=True):
        kept = [row["probability"] for row in prediction["top_k"]]
        assert all(p >= threshold for p in kept)
        assert prediction["below_threshold"] == (best < threshold)
        assert bool(kept) == (best >= threshold)


def test_the_models_threshold_and_a_requests_override_are_honoured(
    client: TestClient, settings: Settings, user_headers: dict, template: Path, top1: list[float]
) -> None:
    model_id = register_model(settings, template)
    plain = predict(client, user_headers, model_id)
    assert plain["threshold"] is None
    assert all(len(p["top_k"]) == 3 and not p["below_threshold"] for p in plain["predictions"])

    # Between the images' top-1 probabilities: some images are sure, others are not.
    ordered = sorted(top1)
    middle = (ordered[IMAGES // 2 - 1] + ordered[IMAGES // 2]) / 2
    response = patch(client, user_headers, model_id, {"threshold": middle})
    assert response.status_code == 200, response.text
    assert response.json()["threshold"] == middle
    assert client.get(f"/v1/models/{model_id}", headers=user_headers).json()["threshold"] == middle
    by_model = predict(client, user_headers, model_id)
    check_threshold_honoured(by_model, middle, top1)
    assert {p["below_threshold"] for p in by_model["predictions"]} == {True, False}

    # The request's threshold wins over the model's, in both request forms.
    check_threshold_honoured(predict(client, user_headers, model_id, threshold="0"), 0.0, top1)
    strict = predict(client, user_headers, model_id, threshold="1")
    assert all(p["below_threshold"] and not p["top_k"] for p in strict["predictions"])
    encoded = [base64.b64encode(png_bytes(i)).decode() for i in range(IMAGES)]
    as_json = client.post(
        "/v1/predict",
        json={"model_id": model_id, "images": encoded, "top_k": 3, "threshold": 0.0},
        headers=user_headers,
    )
    assert as_json.status_code == 200, as_json.text
    check_threshold_honoured(as_json.json(), 0.0, top1)

    # null removes the model's threshold: every class comes back again.
    response = patch(client, user_headers, model_id, {"threshold": None})
    assert response.status_code == 200 and response.json()["threshold"] is None
    again = predict(client, user_headers, model_id)
    assert all(len(p["top_k"]) == 3 and not p["below_threshold"] for p in again["predictions"])


def test_a_threshold_change_is_seen_at_once_by_this_process(
    settings: Settings, template: Path, top1: list[float]
) -> None:
    # A lookup kept for a minute: only forgetting it on PATCH makes the change visible.
    slow = settings.model_copy(update={"lookup_cache_s": 60.0})
    headers = {"Authorization": f"Bearer {new_key(slow)}"}
    model_id = register_model(slow, template)
    with TestClient(create_app(slow)) as client:
        assert predict(client, headers, model_id)["threshold"] is None  # now remembered
        assert patch(client, headers, model_id, {"threshold": 1.0}).status_code == 200
        body = predict(client, headers, model_id)
        check_threshold_honoured(body, 1.0, top1)
        assert all(p["below_threshold"] for p in body["predictions"])


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"threshold": 1.5}, 422, "invalid_threshold"),
        ({"threshold": -0.1}, 422, "invalid_threshold"),
        ({"threshold": "high"}, 422, "invalid_request"),
        ({"temperature": 2.0}, 422, "invalid_request"),  # not settable: fitted by training
    ],
)
def test_patch_refuses_what_is_not_a_threshold(
    client: TestClient,
    settings: Settings,
    user_headers: dict,
    template: Path,
    body: dict,
    status: int,
    code: str,
) -> None:
    model_id = register_model(settings, template)
    response = patch(client, user_headers, model_id, body)
    assert error_of(response)[:2] == (status, code), response.text
    assert client.get(f"/v1/models/{model_id}", headers=user_headers).json()["threshold"] is None


def test_patch_and_predict_thresholds_are_checked(
    client: TestClient,
    settings: Settings,
    user_headers: dict,
    other_tenant_headers: dict,
    template: Path,
) -> None:
    model_id = register_model(settings, template)
    assert error_of(patch(client, other_tenant_headers, model_id, {"threshold": 0.5}))[:2] == (
        404,
        "model_not_found",
    )
    # An empty patch changes nothing.
    response = patch(client, user_headers, model_id, {})
    assert response.status_code == 200 and response.json()["threshold"] is None
    for value in ("abc", "1.01", "nan"):
        response = client.post(
            "/v1/predict",
            files=uploads(1),
            data={"model_id": str(model_id), "threshold": value},
            headers=user_headers,
        )
        assert error_of(response)[:2] == (422, "invalid_threshold"), value
    encoded = base64.b64encode(png_bytes(0)).decode()
    response = client.post(
        "/v1/predict",
        json={"model_id": model_id, "images": [encoded], "threshold": 2},
        headers=user_headers,
    )
    assert error_of(response)[:2] == (422, "invalid_threshold")


def test_predict_applies_the_models_temperature(
    client: TestClient, settings: Settings, user_headers: dict, template: Path
) -> None:
    temperature = 2.5
    model_id = register_model(settings, template)
    with session_scope(settings.database_url) as session:
        row = session.get(Model, model_id)
        assert row is not None
        row.temperature = temperature
    shown = client.get(f"/v1/models/{model_id}", headers=user_headers).json()
    assert shown["temperature"] == temperature
    body = predict(client, user_headers, model_id)

    # The reference: the engine's logits on the same images, divided, then the softmax.
    model, info = load_model(template)
    images = LabeledImages.from_pairs(
        [(png_bytes(i), CLASSES[0]) for i in range(IMAGES)], classes=CLASSES
    )
    logits = predict_logits(model, images, info.crop, device="cpu", precision="fp32")
    expected = torch.softmax(logits / temperature, dim=-1)
    unscaled = torch.softmax(logits, dim=-1)
    for prediction, scaled, plain in zip(body["predictions"], expected, unscaled, strict=True):
        for row in prediction["top_k"]:
            index = CLASSES.index(row["label"])
            assert row["probability"] == pytest.approx(float(scaled[index]), abs=1e-5)
        best = prediction["top_k"][0]
        # The temperature did change the answer (it would pass vacuously at T = 1).
        assert abs(best["probability"] - float(plain[CLASSES.index(best["label"])])) > 1e-3
