"""Splits through the app (SQLite and PostgreSQL): a split per request, per file and from a
zip's train/val/test folders; listing and moving images; and the hold-out a fine-tuning
job fixes at creation."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.db.models import Image, Job
from service.db.session import session_scope
from service.jobs.service import choose_holdout
from service.settings import Settings
from tests.factories import make_zip, png, two_classes
from tests.service.conftest import SMALL_LIMITS, error_of, upload, upload_zip


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={**SMALL_LIMITS, "max_zip_members": 100})


def splits_of(settings: Settings, dataset_id: int) -> dict[str, str]:
    """{filename: split} of a dataset's images."""
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(Image.filename, Image.split).where(Image.dataset_id == dataset_id)
        )
        return {name: split for name, split in rows}


# --- uploads ---------------------------------------------------------------------------------


def test_a_split_per_request(client: TestClient, user_headers, settings: Settings) -> None:
    response = upload(client, user_headers, two_classes(), split="val")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["splits"] == {"train": {}, "val": {"cat": 2, "dog": 2}, "test": {}}
    assert set(splits_of(settings, body["id"]).values()) == {"val"}
    # Appending defaults to train.
    added = upload(client, user_headers, two_classes(), url=f"/v1/datasets/{body['id']}/images")
    assert added.json()["splits"]["train"] == {"cat": 2, "dog": 2}


def test_a_split_per_file_as_fields_or_a_json_array(
    client: TestClient, user_headers, settings: Settings
) -> None:
    images = two_classes()
    chosen = ["train", "val", "test", "train"]
    response = upload(client, user_headers, images, splits=chosen)
    assert response.status_code == 201, response.text
    assert splits_of(settings, response.json()["id"]) == {
        name: split for (name, _, _), split in zip(images, chosen, strict=True)
    }
    images = two_classes()
    response = upload(client, user_headers, images, splits=json.dumps(chosen))
    assert response.status_code == 201, response.text
    assert response.json()["splits"] == {
        "train": {"cat": 1, "dog": 1},
        "val": {"cat": 1},
        "test": {"dog": 1},
    }


def test_bad_splits_are_refused_and_name_the_allowed_values(
    client: TestClient, user_headers, settings: Settings
) -> None:
    status, code, message = error_of(upload(client, user_headers, two_classes(), split="dev"))
    assert (status, code) == (422, "invalid_split")
    assert "'dev'" in message and "train, val, test" in message
    bad = upload(client, user_headers, two_classes(), splits=["train", "val", "holdout", "train"])
    status, code, message = error_of(bad)
    assert (status, code) == (422, "invalid_split") and "d1.png" in message
    assert bad.json()["error"]["allowed"] == ["train", "val", "test"]
    short = upload(client, user_headers, two_classes(), splits=["train", "val"])
    assert error_of(short)[:2] == (422, "splits_mismatch")
    both = upload(client, user_headers, two_classes(), split="val", splits=["val"] * 4)
    assert error_of(both)[:2] == (422, "invalid_upload_form")
    with session_scope(settings.database_url) as session:
        assert session.scalars(select(Image.id)).first() is None


def test_a_zip_carries_its_splits_in_top_folders(
    client: TestClient, user_headers, settings: Settings
) -> None:
    archive = make_zip(
        {
            "train/cats/1.png": png(),
            "train/cats/2.png": png(),
            "train/dogs/1.png": png(),
            "train/dogs/2.png": png(),
            "val/cats/3.png": png(),
            "val/dogs/3.png": png(),
            "test/dogs/4.png": png(),
        }
    )
    response = upload_zip(client, user_headers, archive)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["classes"] == {"cats": 3, "dogs": 4}
    assert body["splits"] == {
        "train": {"cats": 2, "dogs": 2},
        "val": {"cats": 1, "dogs": 1},
        "test": {"dogs": 1},
    }
    # Inside one enclosing folder, and with a single split folder, too.
    nested = make_zip({f"pets/val/{c}/{i}.png": png() for c in ("cats", "dogs") for i in (1, 2)})
    response = upload_zip(client, user_headers, nested)
    assert response.status_code == 201, response.text
    assert response.json()["splits"]["val"] == {"cats": 2, "dogs": 2}


def test_a_zip_of_plain_class_folders_takes_the_request_split(
    client: TestClient, user_headers, settings: Settings
) -> None:
    plain = {f"{c}/{i}.png": png() for c in ("cats", "test") for i in (1, 2)}  # "test": a class
    response = upload_zip(client, user_headers, make_zip(plain))
    assert response.status_code == 201, response.text
    assert response.json()["splits"]["train"] == {"cats": 2, "test": 2}
    plain = {f"{c}/{i}.png": png() for c in ("cats", "dogs") for i in (1, 2)}
    response = client.post(
        "/v1/datasets",
        files={"archive": ("p.zip", make_zip(plain), "application/zip")},
        data={"split": "test"},
        headers=user_headers,
    )
    assert response.status_code == 201, response.text
    assert response.json()["splits"]["test"] == {"cats": 2, "dogs": 2}


def test_a_zip_mixing_split_and_class_folders_is_refused(
    client: TestClient, user_headers, settings: Settings
) -> None:
    archive = make_zip({"train/cats/1.png": png(), "train/dogs/1.png": png(), "dogs/2.png": png()})
    status, code, message = error_of(upload_zip(client, user_headers, archive))
    assert (status, code) == (422, "invalid_archive_layout") and "dogs/2.png" in message
    split_layout = make_zip({"train/cats/1.png": png(), "train/dogs/1.png": png()})
    response = client.post(
        "/v1/datasets",
        files={"archive": ("p.zip", split_layout, "application/zip")},
        data={"split": "val"},
        headers=user_headers,
    )
    assert error_of(response)[:2] == (422, "invalid_upload_form")


def test_finetune_upload_takes_splits(client: TestClient, user_headers, settings: Settings):
    images = [(f"{label}{i}.png", png(), label) for label in ("cat", "dog") for i in range(3)]
    files = [("files", (name, data, "image/png")) for name, data, _ in images]
    response = client.post(
        "/v1/finetune/upload",
        files=files,
        data={
            "labels": [label for _, _, label in images],
            "splits": ["train", "train", "val"] * 2,
            "base_model": "R14x0.5",
            "overrides": json.dumps({"total_steps": 10, "batch_size": 8, "crop": 32}),
        },
        headers=user_headers,
    )
    assert response.status_code == 202, response.text
    holdout = response.json()["plan"]["holdout"]
    assert holdout["source"] == "split"
    with session_scope(settings.database_url) as session:
        val = session.scalars(select(Image.id).where(Image.split == "val").order_by(Image.id))
        assert holdout["val_image_ids"] == list(val)


# --- listing and moving images ---------------------------------------------------------------


def test_images_are_listed_per_split_and_label(client: TestClient, user_headers) -> None:
    dataset_id = upload(
        client, user_headers, two_classes(), splits=["train", "val", "train", "test"]
    ).json()["id"]
    url = f"/v1/datasets/{dataset_id}/images"
    everything = client.get(url, headers=user_headers).json()
    assert everything["total"] == 4 and [i["split"] for i in everything["items"]] == [
        "train",
        "val",
        "train",
        "test",
    ]
    first = everything["items"][0]
    assert set(first) == {
        "id",
        "label",
        "split",
        "filename",
        "width",
        "height",
        "sha256",
        "created_at",
    }
    assert (first["label"], first["filename"], first["width"], first["height"]) == (
        "cat",
        "c1.png",
        16,
        12,
    )
    train = client.get(url, params={"split": "train"}, headers=user_headers).json()
    assert [i["filename"] for i in train["items"]] == ["c1.png", "d1.png"]
    dogs = client.get(url, params={"split": "train", "label": "dog"}, headers=user_headers)
    assert [i["filename"] for i in dogs.json()["items"]] == ["d1.png"]
    page = client.get(url, params={"limit": 2, "offset": 2}, headers=user_headers).json()
    assert page["total"] == 4 and [i["filename"] for i in page["items"]] == ["d1.png", "d2.png"]
    status, code, _ = error_of(client.get(url, params={"split": "dev"}, headers=user_headers))
    assert (status, code) == (422, "invalid_split")


def test_an_image_moves_to_another_split(
    client: TestClient, user_headers, other_tenant_headers, settings: Settings
) -> None:
    dataset_id = upload(client, user_headers, two_classes()).json()["id"]
    other_id = upload(client, user_headers, two_classes()).json()["id"]
    image = client.get(f"/v1/datasets/{dataset_id}/images", headers=user_headers).json()
    image_id = image["items"][0]["id"]
    url = f"/v1/datasets/{dataset_id}/images/{image_id}"

    moved = client.patch(url, json={"split": "test"}, headers=user_headers)
    assert moved.status_code == 200, moved.text
    assert moved.json()["split"] == "test" and moved.json()["id"] == image_id
    shown = client.get(f"/v1/datasets/{dataset_id}", headers=user_headers).json()
    assert shown["splits"]["test"] == {"cat": 1} and shown["splits"]["train"] == {
        "cat": 1,
        "dog": 2,
    }

    assert error_of(client.patch(url, json={"split": "dev"}, headers=user_headers))[:2] == (
        422,
        "invalid_split",
    )
    elsewhere = f"/v1/datasets/{other_id}/images/{image_id}"
    assert error_of(client.patch(elsewhere, json={"split": "val"}, headers=user_headers))[:2] == (
        404,
        "image_not_found",
    )
    hidden = client.patch(url, json={"split": "val"}, headers=other_tenant_headers)
    assert error_of(hidden)[:2] == (404, "dataset_not_found")

    with session_scope(settings.database_url) as session:
        job = Job(
            tenant="acme", kind="finetune", status="queued", dataset_id=dataset_id, base_model="x"
        )
        session.add(job)
        session.flush()
        job_id = job.id
    # A job using the dataset does not stop the move: it makes a new version, and the job
    # keeps the one it pinned (tests/service/test_dataset_versions.py).
    busy = client.patch(url, json={"split": "val"}, headers=user_headers)
    assert busy.status_code == 200 and busy.json()["split"] == "val"
    with session_scope(settings.database_url) as session:
        assert session.get_one(Image, image_id).split == "val"
        assert session.get_one(Job, job_id).status == "queued"


# --- the hold-out a job fixes at creation ----------------------------------------------------


def images_of(settings: Settings, per_class: dict[str, int], split: str = "train") -> int:
    """A dataset's rows (no files): per_class[label] images of each class."""
    from service.db.models import Dataset

    with session_scope(settings.database_url) as session:
        dataset = Dataset(tenant="acme", name="rows")
        session.add(dataset)
        session.flush()
        for label, count in per_class.items():
            for i in range(count):
                session.add(
                    Image(
                        dataset_id=dataset.id,
                        label=label,
                        sha256=f"{label}{i}".ljust(64, "0"),
                        width=64,
                        height=48,
                        size_bytes=100,
                        split=split,
                        uri=f"datasets/{dataset.id}/{label}{i}",
                    )
                )
        return dataset.id


def finetune(client: TestClient, headers, dataset_id: int, mode: str = "full", **overrides):
    payload = {
        "dataset_id": dataset_id,
        "base_model": "R14x0.5",
        "mode": mode,
        "overrides": {"batch_size": 8, "total_steps": 100, "crop": 32, **overrides},
    }
    return client.post("/v1/finetune", json=payload, headers=headers)


def test_a_job_holds_out_a_stratified_fifth(
    client: TestClient, user_headers, settings: Settings
) -> None:
    dataset_id = images_of(settings, {"cat": 10, "dog": 20})
    response = finetune(client, user_headers, dataset_id)
    assert response.status_code == 202, response.text
    job = response.json()
    plan, holdout = job["plan"], job["plan"]["holdout"]
    assert holdout["source"] == "auto" and holdout["seed"] == job["id"]
    assert holdout["fraction"] == 0.2
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(Image.id, Image.label).where(Image.dataset_id == dataset_id)
        ).all()
        labels = {image_id: label for image_id, label in rows}
    held = [labels[i] for i in holdout["val_image_ids"]]
    assert (held.count("cat"), held.count("dog")) == (2, 4)  # a fifth of each class
    assert plan["num_examples"] == 30 - 6  # the schedule counts the images that train
    assert plan["eval_every"] == 10 and plan["calibrate"] is False
    # The same seed gives the same images; another seed, others.
    with session_scope(settings.database_url) as session:
        again = choose_holdout(
            session, dataset_id=dataset_id, classes=["cat", "dog"], fraction=0.2, seed=job["id"]
        )
        other = choose_holdout(
            session, dataset_id=dataset_id, classes=["cat", "dog"], fraction=0.2, seed=job["id"] + 1
        )
    assert again == holdout and other["val_image_ids"] != holdout["val_image_ids"]


def test_hold_out_overrides(client: TestClient, user_headers, settings: Settings) -> None:
    dataset_id = images_of(settings, {"cat": 10, "dog": 10})
    job = finetune(
        client, user_headers, dataset_id, holdout_fraction=0.5, eval_every=7, calibrate=True
    ).json()
    assert len(job["plan"]["holdout"]["val_image_ids"]) == 10 and job["plan"]["eval_every"] == 7
    assert job["plan"]["calibrate"] is True and "holdout_fraction" not in job["plan"]["overrides"]
    off = finetune(client, user_headers, dataset_id, holdout_fraction=0).json()["plan"]
    assert off["holdout"]["source"] == "none" and off["holdout"]["val_image_ids"] == []
    assert off["num_examples"] == 20 and off["eval_every"] == 0
    linear = finetune(client, user_headers, dataset_id, mode="linear").json()["plan"]
    assert linear["holdout"]["source"] == "auto" and linear["eval_every"] == 0
    for bad in ({"holdout_fraction": 0.6}, {"eval_every": -1}):
        status, code, message = error_of(finetune(client, user_headers, dataset_id, **bad))
        assert (status, code) == (422, "invalid_request") and next(iter(bad)) in message


def test_few_images_per_class_hold_nothing_out(
    client: TestClient, user_headers, settings: Settings
) -> None:
    dataset_id = images_of(settings, {"cat": 7, "dog": 12})  # cat is under the minimum of 8
    plan = finetune(client, user_headers, dataset_id).json()["plan"]
    assert plan["holdout"] == {
        "source": "none",
        "fraction": 0.2,
        "seed": plan["holdout"]["seed"],
        "val_image_ids": [],
    }
    assert plan["num_examples"] == 19 and plan["eval_every"] == 0


def test_val_images_are_the_hold_out_and_test_images_are_left_out(
    client: TestClient, user_headers, settings: Settings
) -> None:
    dataset_id = images_of(settings, {"cat": 10, "dog": 10})
    with session_scope(settings.database_url) as session:
        rows = session.scalars(select(Image).where(Image.dataset_id == dataset_id)).all()
        for row in rows[:3]:
            row.split = "val"
        for row in rows[3:5]:
            row.split = "test"
        val_ids = sorted(row.id for row in rows[:3])
    plan = finetune(client, user_headers, dataset_id).json()["plan"]
    assert plan["holdout"]["source"] == "split" and plan["holdout"]["val_image_ids"] == val_ids
    assert plan["num_examples"] == 15  # neither val nor test images train
    assert plan["eval_every"] == 10
