"""The artifact store: uploaded images, checkpoints and models, by key. It is the truth;
every local folder is a cache or a scratch space.

Two kinds:
- `LocalArtifactStore`: one directory (the default; a shared volume in compose). Writes are
  atomic (temporary file, fsync, rename), so a reader never sees half a file.
- `FsspecArtifactStore`: any fsspec URL, e.g. `s3://bucket/prefix` (the `s3` extra), shared
  by several hosts. Each object is written by one PUT, which object stores make atomic;
  reads go through a local cache checked by sha256.

A model is a directory of files; it is published by writing its files, then a manifest
(`MANIFEST.json`: each file's sha256 and size) last. A directory without a manifest is
not a model yet (a writer died mid-way), and a reader checks every file it fetches against
the manifest, so no partial or stale file is ever loaded as a model.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from bit_core.atomic import atomic_write
from bit_core.checkpoint import sha256_file

if TYPE_CHECKING:
    from service.settings import Settings

MANIFEST = "MANIFEST.json"


class ArtifactStore(Protocol):
    def put_bytes(self, key: str, data: bytes) -> str: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def local_dir(self, key: str) -> Path: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def fetch_file(self, key: str, destination: Path) -> bool: ...
    def cached_file(self, key: str, sha256: str) -> Path: ...
    def publish_dir(self, key: str, directory: Path) -> dict[str, Any]: ...
    def fetch_dir(self, key: str) -> Path: ...
    def check_writable(self) -> None: ...


def _safe_key(key: str) -> str:
    """Keys are relative POSIX paths made by the service; refuse anything else."""
    path = PurePosixPath(key)
    if path.is_absolute() or ".." in path.parts or not key:
        raise ValueError(f"invalid artifact key {key!r}")
    return str(path)


def _copy_atomically(source: Path, destination: Path) -> None:
    with open(source, "rb") as reader, atomic_write(destination) as writer:
        shutil.copyfileobj(reader, writer, 1024 * 1024)


def manifest_of(directory: Path) -> dict[str, Any]:
    """The manifest of a directory's files (recursively; temporary and hidden files left
    out): {"files": {relative path: {"sha256", "size"}}}."""
    files = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if not path.is_file() or relative == MANIFEST or path.name.startswith("."):
            continue
        files[relative] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return {"files": files}


class LocalArtifactStore:
    """Artifacts under one directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / _safe_key(key)

    def put_bytes(self, key: str, data: bytes) -> str:
        with atomic_write(self.path(key)) as handle:
            handle.write(data)
        return key

    def get_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def delete_prefix(self, prefix: str) -> None:
        target = self.path(prefix)
        if target.is_dir():
            (target / MANIFEST).unlink(missing_ok=True)  # unpublished first, then removed
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    def local_dir(self, key: str) -> Path:
        """The store's own folder for `key`: work written here is already in the store."""
        directory = self.path(key)
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def put_file(self, key: str, path: Path) -> None:
        if Path(path).resolve() != self.path(key):  # written in place (local_dir) otherwise
            _copy_atomically(Path(path), self.path(key))

    def fetch_file(self, key: str, destination: Path) -> bool:
        source = self.path(key)
        if not source.is_file():
            return False
        if Path(destination).resolve() != source:
            _copy_atomically(source, Path(destination))
        return True

    def cached_file(self, key: str, sha256: str) -> Path:
        """The file itself: a local store needs no cache (its writes are atomic)."""
        return self.path(key)

    def publish_dir(self, key: str, directory: Path) -> dict[str, Any]:
        target = self.path(key)
        if Path(directory).resolve() != target:
            (target / MANIFEST).unlink(missing_ok=True)
            for path in sorted(Path(directory).rglob("*")):
                if path.is_file() and not path.name.startswith("."):
                    _copy_atomically(path, target / path.relative_to(directory))
        manifest = manifest_of(target)
        with atomic_write(target / MANIFEST) as handle:
            handle.write(json.dumps(manifest, indent=1).encode())
        return manifest

    def fetch_dir(self, key: str) -> Path:
        """The directory in place. Models saved before manifests existed have none; their
        weights are still checked against model.json when they load."""
        directory = self.path(key)
        if not directory.is_dir():
            raise FileNotFoundError(f"no artifact directory {key!r} in {self.root}")
        return directory

    def check_writable(self) -> None:
        """Raise OSError if the store cannot take a write now (full or read-only disk)."""
        probe = self.path(".probe")
        with atomic_write(probe) as handle:
            handle.write(b"ok")
        probe.unlink(missing_ok=True)


@dataclass(frozen=True)
class StoredObject:
    """One object of a remote store, as the orphan sweeper sees it."""

    key: str
    modified: float  # seconds since the epoch


class FsspecArtifactStore:
    """Artifacts behind an fsspec URL, read through a sha256-checked cache in `cache_dir`
    (`objects/`), with scratch folders for running jobs (`work/`)."""

    def __init__(self, url: str, cache_dir: str | os.PathLike[str]) -> None:
        try:
            import fsspec
        except ImportError as exc:
            raise RuntimeError(
                f"artifact store {url!r} needs fsspec and its driver: for s3:// install the "
                "s3 extra (pip install 'bit-service[s3]')"
            ) from exc
        # No listings cache: another host writes keys this process has already listed.
        self.fs, self.base = fsspec.core.url_to_fs(url, use_listings_cache=False)
        self.cache = Path(cache_dir).resolve()

    def _full(self, key: str) -> str:
        return f"{self.base.rstrip('/')}/{_safe_key(key)}"

    def _cached(self, key: str) -> Path:
        return self.cache / "objects" / _safe_key(key)

    def put_bytes(self, key: str, data: bytes) -> str:
        self.fs.pipe_file(self._full(key), data)  # one PUT: the object appears whole
        return key

    def get_bytes(self, key: str) -> bytes:
        return bytes(self.fs.cat_file(self._full(key)))

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._full(key)))

    def delete_prefix(self, prefix: str) -> None:
        full = self._full(prefix)
        if self.fs.exists(f"{full}/{MANIFEST}"):
            self.fs.rm_file(f"{full}/{MANIFEST}")  # unpublished first: no reader starts now
        if self.fs.exists(full):
            self.fs.rm(full, recursive=True)

    def local_dir(self, key: str) -> Path:
        """A scratch folder on this host for work on `key`; nothing in it is in the store
        until put_file / publish_dir sends it."""
        directory = self.cache / "work" / _safe_key(key)
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def put_file(self, key: str, path: Path) -> None:
        self.fs.put_file(str(path), self._full(key))

    def _download(self, key: str, destination: Path, sha256: str | None = None) -> None:
        """Fetch `key` to a temporary file beside `destination`, check it, rename it."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        temporary = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}.partial")
        try:
            self.fs.get_file(self._full(key), str(temporary))
            if sha256 is not None and sha256_file(temporary) != sha256:
                raise ValueError(
                    f"artifact {key!r} does not match its sha256 {sha256[:12]}…: the stored "
                    "object is corrupt or was replaced"
                )
            os.replace(temporary, destination)
        finally:
            temporary.unlink(missing_ok=True)

    def fetch_file(self, key: str, destination: Path) -> bool:
        """Copy the store's object to `destination`; False if there is none. The store's
        copy always wins over a local one (another host may have written a newer one)."""
        if not self.exists(key):
            return False
        self._download(key, Path(destination))
        return True

    def cached_file(self, key: str, sha256: str) -> Path:
        path = self._cached(key)
        if not (path.is_file() and sha256_file(path) == sha256):
            self._download(key, path, sha256)
        return path

    def publish_dir(self, key: str, directory: Path) -> dict[str, Any]:
        manifest_key = f"{_safe_key(key)}/{MANIFEST}"
        if self.exists(manifest_key):  # re-published: unpublish before any file changes
            self.fs.rm_file(self._full(manifest_key))
        manifest = manifest_of(Path(directory))
        for relative in manifest["files"]:
            self.put_file(f"{key}/{relative}", Path(directory) / relative)
        self.put_bytes(manifest_key, json.dumps(manifest, indent=1).encode())  # last
        return manifest

    def fetch_dir(self, key: str) -> Path:
        """A local copy of published directory `key`, every file checked against the
        manifest (files already cached and intact are not fetched again).

        Raises:
            FileNotFoundError: nothing is published at `key` (no manifest).
            ValueError: a stored file does not match the manifest.
        """
        try:
            manifest = json.loads(self.get_bytes(f"{_safe_key(key)}/{MANIFEST}"))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"nothing is published at {key!r} (no {MANIFEST})") from exc
        directory = self._cached(key)
        for relative, entry in manifest["files"].items():
            path = directory / relative
            if not (path.is_file() and sha256_file(path) == entry["sha256"]):
                self._download(f"{key}/{relative}", path, entry["sha256"])
        with atomic_write(directory / MANIFEST) as handle:
            handle.write(json.dumps(manifest, indent=1).encode())
        return directory

    def objects(self, prefix: str) -> list[StoredObject]:
        """Every object under `prefix`, with its last-modified time."""
        full = self._full(prefix)
        if not self.fs.exists(full):
            return []
        base = self.base.rstrip("/") + "/"
        found = []
        for path, info in self.fs.find(full, detail=True).items():
            modified = info.get("LastModified") or info.get("mtime") or info.get("created")
            stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified)
            found.append(StoredObject(key=path.removeprefix(base), modified=stamp))
        return found

    def delete(self, key: str) -> None:
        self.fs.rm_file(self._full(key))

    def check_writable(self) -> None:
        self.put_bytes(".probe", b"ok")


def open_store(url: str, cache_dir: str | os.PathLike[str]) -> ArtifactStore:
    """A store for a local path or an fsspec URL."""
    if "://" in url and not url.startswith("file://"):
        return FsspecArtifactStore(url, cache_dir)
    return LocalArtifactStore(url.removeprefix("file://"))


@lru_cache(maxsize=4)
def _opened(url: str, cache_dir: str) -> ArtifactStore:
    return open_store(url, cache_dir)


def store_for(settings: Settings) -> ArtifactStore:
    """The process's store for `settings` (opened once), with this host's cache under
    $BIT_HOME/cache."""
    return _opened(settings.artifacts_url, str(settings.home.resolve() / "cache"))


@contextmanager
def cleanup_on_error(store: ArtifactStore, keys: list[str]) -> Iterator[list[str]]:
    """Collect keys written inside the block; delete them all if the block fails."""
    try:
        yield keys
    except BaseException:
        for key in keys:
            store.delete_prefix(key)
        raise
