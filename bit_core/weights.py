"""A local directory of base-model weights: official BiT `.npz` files plus an index.

`pull` downloads an official model (resuming an interrupted download), `import_file` adds a
file fetched by other means (an offline machine), and `index.json` records for each entry
its file, sha256, size, source and the architecture read from the file itself.

Layout of the directory::

    index.json                  written atomically; readers never see a torn one
    .index.lock                 serialises read-modify-write of the index across processes
    BiT-M-R50x1.npz             one file per entry, `<name>.npz`
    BiT-M-R50x1.npz.partial     an interrupted download, resumed by the next `pull`
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from bit_core import registry
from bit_core.atomic import atomic_write
from bit_core.npz import PREFIX, CheckpointError

INDEX_FILE = "index.json"
INDEX_VERSION = 1
CHUNK_BYTES = 1 << 20
ROOT_KERNEL_KEY = f"{PREFIX}root_block/standardized_conv2d/kernel"
HEAD_KERNEL_KEY = f"{PREFIX}head/conv2d/kernel"

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_UNIT_KEY_RE = re.compile(rf"{re.escape(PREFIX)}block(\d+)/unit(\d+)/")
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class WeightsDownloadError(RuntimeError):
    """A download of official weights failed; the partial file is kept for resuming."""


class WeightsIntegrityError(RuntimeError):
    """An installed weights file is missing or no longer matches its recorded sha256."""


@dataclass(frozen=True)
class WeightsEntry:
    """One installed weights file, as recorded in `index.json`."""

    name: str
    file: str
    sha256: str
    size_bytes: int
    source: str  # URL it was pulled from, or the path it was imported from
    arch: str  # key of `bit_core.registry.ARCHITECTURES`, read from the file
    num_classes: int  # classes of the head shipped in the file; 0 if it has none
    installed_at: str  # ISO 8601, UTC
    directory: Path  # the weights directory; not stored, so the directory can move

    @property
    def path(self) -> Path:
        return self.directory / self.file

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        del record["directory"]
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any], directory: Path) -> WeightsEntry:
        fields = [f.name for f in dataclasses.fields(cls) if f.name != "directory"]
        missing = [name for name in fields if name not in record]
        if missing:
            raise ValueError(f"entry {record.get('name')!r} lacks {missing}")
        return cls(**{name: record[name] for name in fields}, directory=directory)


def default_weights_dir() -> Path:
    """`$BIT_WEIGHTS_DIR` if set, else `$BIT_HOME/weights` (BIT_HOME defaults to `./.bit`)."""
    explicit = os.environ.get("BIT_WEIGHTS_DIR")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("BIT_HOME") or ".bit").expanduser() / "weights"


# --- reading a checkpoint's shape -------------------------------------------------------------


def _array_shape(archive: np.lib.npyio.NpzFile, key: str) -> tuple[int, ...]:
    """Shape of one member from its .npy header, without reading the (possibly GB) data."""
    assert archive.zip is not None  # None only after close()
    with archive.zip.open(f"{key}.npy") as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(member)
        else:
            shape, _, _ = np.lib.format.read_array_header_2_0(member)
    return tuple(shape)


def infer_npz_architecture(path: str | os.PathLike[str]) -> tuple[str, int]:
    """Read which architecture an official-format `.npz` holds, and its head's class count.

    Only key names and array headers are read, so this is cheap even for R152x4.

    Returns:
        (architecture name from `bit_core.registry.ARCHITECTURES`, number of head classes;
        0 when the file carries no head).

    Raises:
        CheckpointError: the file is not a BiT `.npz`, or no known architecture matches.
        FileNotFoundError: there is no such file.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise CheckpointError(f"{path}: a single .npy array, not a BiT .npz checkpoint")
            keys = set(archive.files)
            root = _array_shape(archive, ROOT_KERNEL_KEY) if ROOT_KERNEL_KEY in keys else None
            head = _array_shape(archive, HEAD_KERNEL_KEY) if HEAD_KERNEL_KEY in keys else None
    except FileNotFoundError:
        raise
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(
            f"{path}: not a readable BiT .npz checkpoint ({exc}); re-download it or check the path"
        ) from exc
    if root is None or len(root) != 4 or root[:3] != (7, 7, 3):
        raise CheckpointError(
            f"{path}: not a BiT checkpoint: expected '{ROOT_KERNEL_KEY}' of shape (7, 7, 3, C), "
            f"found {root if root is not None else 'no such key'}"
        )
    units: dict[int, set[int]] = {}
    for key in keys:
        match = _UNIT_KEY_RE.match(key)
        if match:
            units.setdefault(int(match[1]), set()).add(int(match[2]))
    if sorted(units) != [1, 2, 3, 4]:
        raise CheckpointError(
            f"{path}: not a BiT checkpoint: expected blocks 1-4 under '{PREFIX}blockN/', "
            f"found blocks {sorted(units)}"
        )
    block_units = tuple(len(units[block]) for block in (1, 2, 3, 4))
    root_chs = root[3]
    for arch in registry.ARCHITECTURES.values():
        if arch.block_units == block_units and int(64 * arch.width_factor) == root_chs:
            return arch.name, (head[-1] if head else 0)
    raise CheckpointError(
        f"{path}: no known architecture has block units {block_units} and a {root_chs}-channel "
        f"root; known: {', '.join(registry.ARCHITECTURES)}"
    )


def _validate(path: Path) -> tuple[str, int]:
    """`infer_npz_architecture` plus a CRC check of every member.

    The CRC pass catches what a header-only read cannot: corrupt data, or a resumed download
    spliced from two different versions of the upstream file.
    """
    arch, num_classes = infer_npz_architecture(path)
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise CheckpointError(f"{path}: member '{bad}' is corrupt (CRC mismatch)")
    return arch, num_classes


# --- the index --------------------------------------------------------------------------------


def _directory(weights_dir: str | os.PathLike[str] | None) -> Path:
    return Path(weights_dir) if weights_dir is not None else default_weights_dir()


def _check_name(name: str) -> None:
    # Names become file names: no separators, no '..', no hidden files (atomic_write's
    # temporaries are dot-files in the same directory).
    if not _NAME_RE.fullmatch(name) or name.startswith("."):
        raise ValueError(
            f"invalid weights name {name!r}: use letters, digits, '.', '_' and '-' only, "
            "not starting with '.' (e.g. 'BiT-M-R50x1'); pass a name if the file's does not fit"
        )


def _read_index(directory: Path) -> dict[str, WeightsEntry]:
    index_path = directory / INDEX_FILE
    try:
        data = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{index_path}: unreadable weights index ({exc}); move it aside and re-add the "
            "files with `bit weights import FILE --name NAME`"
        ) from exc
    try:
        if data.get("version") != INDEX_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {INDEX_VERSION}")
        entries = [WeightsEntry.from_json(record, directory) for record in data["entries"]]
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{index_path}: malformed weights index ({exc}); move it aside and re-add the "
            "files with `bit weights import FILE --name NAME`"
        ) from exc
    return {entry.name: entry for entry in entries}


@contextlib.contextmanager
def _index_lock(directory: Path) -> Iterator[None]:
    # Two processes adding different entries must not lose one: lock around read-modify-write.
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".index.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _record(entry: WeightsEntry) -> None:
    with _index_lock(entry.directory):
        entries = _read_index(entry.directory)
        entries[entry.name] = entry
        data = {
            "version": INDEX_VERSION,
            "entries": [entries[name].to_json() for name in sorted(entries)],
        }
        with atomic_write(entry.directory / INDEX_FILE) as handle:
            handle.write((json.dumps(data, indent=2) + "\n").encode("utf-8"))


def list_installed(weights_dir: str | os.PathLike[str] | None = None) -> list[WeightsEntry]:
    """All entries of the index, sorted by name (empty if the directory has no index)."""
    entries = _read_index(_directory(weights_dir))
    return [entries[name] for name in sorted(entries)]


def find(name: str, weights_dir: str | os.PathLike[str] | None = None) -> WeightsEntry | None:
    """The entry called `name`, or None if it is not installed."""
    return _read_index(_directory(weights_dir)).get(name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify(entry: WeightsEntry) -> None:
    """Recompute the file's sha256 and compare it with the index.

    Raises:
        WeightsIntegrityError: the file is missing, or its size or sha256 differs.
    """
    fix = f"delete it and run `bit weights pull {entry.name}` (or import it again)"
    if not entry.path.is_file():
        raise WeightsIntegrityError(f"{entry.path}: missing, though indexed as '{entry.name}'")
    size = entry.path.stat().st_size
    if size != entry.size_bytes:
        raise WeightsIntegrityError(
            f"{entry.path}: {size} bytes, but the index records {entry.size_bytes}; {fix}"
        )
    actual = _sha256(entry.path)
    if actual != entry.sha256:
        raise WeightsIntegrityError(
            f"{entry.path}: sha256 {actual} differs from the recorded {entry.sha256}; {fix}"
        )


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- import -----------------------------------------------------------------------------------


def import_file(
    path: str | os.PathLike[str],
    weights_dir: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
) -> WeightsEntry:
    """Copy an official-format `.npz` into the weights directory and index it.

    Args:
        path: the file, e.g. downloaded on another machine.
        weights_dir: defaults to `default_weights_dir()`.
        name: entry name; defaults to the file's stem. An existing entry of that name is
            replaced. An official name (e.g. 'BiT-M-R50x1') must hold that architecture.

    Raises:
        ValueError: the name is not a plain file name.
        CheckpointError: the file is not a usable BiT `.npz`, or its architecture differs
            from the official model of that name.
        FileNotFoundError: there is no such file.
    """
    source = Path(path)
    name = source.stem if name is None else name
    _check_name(name)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file; pass the path of a BiT .npz file")
    arch, num_classes = _validate(source)
    official = registry.OFFICIAL_MODELS.get(name)
    if official is not None and arch != official.arch:
        raise CheckpointError(
            f"{source}: holds a {arch} but '{name}' is the official {official.arch}; "
            "pass a different --name or the right file"
        )
    directory = _directory(weights_dir)
    destination = directory / f"{name}.npz"
    digest = hashlib.sha256()
    size = 0
    # Hash the bytes as they are copied: one pass over a possibly multi-GB file.
    with open(source, "rb") as reader, atomic_write(destination) as writer:
        while chunk := reader.read(CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
            size += len(chunk)
    entry = WeightsEntry(
        name=name,
        file=destination.name,
        sha256=digest.hexdigest(),
        size_bytes=size,
        source=str(source.resolve()),
        arch=arch,
        num_classes=num_classes,
        installed_at=_now(),
        directory=directory,
    )
    _record(entry)
    return entry


# --- download ---------------------------------------------------------------------------------


def _describe(exc: BaseException, timeout: float) -> str:
    """Why a download failed, in words: an HTTP status, unreachable, timed out, or cut off."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"the server answered HTTP {exc.code} {exc.reason}"
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout} s"
    if isinstance(exc, urllib.error.URLError):  # raised while connecting: DNS, refused, no route
        return f"cannot reach the server ({reason})"
    return str(exc)  # the connection broke during the transfer


def _download_error(name: str, url: str, partial: Path, reason: str) -> WeightsDownloadError:
    kept = partial.stat().st_size if partial.exists() else 0
    return WeightsDownloadError(
        f"download of '{name}' from {url} failed: {reason}. The partial file {partial} "
        f"({kept} bytes) was kept; running the same pull again resumes it. On an offline "
        f"machine, download {url} elsewhere, copy it here and run "
        f"`bit weights import FILE --name {name}`"
    )


def _content_range(header: str | None) -> tuple[int, int | None]:
    """(first byte, total size or None) of a 206 answer's `Content-Range`."""
    match = _CONTENT_RANGE_RE.fullmatch((header or "").strip())
    if match is None:
        raise ValueError(f"unparseable Content-Range {header!r}")
    return int(match[1]), (None if match[3] == "*" else int(match[3]))


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse | None:
    """Request `url` from byte `offset`; None when the server says the range is past the end."""
    request = urllib.request.Request(url, headers={"User-Agent": "bit-service"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            return None
        raise
    return response


def _fetch(handle: BinaryIO, url: str, *, progress: bool, timeout: float, desc: str) -> None:
    """Append the rest of `url` to `handle` (open on the partial file, positioned at its end).

    Raises OSError / HTTPException for network failures (the caller wraps them) and ValueError
    for answers that cannot be resumed.
    """
    offset = handle.tell()
    response = _open(url, offset, timeout)
    if response is None:
        # 416: nothing past `offset`, so an earlier run fetched the whole file. Should the
        # partial instead be longer than the file, validation rejects and deletes it.
        return
    with response:
        total: int | None = None
        length = response.headers.get("Content-Length")
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                handle.truncate(0)
                raise ValueError(
                    f"asked to resume at byte {offset}, the server answered from byte {start}; "
                    "the partial file was reset"
                )
        else:
            # A server that ignores Range answers 200 with the whole file: start over.
            handle.seek(0)
            handle.truncate(0)
            offset = 0
        if total is None and length is not None:
            total = offset + int(length)
        with tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=not progress,
        ) as bar:
            while chunk := response.read(CHUNK_BYTES):
                handle.write(chunk)
                bar.update(len(chunk))
    handle.flush()
    os.fsync(handle.fileno())
    # http.client returns b"" rather than raising when a connection drops mid-body.
    size = handle.tell()
    if total is not None and size != total:
        raise ConnectionError(f"connection closed after {size} of {total} bytes")


def pull(
    name: str,
    weights_dir: str | os.PathLike[str] | None = None,
    *,
    url: str | None = None,
    progress: bool = True,
    timeout: float = 30,
) -> WeightsEntry:
    """Download official BiT weights into the weights directory and index them.

    An entry of that name whose file exists is returned as it is, without network access
    (`verify` checks it). An interrupted download is resumed from `<name>.npz.partial`.

    Args:
        name: an official model name, a key of `bit_core.registry.OFFICIAL_MODELS`.
        weights_dir: defaults to `default_weights_dir()`.
        url: download from here instead of the official URL (mirrors, tests).
        progress: show a tqdm progress bar on stderr.
        timeout: seconds to wait for the connection and for each read.

    Raises:
        ValueError: the name is not an official model.
        WeightsDownloadError: the download failed; the message says why and how to go on.
        CheckpointError: the downloaded file is not the expected BiT checkpoint (it is deleted).
    """
    official = registry.OFFICIAL_MODELS.get(name)
    if official is None:
        known = ", ".join(sorted(registry.OFFICIAL_MODELS))
        raise ValueError(
            f"unknown official model '{name}'; known names: {known}. "
            "Other weights can be added with `bit weights import FILE --name NAME`"
        )
    directory = _directory(weights_dir)
    existing = find(name, directory)
    if existing is not None and existing.path.is_file():
        return existing
    url = url or official.url
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f"{name}.npz.partial"
    destination = directory / f"{name}.npz"
    with open(partial, "ab") as handle:
        try:
            # Two processes appending to one partial file would corrupt it.
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WeightsDownloadError(
                f"another process is already downloading '{name}' into {partial}; "
                "wait for it to finish"
            ) from None
        handle.seek(0, os.SEEK_END)  # append mode leaves the position at 0 until a write
        try:
            _fetch(handle, url, progress=progress, timeout=timeout, desc=name)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise _download_error(name, url, partial, _describe(exc, timeout)) from exc
        try:
            arch, num_classes = _validate(partial)
            if arch != official.arch:
                raise CheckpointError(f"holds a {arch}, expected {official.arch}")
        except CheckpointError as exc:
            # A complete but wrong file would otherwise be "resumed" forever.
            partial.unlink(missing_ok=True)
            raise CheckpointError(
                f"{url}: the downloaded file is not the BiT checkpoint '{name}' ({exc}); it "
                "was deleted, so the next pull starts afresh; check the URL"
            ) from exc
        sha256 = _sha256(partial)
        size = partial.stat().st_size
        os.replace(partial, destination)
    _fsync_dir(directory)
    entry = WeightsEntry(
        name=name,
        file=destination.name,
        sha256=sha256,
        size_bytes=size,
        source=url,
        arch=arch,
        num_classes=num_classes,
        installed_at=_now(),
        directory=directory,
    )
    _record(entry)
    return entry


__all__ = [
    "WeightsDownloadError",
    "WeightsEntry",
    "WeightsIntegrityError",
    "default_weights_dir",
    "find",
    "import_file",
    "infer_npz_architecture",
    "list_installed",
    "pull",
    "verify",
]
