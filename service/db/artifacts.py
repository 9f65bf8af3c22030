"""The artifact store: uploaded images, checkpoints and models, by key.

A local directory by default (a shared volume in compose). Writes are atomic (temporary
file, fsync, rename) so a reader never sees half a file, even if the writer is killed.
Any fsspec URL (e.g. s3://bucket/prefix) works when fsspec and its driver are installed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Protocol

from bit_core.atomic import atomic_write


class ArtifactStore(Protocol):
    def put_bytes(self, key: str, data: bytes) -> str: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def local_dir(self, key: str) -> Path: ...
    def check_writable(self) -> None: ...


def _safe_key(key: str) -> str:
    """Keys are relative POSIX paths made by the service; refuse anything else."""
    path = PurePosixPath(key)
    if path.is_absolute() or ".." in path.parts or not key:
        raise ValueError(f"invalid artifact key {key!r}")
    return str(path)


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
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    def local_dir(self, key: str) -> Path:
        """A local directory for `key` that training can write into directly."""
        directory = self.path(key)
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def check_writable(self) -> None:
        """Raise OSError if the store cannot take a write now (full or read-only disk)."""
        probe = self.path(".probe")
        with atomic_write(probe) as handle:
            handle.write(b"ok")
        probe.unlink(missing_ok=True)


class FsspecArtifactStore:
    """Artifacts behind an fsspec URL; local_dir() mirrors a prefix into a cache folder."""

    def __init__(self, url: str, cache_dir: str | os.PathLike[str]) -> None:
        try:
            import fsspec
        except ImportError as exc:
            raise RuntimeError(
                f"artifact store {url!r} needs fsspec (and its driver, e.g. s3fs): "
                "pip install fsspec s3fs"
            ) from exc
        self.fs, self.base = fsspec.core.url_to_fs(url)
        self.cache = Path(cache_dir)

    def _full(self, key: str) -> str:
        return f"{self.base.rstrip('/')}/{_safe_key(key)}"

    def put_bytes(self, key: str, data: bytes) -> str:
        self.fs.pipe_file(self._full(key), data)  # object stores write whole objects
        return key

    def get_bytes(self, key: str) -> bytes:
        return bytes(self.fs.cat_file(self._full(key)))

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._full(key)))

    def delete_prefix(self, prefix: str) -> None:
        if self.fs.exists(self._full(prefix)):
            self.fs.rm(self._full(prefix), recursive=True)

    def local_dir(self, key: str) -> Path:
        directory = self.cache / _safe_key(key)
        directory.mkdir(parents=True, exist_ok=True)
        if self.fs.exists(self._full(key)):
            self.fs.get(self._full(key) + "/", str(directory), recursive=True)
        return directory

    def check_writable(self) -> None:
        self.put_bytes(".probe", b"ok")


def open_store(url: str, cache_dir: str | os.PathLike[str]) -> ArtifactStore:
    """A store for a local path or an fsspec URL."""
    if "://" in url and not url.startswith("file://"):
        return FsspecArtifactStore(url, cache_dir)
    return LocalArtifactStore(url.removeprefix("file://"))


@contextmanager
def cleanup_on_error(store: ArtifactStore, keys: list[str]) -> Iterator[list[str]]:
    """Collect keys written inside the block; delete them all if the block fails."""
    try:
        yield keys
    except BaseException:
        for key in keys:
            store.delete_prefix(key)
        raise
