"""The artifact store's contract, on a local folder and on a real S3 protocol (moto on
loopback): atomic publication of model directories, sha256-checked reads through the
cache, the store's copy winning over a local one, and the orphan sweep of a bucket."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.db.artifacts import (
    MANIFEST,
    ArtifactStore,
    FsspecArtifactStore,
    LocalArtifactStore,
    open_store,
)
from service.db.migrate import upgrade
from service.db.models import Dataset, Image
from service.db.orphans import sweep_orphans
from service.db.session import session_scope
from tests.s3_server import S3Server

pytestmark = pytest.mark.services


@pytest.fixture(params=["local", "s3"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ArtifactStore]:
    if request.param == "local":
        yield open_store(str(tmp_path / "artifacts"), tmp_path / "cache")
        return
    server: S3Server = request.getfixturevalue("s3_server")
    yield s3_store(server, server.new_bucket(), monkeypatch, tmp_path / "cache")


def s3_store(
    server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch, cache: Path
) -> FsspecArtifactStore:
    """A store on `bucket` of `server`, reached as a host would: through AWS_* variables."""
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    return FsspecArtifactStore(f"s3://{bucket}/bit", cache)


def model_folder(root: Path, weights: bytes = b"w" * 1000) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "weights.safetensors").write_bytes(weights)
    (root / "model.json").write_text(json.dumps({"arch": "R14x0.5"}))
    return root


def test_a_published_directory_comes_back_whole(store: ArtifactStore, tmp_path: Path):
    manifest = store.publish_dir("jobs/1/model", model_folder(tmp_path / "work"))
    assert set(manifest["files"]) == {"weights.safetensors", "model.json"}
    fetched = store.fetch_dir("jobs/1/model")
    assert (fetched / "weights.safetensors").read_bytes() == b"w" * 1000
    assert json.loads((fetched / MANIFEST).read_text()) == manifest


def test_a_directory_without_its_manifest_is_not_a_model(tmp_path: Path, s3_server: S3Server):
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    # What a worker killed mid-publish leaves: the files, no manifest yet.
    client.put_object(Bucket=bucket, Key="bit/jobs/2/model/weights.safetensors", Body=b"w")
    store = FsspecArtifactStore(f"s3://{bucket}/bit", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="nothing is published"):
        store.fetch_dir("jobs/2/model")


def test_a_replaced_object_is_refused_and_a_damaged_cache_refetched(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
):
    bucket = s3_server.new_bucket()
    store = s3_store(s3_server, bucket, monkeypatch, tmp_path / "cache")
    store.publish_dir("jobs/3/model", model_folder(tmp_path / "work"))
    cached = store.fetch_dir("jobs/3/model") / "weights.safetensors"
    cached.write_bytes(b"bit rot")  # the cache is only a cache: checked, and fetched again
    assert (store.fetch_dir("jobs/3/model") / "weights.safetensors").read_bytes() == b"w" * 1000
    s3_server.client().put_object(
        Bucket=bucket, Key="bit/jobs/3/model/weights.safetensors", Body=b"tampered"
    )
    cached.unlink()
    with pytest.raises(ValueError, match="does not match its sha256"):
        store.fetch_dir("jobs/3/model")
    assert not cached.exists()  # nothing unchecked was left in the cache


def test_cached_files_are_checked_by_sha256(store: ArtifactStore, tmp_path: Path):
    import hashlib

    data = b"an image's bytes"
    digest = hashlib.sha256(data).hexdigest()
    store.put_bytes(f"datasets/1/{digest}", data)
    assert store.cached_file(f"datasets/1/{digest}", digest).read_bytes() == data
    if isinstance(store, FsspecArtifactStore):
        with pytest.raises(ValueError, match="sha256"):
            store.cached_file(f"datasets/1/{digest}", "0" * 64)


def test_the_stores_checkpoint_wins_over_a_local_leftover(store: ArtifactStore, tmp_path: Path):
    work = store.local_dir("jobs/4") / "state.safetensors"
    assert not store.fetch_file("jobs/4/state.safetensors", work)
    newer = tmp_path / "elsewhere.safetensors"
    newer.write_bytes(b"step 40")
    store.put_file("jobs/4/state.safetensors", newer)
    if isinstance(store, FsspecArtifactStore):
        work.write_bytes(b"step 20")  # this host's copy from an earlier run
    assert store.fetch_file("jobs/4/state.safetensors", work)
    assert work.read_bytes() == b"step 40"


def test_delete_prefix_unpublishes_then_removes(store: ArtifactStore, tmp_path: Path):
    store.publish_dir("jobs/5/model", model_folder(tmp_path / "work"))
    store.delete_prefix("jobs/5/model")
    assert not store.exists(f"jobs/5/model/{MANIFEST}")
    assert not store.exists("jobs/5/model/weights.safetensors")
    with pytest.raises(FileNotFoundError):
        store.fetch_dir("jobs/5/model")


def test_the_sweeper_cleans_a_bucket(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
):
    bucket = s3_server.new_bucket()
    store = s3_store(s3_server, bucket, monkeypatch, tmp_path / "cache")
    url = f"sqlite:///{tmp_path / 'bit.db'}"
    upgrade(url)
    with session_scope(url) as session:
        dataset = Dataset(tenant="t", name="d")
        session.add(dataset)
        session.flush()
        kept = f"datasets/{dataset.id}/{'a' * 64}"
        session.add(
            Image(
                dataset_id=dataset.id,
                label="x",
                sha256="a" * 64,
                width=1,
                height=1,
                size_bytes=10,
                uri=kept,
            )
        )
        session.commit()
        store.put_bytes(kept, b"referenced")
        store.put_bytes(f"datasets/{dataset.id}/{'b' * 64}", b"a killed upload's image")
        store.publish_dir("jobs/7/model", model_folder(tmp_path / "published"))
        s3_server.client().put_object(Bucket=bucket, Key="bit/jobs/8/model/weights.safetensors")

        assert sweep_orphans(session, store, grace_s=3600) == []  # all younger than the grace
        # A negative grace makes every object "old enough": what an hour later would see.
        removed = sweep_orphans(session, store, grace_s=-60)
    assert sorted(removed) == [f"datasets/{dataset.id}/{'b' * 64}", "jobs/8/model"]
    keys = s3_server.keys(bucket)
    assert f"bit/{kept}" in keys
    assert f"bit/jobs/7/model/{MANIFEST}" in keys
    assert not [key for key in keys if key.startswith("bit/jobs/8/")]


def test_a_local_store_sweeps_as_before(tmp_path: Path):
    store = LocalArtifactStore(tmp_path / "artifacts")
    url = f"sqlite:///{tmp_path / 'bit.db'}"
    upgrade(url)
    store.put_bytes("datasets/1/" + "c" * 64, b"orphan")
    with session_scope(url) as session:
        assert sweep_orphans(session, store, grace_s=-60) == ["datasets/1/" + "c" * 64]
