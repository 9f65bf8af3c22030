"""Dataset versions through the app (SQLite and PostgreSQL): every change to a dataset's
images makes an immutable version; labels are edited and images deleted into new ones,
and a deleted image stays for the versions that hold it."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select

from service.db.models import AuditEvent, DatasetVersion, DatasetVersionImage, Image
from service.db.orphans import _referenced
from service.db.session import session_scope
from service.settings import Settings
from tests.factories import png, two_classes
from tests.service.conftest import error_of, upload


def members(settings: Settings, dataset_id: int, number: int) -> dict[int, tuple[str, str]]:
    """{image id: (label, split)} of version `number` of a dataset."""
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(
                DatasetVersionImage.image_id, DatasetVersionImage.label, DatasetVersionImage.split
            )
            .join(DatasetVersion, DatasetVersion.id == DatasetVersionImage.version_id)
            .where(DatasetVersion.dataset_id == dataset_id, DatasetVersion.number == number)
        )
        return {image_id: (label, split) for image_id, label, split in rows}


def versions(client: TestClient, headers: dict[str, str], dataset_id: int) -> list[dict]:
    response = client.get(f"/v1/datasets/{dataset_id}/versions", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["items"]


def image_ids(client: TestClient, headers: dict[str, str], dataset_id: int) -> dict[int, str]:
    page = client.get(f"/v1/datasets/{dataset_id}/images", headers=headers).json()
    return {item["id"]: item["label"] for item in page["items"]}


def test_uploads_make_versions(client: TestClient, user_headers, settings: Settings) -> None:
    dataset_id = upload(client, user_headers, two_classes()).json()["id"]
    first = versions(client, user_headers, dataset_id)
    assert [(v["number"], v["image_count"]) for v in first] == [(1, 4)]
    assert first[0]["dataset_id"] == dataset_id
    url = f"/v1/datasets/{dataset_id}/images"
    extra = [("c.png", png(), "cat")]
    added = upload(client, user_headers, extra, url=url)
    assert added.status_code == 200, added.text
    assert [
        (v["number"], v["image_count"]) for v in versions(client, user_headers, dataset_id)
    ] == [
        (2, 5),
        (1, 4),
    ]
    # A duplicate adds nothing, so no version either.
    assert upload(client, user_headers, extra, url=url).json()["added"] == 0
    assert len(versions(client, user_headers, dataset_id)) == 2
    assert len(members(settings, dataset_id, 1)) == 4 and len(members(settings, dataset_id, 2)) == 5
    # Deleting the dataset deletes its versions.
    assert client.delete(f"/v1/datasets/{dataset_id}", headers=user_headers).status_code == 204
    with session_scope(settings.database_url) as session:
        assert session.scalars(select(DatasetVersion.id)).all() == []
        assert session.scalars(select(DatasetVersionImage.image_id)).all() == []


def test_a_label_edit_makes_a_new_version(
    client: TestClient, user_headers, other_tenant_headers, settings: Settings
) -> None:
    dataset_id = upload(client, user_headers, two_classes()).json()["id"]
    images = image_ids(client, user_headers, dataset_id)
    cat = next(i for i, label in images.items() if label == "cat")
    url = f"/v1/datasets/{dataset_id}/images/{cat}"
    edited = client.patch(url, json={"label": " lion "}, headers=user_headers)
    assert edited.status_code == 200, edited.text
    assert edited.json()["label"] == "lion"
    assert [v["number"] for v in versions(client, user_headers, dataset_id)] == [2, 1]
    assert members(settings, dataset_id, 1)[cat] == ("cat", "train")  # immutable
    assert members(settings, dataset_id, 2)[cat] == ("lion", "train")
    classes = client.get(f"/v1/datasets/{dataset_id}", headers=user_headers).json()["classes"]
    assert classes == {"cat": 1, "dog": 2, "lion": 1}
    # Label and split together, one version; the same values again, none.
    both = client.patch(url, json={"label": "cat", "split": "val"}, headers=user_headers)
    assert both.json()["label"] == "cat" and both.json()["split"] == "val"
    assert members(settings, dataset_id, 3)[cat] == ("cat", "val")
    client.patch(url, json={"label": "cat", "split": "val"}, headers=user_headers)
    assert len(versions(client, user_headers, dataset_id)) == 3

    bad = client.patch(url, json={"label": "  "}, headers=user_headers)
    assert error_of(bad)[:2] == (422, "invalid_label")
    hidden = client.patch(url, json={"label": "x"}, headers=other_tenant_headers)
    assert error_of(hidden)[:2] == (404, "dataset_not_found")
    assert len(versions(client, user_headers, dataset_id)) == 3


def test_deleting_an_image_makes_a_version_and_an_audit_row(
    client: TestClient, user_headers, other_tenant_headers, settings: Settings
) -> None:
    sent = two_classes()
    dataset_id = upload(client, user_headers, sent).json()["id"]
    page = client.get(f"/v1/datasets/{dataset_id}/images", headers=user_headers).json()
    dog, name = next((i["id"], i["filename"]) for i in page["items"] if i["label"] == "dog")
    url = f"/v1/datasets/{dataset_id}/images/{dog}"
    assert error_of(client.delete(url, headers=other_tenant_headers))[:2] == (
        404,
        "dataset_not_found",
    )
    deleted = client.delete(url, headers=user_headers)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["number"] == 2 and deleted.json()["image_count"] == 3
    assert dog not in image_ids(client, user_headers, dataset_id)
    shown = client.get(f"/v1/datasets/{dataset_id}", headers=user_headers).json()
    assert shown["classes"] == {"cat": 2, "dog": 1} and shown["image_count"] == 3
    assert dog in members(settings, dataset_id, 1) and dog not in members(settings, dataset_id, 2)
    with session_scope(settings.database_url) as session:
        row = session.get_one(Image, dog)
        assert row.deleted_at is not None
        # Version 1 still holds it: its row names its file, so the sweeper keeps the file.
        assert _referenced(session, row.uri)
        audit = session.scalars(select(AuditEvent).where(AuditEvent.action == "image.delete")).all()
    assert len(audit) == 1 and audit[0].tenant == "acme"
    assert audit[0].target == f"dataset {dataset_id} image {dog}"
    assert audit[0].detail["version"] == 2 and audit[0].detail["label"] == "dog"

    again = client.delete(url, headers=user_headers)
    assert error_of(again)[:2] == (404, "image_not_found")
    assert error_of(client.patch(url, json={"split": "val"}, headers=user_headers))[:2] == (
        404,
        "image_not_found",
    )
    # The same bytes can come back: a new image, in a new version.
    same = [image for image in sent if image[0] == name]
    back = upload(client, user_headers, same, url=f"/v1/datasets/{dataset_id}/images")
    assert back.status_code == 200 and back.json()["added"] == 1
    assert len(versions(client, user_headers, dataset_id)) == 3


def test_versions_of_a_hidden_dataset(
    client: TestClient, user_headers, other_tenant_headers
) -> None:
    dataset_id = upload(client, user_headers, two_classes()).json()["id"]
    hidden = client.get(f"/v1/datasets/{dataset_id}/versions", headers=other_tenant_headers)
    assert error_of(hidden)[:2] == (404, "dataset_not_found")
