"""Datasets through the real app (SQLite and PostgreSQL): create, append, list, read, delete,
tenant isolation, and the training view handed to the worker."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.datasets import service
from service.datasets.uploads import UploadItem
from service.db.artifacts import LocalArtifactStore, open_store
from service.db.models import Dataset, Image, Job
from service.db.session import session_scope
from service.settings import Settings
from tests.factories import make_zip, png, two_classes
from tests.s3_server import S3Server
from tests.service.conftest import SMALL_LIMITS, snapshot, upload, upload_zip


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The conftest's migrated settings (both databases) with small upload limits."""
    return settings.model_copy(update=SMALL_LIMITS)


# --- create ----------------------------------------------------------------------------------


def test_create_from_files_stores_original_bytes_once(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    images = two_classes()
    duplicate = ("c1-copy.png", images[0][1], "cat")
    response = upload(client, user_headers, [*images, duplicate], name="pets")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "pets" and body["tenant"] == "acme"
    assert body["classes"] == {"cat": 2, "dog": 2}
    assert (body["image_count"], body["num_classes"]) == (4, 2)
    assert (body["added"], body["duplicates"]) == (4, 1)
    assert body["image_sizes"]["median"] == {"height": 12, "width": 16}
    assert body["created_at"].endswith("Z") or "+00:00" in body["created_at"]

    root = Path(settings.artifacts_url) / "datasets" / str(body["id"])
    stored = {path.name: path.read_bytes() for path in root.iterdir()}
    assert stored == {hashlib.sha256(data).hexdigest(): data for _, data, _ in images}
    with session_scope(settings.database_url) as session:
        rows = session.scalars(select(Image).where(Image.dataset_id == body["id"])).all()
        assert sorted(r.label for r in rows) == ["cat", "cat", "dog", "dog"]
        assert all(r.uri == f"datasets/{body['id']}/{r.sha256}" for r in rows)
        assert all((r.height, r.width, r.split) == (12, 16, "train") for r in rows)


def test_create_with_labels_as_one_json_array(
    client: TestClient, user_headers: dict[str, str]
) -> None:
    images = two_classes()
    files = [("files", (name, data, "image/png")) for name, data, _ in images]
    labels = json.dumps([label for _, _, label in images])
    response = client.post(
        "/v1/datasets", files=files, data={"labels": labels}, headers=user_headers
    )
    assert response.status_code == 201, response.text
    assert response.json()["classes"] == {"cat": 2, "dog": 2}


def test_create_from_zip_with_root_folder_skips_junk(
    client: TestClient, user_headers: dict[str, str]
) -> None:
    archive = make_zip(
        {
            "photos/cats/1.png": png(),
            "photos/cats/nested/2.png": png(),
            "photos/dogs/1.png": png(),
            "photos/dogs/2.png": png(),
            "photos/dogs/.DS_Store": b"junk",
            "__MACOSX/photos/dogs/._1.png": b"junk",
            "photos/dogs/Thumbs.db": b"junk",
        }
    )
    response = upload_zip(client, user_headers, archive, filename="my pets.zip")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["classes"] == {"cats": 2, "dogs": 2}
    assert body["name"] == "my pets"


def test_create_needs_an_api_key(client: TestClient) -> None:
    response = upload(client, {}, two_classes())
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"


# --- append ----------------------------------------------------------------------------------


def test_append_adds_new_images_and_classes_and_skips_duplicates(
    client: TestClient, user_headers: dict[str, str]
) -> None:
    images = two_classes()
    dataset_id = upload(client, user_headers, images).json()["id"]
    more = [("c3.png", png(), "cat"), ("b1.png", png(), "bird"), ("b2.png", png(), "bird")]
    response = upload(
        client, user_headers, [*more, images[2]], url=f"/v1/datasets/{dataset_id}/images"
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["classes"] == {"bird": 2, "cat": 3, "dog": 2}
    assert (body["added"], body["duplicates"], body["image_count"]) == (3, 1, 7)

    archive = make_zip({"cat/4.png": png()})
    response = upload_zip(client, user_headers, archive, url=f"/v1/datasets/{dataset_id}/images")
    assert response.status_code == 200, response.text
    assert response.json()["classes"]["cat"] == 4


def test_append_checks_the_resulting_dataset(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    images = two_classes()
    dataset_id = upload(client, user_headers, images).json()["id"]
    url = f"/v1/datasets/{dataset_id}/images"
    before = snapshot(settings)
    # One image of a new class: the dataset would hold a class below the minimum.
    response = upload(client, user_headers, [("f1.png", png(), "fish")], url=url)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "too_few_images" and error["classes"] == ["fish"]
    assert "'fish' (1)" in error["message"] and "2" in error["message"]
    assert snapshot(settings) == before
    # The bytes of a stored cat, labelled dog.
    response = upload(client, user_headers, [("renamed.png", images[0][1], "dog")], url=url)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "conflicting_labels" and "renamed.png" in error["message"]
    assert snapshot(settings) == before


# --- read, list, delete ----------------------------------------------------------------------


def test_get_reports_counts_and_size_range(
    client: TestClient, user_headers: dict[str, str]
) -> None:
    images = [
        ("a.png", png(10, 40), "a"),
        ("b.png", png(20, 30), "a"),
        ("c.png", png(30, 20), "b"),
        ("d.png", png(40, 10), "b"),
    ]
    dataset_id = upload(client, user_headers, images).json()["id"]
    body = client.get(f"/v1/datasets/{dataset_id}", headers=user_headers).json()
    assert body["classes"] == {"a": 2, "b": 2} and body["image_count"] == 4
    assert body["image_sizes"] == {
        "min": {"height": 10, "width": 10},
        "median": {"height": 20, "width": 20},
        "max": {"height": 40, "width": 40},
    }
    assert body["total_bytes"] == sum(len(data) for _, data, _ in images)


def test_list_is_paginated_newest_first(client: TestClient, user_headers: dict[str, str]) -> None:
    ids = [upload(client, user_headers, two_classes(), name=f"d{i}").json()["id"] for i in range(3)]
    page = client.get("/v1/datasets?limit=2", headers=user_headers).json()
    assert page["total"] == 3 and (page["limit"], page["offset"]) == (2, 0)
    assert [item["id"] for item in page["items"]] == ids[::-1][:2]
    assert page["items"][0]["classes"] == {"cat": 2, "dog": 2}
    rest = client.get("/v1/datasets?limit=2&offset=2", headers=user_headers).json()
    assert [item["id"] for item in rest["items"]] == ids[:1]


def test_delete_removes_rows_and_files(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    empty = snapshot(settings)
    dataset_id = upload(client, user_headers, two_classes()).json()["id"]
    assert client.delete(f"/v1/datasets/{dataset_id}", headers=user_headers).status_code == 204
    assert snapshot(settings) == empty
    again = client.delete(f"/v1/datasets/{dataset_id}", headers=user_headers)
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "dataset_not_found"


def test_delete_is_refused_while_a_job_uses_the_dataset(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    dataset_id = upload(client, user_headers, two_classes()).json()["id"]
    with session_scope(settings.database_url) as session:
        job = Job(
            tenant="acme",
            kind="finetune",
            status="running",
            dataset_id=dataset_id,
            base_model="BiT-M-R50x1",
        )
        session.add(job)
        session.flush()
        job_id = job.id
    response = client.delete(f"/v1/datasets/{dataset_id}", headers=user_headers)
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "dataset_in_use" and error["jobs"] == [job_id]
    assert str(job_id) in error["message"]
    assert client.get(f"/v1/datasets/{dataset_id}", headers=user_headers).status_code == 200

    with session_scope(settings.database_url) as session:
        session.get_one(Job, job_id).status = "succeeded"
    assert client.delete(f"/v1/datasets/{dataset_id}", headers=user_headers).status_code == 204
    with session_scope(settings.database_url) as session:
        assert session.get_one(Job, job_id).dataset_id is None  # the job's history stays


def test_tenants_see_only_their_datasets_and_admins_see_all(
    client: TestClient,
    user_headers: dict[str, str],
    other_tenant_headers: dict[str, str],
    admin_headers: dict[str, str],
    settings: Settings,
) -> None:
    theirs = upload(client, other_tenant_headers, two_classes()).json()["id"]
    ours = upload(client, user_headers, two_classes()).json()["id"]
    before = snapshot(settings)
    for method, url in [
        ("GET", f"/v1/datasets/{theirs}"),
        ("DELETE", f"/v1/datasets/{theirs}"),
    ]:
        response = client.request(method, url, headers=user_headers)
        assert response.status_code == 404, (method, url)
        assert response.json()["error"]["code"] == "dataset_not_found"
    response = upload(client, user_headers, two_classes(), url=f"/v1/datasets/{theirs}/images")
    assert response.status_code == 404
    assert snapshot(settings) == before
    listed = client.get("/v1/datasets", headers=user_headers).json()
    assert [item["id"] for item in listed["items"]] == [ours] and listed["total"] == 1

    admin_list = client.get("/v1/datasets", headers=admin_headers).json()
    assert {item["id"] for item in admin_list["items"]} == {ours, theirs}
    seen = client.get(f"/v1/datasets/{theirs}", headers=admin_headers).json()
    assert seen["tenant"] == "globex"


# --- service functions used by other modules -------------------------------------------------


def test_labeled_images_for_training(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    images = [("z.png", png(), "zebra"), ("z2.png", png(), "zebra"), *two_classes()]
    dataset_id = upload(client, user_headers, images).json()["id"]
    store = LocalArtifactStore(settings.artifacts_url)
    with session_scope(settings.database_url) as session:
        local = service.labeled_images(session, store, dataset_id)
    assert local.classes == ("cat", "dog", "zebra")
    assert local.class_counts() == {"cat": 2, "dog": 2, "zebra": 2}
    by_bytes = {hashlib.sha256(data).digest(): label for _, data, label in images}
    for source, label in zip(local.sources, local.labels, strict=True):
        assert isinstance(source, str)
        assert by_bytes[hashlib.sha256(Path(source).read_bytes()).digest()] == local.classes[label]
    assert local.typical_hw() == (12, 16)  # bit_core reads the stored files as they are


def test_labeled_images_reads_a_bucket_through_the_cache(
    client: TestClient,
    user_headers: dict[str, str],
    settings: Settings,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A worker on another host trains from the bucket: the images come from the store,
    into this host's cache, each checked against the sha256 its row recorded."""
    dataset_id = upload(client, user_headers, two_classes()).json()["id"]
    local = LocalArtifactStore(settings.artifacts_url)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = open_store(f"s3://{s3_server.new_bucket()}", tmp_path / "other-host")
    with session_scope(settings.database_url) as session:
        for uri in session.scalars(select(Image.uri).where(Image.dataset_id == dataset_id)):
            bucket.put_bytes(uri, local.get_bytes(uri))
        images = service.labeled_images(session, bucket, dataset_id)
    assert images.class_counts() == {"cat": 2, "dog": 2}
    assert all(str(source).startswith(str(tmp_path / "other-host")) for source in images.sources)


class FailingStore(LocalArtifactStore):
    """Fails the n-th write, as a full disk or a lost bucket would."""

    def __init__(self, root: str, fail_at: int) -> None:
        super().__init__(root)
        self.writes = 0
        self.fail_at = fail_at

    def put_bytes(self, key: str, data: bytes) -> str:
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError(28, "No space left on device")
        return super().put_bytes(key, data)


def _items(images: list[tuple[str, bytes, str]]) -> list[UploadItem]:
    return [UploadItem(filename=name, label=label, content=data) for name, data, label in images]


def test_a_failed_write_leaves_nothing_behind(settings: Settings) -> None:
    empty = snapshot(settings)
    store = FailingStore(settings.artifacts_url, fail_at=3)
    with session_scope(settings.database_url) as session, pytest.raises(OSError):
        service.create_dataset(
            session, store, settings, tenant="acme", name="x", items=_items(two_classes())
        )
    assert store.writes == 3  # two images were written, then removed
    assert snapshot(settings) == empty

    store = FailingStore(settings.artifacts_url, fail_at=6)
    with session_scope(settings.database_url) as session:
        dataset = service.create_dataset(
            session, store, settings, tenant="acme", name="x", items=_items(two_classes())
        )
    before = snapshot(settings)
    with session_scope(settings.database_url) as session, pytest.raises(OSError):
        service.append_images(
            session,
            store,
            settings,
            dataset=session.get_one(Dataset, dataset.id),
            items=_items(two_classes()),
        )
    assert snapshot(settings) == before  # the stored images survive, the new one is gone
