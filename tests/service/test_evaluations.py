"""Evaluations as stored runs, on SQLite and PostgreSQL, with a real tiny model: created
through the API, run through the worker's code path (in process, without Celery), their
results equal to scikit-learn's on the same predictions; listing, tenants, refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    precision_recall_fscore_support,
)
from sqlalchemy import select

from bit_core.checkpoint import load_model
from bit_core.data import LabeledImages
from bit_core.evaluate import predict_logits
from service.db.models import Evaluation, Job, JobEvent, Model
from service.db.session import session_scope
from service.queueing import celery_client
from service.settings import Settings
from tests.factories import CLASSES, class_png, png
from tests.service.conftest import error_of, register_model, store_of
from worker.evaluation import run_evaluation_job
from worker.reconciler import queue_depths

TEMPERATURE = 1.7
PER_CLASS = 4  # test images per class; a few train images are left out by the split


@pytest.fixture(autouse=True)
def cpu(settings: Settings) -> None:
    """The worker's forward and the reference's must match exactly: both fp32 on a CPU."""
    settings.device = "cpu"
    settings.precision = "fp32"


def labelled_images() -> list[tuple[str, bytes, str, str]]:
    """(filename, bytes, label, split): PER_CLASS test images per class and 3 train ones."""
    images = [
        (f"{label}-{i}.png", class_png(label, 100 + i), label, "test")
        for label in CLASSES
        for i in range(PER_CLASS)
    ]
    train = [(f"{label}-train.png", class_png(label, 900), label, "train") for label in CLASSES]
    # Interleaved: the split, not the upload order, decides what is evaluated.
    return [*train[:1], *images[:5], *train[1:], *images[5:]]


def upload_split(client: TestClient, headers: dict, images: list[tuple[str, bytes, str, str]]):
    files = [("files", (name, data, "image/png")) for name, data, _, _ in images]
    data = {"labels": [label for *_, label, _ in images], "splits": [s for *_, s in images]}
    response = client.post("/v1/datasets", files=files, data=data, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def evaluate(client: TestClient, headers: dict, model_id: int, body: object):
    return client.post(f"/v1/models/{model_id}/evaluations", json=body, headers=headers)


def run(settings: Settings, job_id: int) -> str:
    """What the `bit.evaluate` task does with the job's id."""
    return run_evaluation_job(settings, job_id, "test-worker")


def test_an_evaluation_equals_scikit_learns_on_the_same_predictions(
    client: TestClient, settings: Settings, user_headers: dict, template: Path
) -> None:
    model_id = register_model(settings, template)
    with session_scope(settings.database_url) as session:
        model = session.get(Model, model_id)
        assert model is not None
        model.temperature = TEMPERATURE
    images = labelled_images()
    dataset_id = upload_split(client, user_headers, images)

    response = evaluate(client, user_headers, model_id, {"dataset_id": dataset_id, "split": "test"})
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["status"] == "queued" and created["results"] == {}
    assert (created["model_id"], created["dataset_id"], created["split"]) == (
        model_id,
        dataset_id,
        "test",
    )
    job = client.get(f"/v1/jobs/{created['job_id']}", headers=user_headers).json()
    assert job["kind"] == "evaluate" and job["status"] == "queued"
    listed = client.get("/v1/jobs", params={"kind": "evaluate"}, headers=user_headers).json()
    assert [j["id"] for j in listed["items"]] == [created["job_id"]]
    with session_scope(settings.database_url) as session:  # sent: no "enqueue_failed"
        events = session.scalars(select(JobEvent.kind).where(JobEvent.job_id == job["id"])).all()
        assert events == ["created"]
    assert queue_depths(celery_client(settings))["finetune"] == 1  # the fine-tuning queue's

    assert run(settings, created["job_id"]) == "succeeded"
    url = f"/v1/models/{model_id}/evaluations/{created['id']}"
    evaluation = client.get(url, headers=user_headers).json()
    assert evaluation["status"] == "succeeded"
    results = evaluation["results"]
    assert results["temperature"] == TEMPERATURE
    assert results["count"] == len(CLASSES) * PER_CLASS  # the test split only
    assert results["classes"] == CLASSES

    # The reference: the engine's logits on the same images, the temperature, scikit-learn.
    tested = [(data, label) for _, data, label, split in images if split == "test"]
    network, info = load_model(template)
    logits = predict_logits(
        network,
        LabeledImages.from_pairs(tested, classes=CLASSES),
        info.crop,
        device="cpu",
        precision="fp32",
    )
    probabilities = torch.softmax(logits / TEMPERATURE, dim=-1).numpy()
    truth = np.array([CLASSES.index(label) for _, label in tested])
    predicted = probabilities.argmax(axis=1)
    assert results["top1"] == pytest.approx(float((predicted == truth).mean()))
    assert results["confusion"] == confusion_matrix(truth, predicted, labels=[0, 1, 2]).tolist()
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=[0, 1, 2], zero_division=0
    )
    aps = []
    for index, name in enumerate(CLASSES):
        report = results["per_class"][name]
        assert report["precision"] == pytest.approx(precision[index])
        assert report["recall"] == pytest.approx(recall[index])
        assert report["f1"] == pytest.approx(f1[index])
        assert report["support"] == support[index] == PER_CLASS
        positives = truth == index
        aps.append(average_precision_score(positives, probabilities[:, index]))
        assert report["ap"] == pytest.approx(aps[-1])
        curve_p, curve_r, curve_t = precision_recall_curve(positives, probabilities[:, index])
        assert report["pr_curve"]["precision"] == pytest.approx(curve_p.tolist())
        assert report["pr_curve"]["recall"] == pytest.approx(curve_r.tolist())
        assert report["pr_curve"]["thresholds"] == pytest.approx(curve_t.tolist())
        # The suggested threshold is the curve's point of best F1.
        f1_curve = 2 * curve_p * curve_r / np.maximum(curve_p + curve_r, 1e-12)
        best = report["thresholds"]["best_f1"]
        assert best["f1"] == pytest.approx(f1_curve[:-1].max())
        assert min(abs(curve_t - best["threshold"])) < 1e-9
    assert results["map"] == pytest.approx(np.mean(aps))
    assert 0.0 <= results["calibration"]["ece"] <= 1.0
    with session_scope(settings.database_url) as session:
        job_row = session.get(Job, created["job_id"])
        assert job_row is not None and job_row.metrics["top1"] == results["top1"]


def test_evaluations_are_listed_newest_first_with_their_jobs_status(
    client: TestClient, settings: Settings, user_headers: dict, template: Path
) -> None:
    model_id = register_model(settings, template)
    dataset_id = upload_split(client, user_headers, labelled_images())
    first = evaluate(client, user_headers, model_id, {"dataset_id": dataset_id}).json()
    second = evaluate(
        client, user_headers, model_id, {"dataset_id": dataset_id, "split": "train"}
    ).json()
    assert run(settings, second["job_id"]) == "succeeded"
    items = client.get(f"/v1/models/{model_id}/evaluations", headers=user_headers).json()["items"]
    assert [(e["id"], e["status"]) for e in items] == [
        (second["id"], "succeeded"),
        (first["id"], "queued"),
    ]
    assert items[0]["results"]["count"] == len(CLASSES) and items[1]["results"] == {}
    assert first["split"] is None  # the whole dataset
    # Another model's evaluation is not this one's.
    other = register_model(settings, template, name="other")
    response = client.get(f"/v1/models/{other}/evaluations/{first['id']}", headers=user_headers)
    assert error_of(response)[:2] == (404, "evaluation_not_found")


def test_another_tenants_model_or_dataset_answers_404(
    client: TestClient,
    settings: Settings,
    user_headers: dict,
    other_tenant_headers: dict,
    template: Path,
) -> None:
    model_id = register_model(settings, template)
    dataset_id = upload_split(client, user_headers, labelled_images())
    body = {"dataset_id": dataset_id}
    for response in (
        evaluate(client, other_tenant_headers, model_id, body),
        client.get(f"/v1/models/{model_id}/evaluations", headers=other_tenant_headers),
        client.get(f"/v1/models/{model_id}/evaluations/1", headers=other_tenant_headers),
    ):
        assert error_of(response)[:2] == (404, "model_not_found"), response.text
    theirs = register_model(settings, template, tenant="globex")
    response = evaluate(client, other_tenant_headers, theirs, body)
    assert error_of(response)[:2] == (404, "dataset_not_found")
    with session_scope(settings.database_url) as session:
        assert session.query(Evaluation).count() == 0


def test_labels_the_model_does_not_know_and_empty_splits_are_refused(
    client: TestClient, settings: Settings, user_headers: dict, template: Path
) -> None:
    model_id = register_model(settings, template)
    strangers = [
        (f"{label}{i}.png", png(), label, split)
        for label, split in (("cat", "test"), ("dog", "val"))
        for i in range(2)
    ]
    dataset_id = upload_split(client, user_headers, [*labelled_images(), *strangers])
    response = evaluate(client, user_headers, model_id, {"dataset_id": dataset_id})
    status, code, message = error_of(response)
    assert (status, code) == (422, "evaluation_unknown_labels")
    assert (
        "'cat'" in message
        and "'dog'" in message
        and response.json()["error"]["labels"] == ["cat", "dog"]
    )
    for split, unknown in (("test", ["cat"]), ("val", ["dog"])):
        response = evaluate(
            client, user_headers, model_id, {"dataset_id": dataset_id, "split": split}
        )
        assert error_of(response)[:2] == (422, "evaluation_unknown_labels")
        assert response.json()["error"]["labels"] == unknown
    plain = upload_split(client, user_headers, labelled_images())  # train and test only
    response = evaluate(client, user_headers, model_id, {"dataset_id": plain, "split": "val"})
    assert error_of(response)[:2] == (422, "evaluation_empty")
    for body in ({}, {"dataset_id": dataset_id, "split": "dev"}, {"dataset_id": 0}):
        response = evaluate(client, user_headers, model_id, body)
        assert error_of(response)[:2] == (422, "invalid_request"), body
    response = client.post(f"/v1/models/{model_id}/evaluations", headers=user_headers)
    assert error_of(response)[:2] == (422, "invalid_request")
    with session_scope(settings.database_url) as session:
        assert session.query(Evaluation).count() == 0
        assert session.query(Job).filter(Job.kind == "evaluate").count() == 0
    # The train split holds only the model's classes.
    response = evaluate(
        client, user_headers, model_id, {"dataset_id": dataset_id, "split": "train"}
    )
    assert response.status_code == 202, response.text


def test_a_failed_evaluation_shows_its_jobs_error(
    client: TestClient, settings: Settings, user_headers: dict, template: Path
) -> None:
    model_id = register_model(settings, template)
    dataset_id = upload_split(client, user_headers, labelled_images())
    created = evaluate(client, user_headers, model_id, {"dataset_id": dataset_id}).json()
    with session_scope(settings.database_url) as session:
        model = session.get(Model, model_id)
        assert model is not None
        shutil.rmtree(store_of(settings).path(model.uri))  # the model's files are lost
    assert run(settings, created["job_id"]) == "failed"
    url = f"/v1/models/{model_id}/evaluations/{created['id']}"
    evaluation = client.get(url, headers=user_headers).json()
    assert evaluation["status"] == "failed" and evaluation["results"] == {}
    assert evaluation["error_code"] and evaluation["error"]
