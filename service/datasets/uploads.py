"""Turning uploaded files and zips into checked, labelled images.

Nothing here writes anywhere but temporary files: every check runs before the service
stores a byte, so a refused upload leaves nothing behind. Uploads are read from Starlette's
spooled files (on disk past 1 MB) and zip members are streamed with a byte cap, so no
request is ever held whole in memory.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
import unicodedata
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from tempfile import SpooledTemporaryFile
from typing import IO

from starlette.datastructures import UploadFile

from bit_core.images import ImageDecodeError, image_size, open_image
from service.errors import ApiError
from service.settings import Settings

# Zip members are copied to temporary files that stay in memory up to this size (as
# Starlette spools uploads), so a large archive lands on disk, not in RAM.
SPOOL_MAX_BYTES = 1024 * 1024
CHUNK_BYTES = 64 * 1024
# Files that archivers and file browsers add next to images; skipped, not refused.
JUNK_FILES = {"thumbs.db", "desktop.ini"}
JUNK_FOLDERS = {"__macosx"}
_DRIVE = re.compile(r"^[A-Za-z]:")
# Names in messages are cut to this length: a client chooses them.
MAX_NAME_CHARS = 200
# What an image is for: training, validation (held out; never trains) or testing (only
# evaluations read it). A zip may carry them as its top folders.
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = "train"

# The error answers of an upload (status, code, example message), documented in OpenAPI by
# every route that takes one (datasets, fine-tune): most are raised here, the rest by the
# upload-size middleware and Starlette's multipart parser.
UPLOAD_ERROR_CODES = (
    (400, "invalid_multipart", "Invalid multipart data: send a well-formed multipart/form-data"),
    (413, "upload_too_large", "the request body is over the limit of 209715200 bytes; ..."),
    (413, "file_too_large", "cat1.jpg: over the per-image limit of 20971520 bytes; ..."),
    (413, "image_too_large", "cat1.png: 50000x50000 pixels is over the limit of 40000000; ..."),
    (413, "archive_too_large", "pets.zip: 25000 entries is over the limit of 20000; ..."),
    (422, "invalid_image", "notes.png: not an image Pillow can read; send a JPEG, PNG, ..."),
    (422, "labels_mismatch", "labels: got 2 label(s) for 3 file(s); send one `labels` ..."),
    (422, "invalid_split", "splits: 'dev' of 'cat1.jpg' is not one of train, val, test; ..."),
    (422, "splits_mismatch", "splits: got 2 split(s) for 3 file(s); send one `splits` ..."),
    (422, "invalid_label", "label '' of 'cat1.jpg' is empty; give every image a class name"),
    (422, "invalid_name", "name 'a?b' contains control characters (such as NUL ...); ..."),
    (422, "too_many_classes", "labels: 1200 classes is over the limit of 1000; ..."),
    (422, "too_few_images", "labels: classes 'dog' (1) have fewer than 2 distinct images ..."),
    (422, "conflicting_labels", "'a.jpg' and 'b.jpg' are the same image but labelled ..."),
    (422, "invalid_archive", "pets.zip: not a zip archive (File is not a zip file); ..."),
    (422, "invalid_archive_layout", "pets.zip: entry 'x.jpg' is not inside a class folder; ..."),
    (422, "unsafe_archive_path", "pets.zip: entry '../x.jpg' has an absolute path or '..'; ..."),
    (422, "unsafe_archive_entry", "pets.zip: entry 'cats/x.jpg' is a symbolic link; ..."),
    (422, "no_images", "no images were sent: send `files` with one `labels` field per file, ..."),
    (422, "invalid_upload_form", "send either `files` (with `labels`) or one `archive`, ..."),
    (422, "invalid_request", "invalid request: body.name: String should have at most 256 ..."),
)


@dataclass(frozen=True)
class UploadItem:
    """One uploaded image before checks: its name (for messages), label, content and split.

    `content` is the file's bytes or a readable, seekable binary file (an UploadFile's
    spooled file, a zip member copied to a temporary file); it is read from the start.
    """

    filename: str
    label: str
    content: bytes | IO[bytes]
    split: str = DEFAULT_SPLIT

    def read(self, limit: int | None = None) -> bytes:
        """The content's bytes; with `limit`, at most limit + 1 of them (to detect excess)."""
        if isinstance(self.content, bytes):
            return self.content if limit is None else self.content[: limit + 1]
        self.content.seek(0)
        return self.content.read() if limit is None else self.content.read(limit + 1)


@dataclass(frozen=True)
class CheckedImage:
    """An item that passed every check, with what the database records about it."""

    item: UploadItem
    label: str  # normalised (surrounding whitespace removed)
    sha256: str
    size_bytes: int
    height: int  # as displayed, after EXIF rotation
    width: int


def printable(name: str) -> str:
    """A client-chosen name with unprintable characters (NUL, controls) shown as '?'."""
    return "".join(c if c.isprintable() else "?" for c in name)


def display_name(name: str) -> str:
    """A client-chosen name, made safe to quote in a message."""
    shown = printable(name)
    return shown if len(shown) <= MAX_NAME_CHARS else shown[:MAX_NAME_CHARS] + "…"


# --- splits ----------------------------------------------------------------------------------


def check_split(split: str, *, field: str = "split", filename: str | None = None) -> str:
    """`split` if it is one of SPLITS (surrounding whitespace and case aside); 422 otherwise."""
    cleaned = split.strip().lower()
    if cleaned not in SPLITS:
        where = f" of '{display_name(filename)}'" if filename is not None else ""
        raise ApiError(
            422,
            "invalid_split",
            f"{field}: {display_name(split)!r}{where} is not one of {', '.join(SPLITS)}; "
            "train images train, val images are held out to measure the model, test images "
            "only serve evaluations",
            field=field,
            allowed=list(SPLITS),
        )
    return cleaned


# --- multipart -------------------------------------------------------------------------------


def _resolve_list(values: Sequence[str] | None, field: str, code: str) -> list[str]:
    """One value per form field, or one field holding a JSON array of them."""
    if not values:
        return []
    if len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            parsed = json.loads(values[0])
        except json.JSONDecodeError as exc:
            raise ApiError(
                422,
                code,
                f"{field}: a value starting with '[' is read as a JSON array of strings, but it "
                f"is not valid JSON ({exc.msg} at position {exc.pos}); send a valid array or "
                f"one `{field}` field per file",
                field=field,
            ) from exc
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise ApiError(
                422,
                code,
                f"{field}: the JSON value must be an array of strings, one per file",
                field=field,
            )
        return parsed
    return list(values)


def _resolve_labels(labels: Sequence[str] | None) -> list[str]:
    """One label per form field, or one field holding a JSON array of them."""
    return _resolve_list(labels, "labels", "invalid_label")


def _resolve_splits(
    count: int, split: str | None, splits: Sequence[str] | None, filenames: Sequence[str]
) -> list[str]:
    """The split of each of `count` files: from `splits` (one per file), else `split`."""
    per_file = _resolve_list(splits, "splits", "invalid_split")
    if per_file and split is not None:
        raise ApiError(
            422,
            "invalid_upload_form",
            "send either `split` (one split for every file) or `splits` (one per file), not both",
            field="splits",
        )
    if not per_file:
        return [check_split(split or DEFAULT_SPLIT)] * count
    if len(per_file) != count:
        raise ApiError(
            422,
            "splits_mismatch",
            f"splits: got {len(per_file)} split(s) for {count} file(s); send one `splits` form "
            "field per file in the same order (or one JSON array), or one `split` for all",
            field="splits",
            files=count,
            splits=len(per_file),
        )
    return [
        check_split(value, field="splits", filename=name)
        for value, name in zip(per_file, filenames, strict=True)
    ]


def parse_multipart_items(
    files: Sequence[UploadFile],
    labels: Sequence[str] | None,
    settings: Settings | None = None,
    *,
    split: str | None = None,
    splits: Sequence[str] | None = None,
) -> list[UploadItem]:
    """Pair each uploaded file with its label and split (same order); labels and splits
    may be JSON arrays. The split is `splits`' entry, else `split`, else train.

    With `settings`, the labels are checked here too (cheap, before any image is read);
    `create_dataset` checks them in any case.
    """
    if not files:
        raise ApiError(
            422,
            "no_images",
            "no images were sent: send `files` with one `labels` field per file, or an "
            "`archive` zip with one folder per class",
            field="files",
        )
    resolved = _resolve_labels(labels)
    if len(resolved) != len(files):
        raise ApiError(
            422,
            "labels_mismatch",
            f"labels: got {len(resolved)} label(s) for {len(files)} file(s); send one `labels` "
            "form field per file in the same order, or one field holding a JSON array",
            field="labels",
            files=len(files),
            labels=len(resolved),
        )
    names = [upload.filename or f"files[{i}]" for i, upload in enumerate(files)]
    chosen = _resolve_splits(len(files), split, splits, names)
    items = [
        UploadItem(filename=name, label=label, content=upload.file, split=item_split)
        for name, upload, label, item_split in zip(names, files, resolved, chosen, strict=True)
    ]
    if settings is not None:
        for item in items:
            check_label(item.label, settings, filename=item.filename)
    return items


def parse_upload(
    *,
    files: Sequence[UploadFile] | None,
    labels: Sequence[str] | None,
    archive: UploadFile | None,
    settings: Settings,
    split: str | None = None,
    splits: Sequence[str] | None = None,
) -> list[UploadItem]:
    """The items of an upload form: either `files` + `labels` (+ `split` or `splits`), or
    one `archive` (+ `split` for an archive without split folders)."""
    if archive is not None and files:
        raise ApiError(
            422,
            "invalid_upload_form",
            "send either `files` (with `labels`) or one `archive`, not both",
            field="archive",
        )
    if archive is not None:
        if labels:
            raise ApiError(
                422,
                "invalid_upload_form",
                "labels: an archive takes its labels from its folder names; drop `labels`",
                field="labels",
            )
        if splits:
            raise ApiError(
                422,
                "invalid_upload_form",
                "splits: an archive takes its splits from train/, val/ and test/ top folders "
                "(or one `split` for all of it); drop `splits`",
                field="splits",
            )
        return parse_archive(archive, settings, split=split)
    return parse_multipart_items(files or [], labels, settings, split=split, splits=splits)


# --- zip archives ----------------------------------------------------------------------------


def _archive_error(status: int, code: str, archive: str, member: str, problem: str) -> ApiError:
    return ApiError(
        status,
        code,
        f"{archive}: entry '{display_name(member)}' {problem}",
        file=display_name(member),
        archive=archive,
    )


def _check_entry(info: zipfile.ZipInfo, archive: str) -> None:
    """Refuse paths that escape the extraction folder and entries that are not files."""
    name = info.filename.replace("\\", "/")  # Windows archivers write backslashes
    if "\x00" in name or name.startswith("/") or _DRIVE.match(name) or ".." in name.split("/"):
        raise _archive_error(
            422,
            "unsafe_archive_path",
            archive,
            info.filename,
            "has an absolute path or '..'; zip the class folders with relative paths",
        )
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        raise _archive_error(
            422,
            "unsafe_archive_entry",
            archive,
            info.filename,
            "is a symbolic link; zip the image files themselves (e.g. `zip -r` without -y)",
        )
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _archive_error(
            422,
            "unsafe_archive_entry",
            archive,
            info.filename,
            "is a device, pipe or socket; the archive may hold only folders and images",
        )
    if info.flag_bits & 0x1:
        raise _archive_error(
            422, "invalid_archive", archive, info.filename, "is encrypted; zip without a password"
        )


def _parts(info: zipfile.ZipInfo) -> list[str]:
    return [p for p in info.filename.replace("\\", "/").split("/") if p not in ("", ".")]


def _is_junk(parts: list[str]) -> bool:
    return (
        any(p.startswith(".") or p.lower() in JUNK_FOLDERS for p in parts)
        or parts[-1].lower() in JUNK_FILES
    )


def _too_large(archive: str, problem: str) -> ApiError:
    return ApiError(413, "archive_too_large", f"{archive}: {problem}", archive=archive)


def _copy_member(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    archive: str,
    *,
    budget: int,
    total_limit: int,
    max_file: int,
) -> tuple[IO[bytes], int]:
    """Stream one member into a spooled file, stopping at the caps (headers can lie).

    Returns the file and the bytes it holds; `budget` is what the archive may still expand
    to, out of `total_limit`.
    """
    spool: IO[bytes] = SpooledTemporaryFile(max_size=SPOOL_MAX_BYTES)  # noqa: SIM115
    written = 0
    try:
        with zf.open(info) as source:
            while chunk := source.read(CHUNK_BYTES):
                written += len(chunk)
                if written > max_file:
                    raise _archive_error(
                        413,
                        "file_too_large",
                        archive,
                        info.filename,
                        f"is over the per-image limit of {max_file} bytes; downscale or "
                        "recompress it",
                    )
                if written > budget:
                    raise _too_large(
                        archive,
                        f"expands to more than {total_limit} bytes, the most one upload may "
                        "hold; split it into several archives (append with "
                        "POST /v1/datasets/{id}/images)",
                    )
                spool.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        spool.close()
        raise _archive_error(
            422,
            "invalid_archive",
            archive,
            info.filename,
            f"cannot be extracted ({exc}); re-create the zip (deflate or stored) and retry",
        ) from exc
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool, written


def _is_split_folder(parts: list[str]) -> bool:
    """A member below a split folder that holds class folders (train/cats/1.jpg)."""
    return len(parts) >= 3 and parts[0].lower() in SPLITS


def _archive_splits(
    members: list[tuple[zipfile.ZipInfo, list[str]]], archive: str, split: str | None
) -> tuple[list[tuple[zipfile.ZipInfo, list[str]]], list[str]]:
    """The members with any split folder taken off their path, and each member's split.

    Split layout: every top folder is train/, val/ or test/ and holds class folders. A zip
    of plain class folders takes the request's `split` (train by default); a class may
    still be called "test" when its images sit directly inside it.
    """
    in_split = [_is_split_folder(parts) for _, parts in members]
    if not any(in_split):
        return members, [check_split(split or DEFAULT_SPLIT)] * len(members)
    if not all(in_split):
        info, _ = members[in_split.index(False)]
        raise _archive_error(
            422,
            "invalid_archive_layout",
            archive,
            info.filename,
            "is outside the train/, val/ and test/ folders that the archive's other images "
            "use; put every image in split/class/ (train/cats/1.jpg), or zip plain class "
            "folders and send `split`",
        )
    if split is not None:
        raise ApiError(
            422,
            "invalid_upload_form",
            f"{archive}: its top folders already say each image's split; drop `split`",
            field="split",
        )
    return [(info, parts[1:]) for info, parts in members], [
        parts[0].lower() for _, parts in members
    ]


def parse_archive(
    upload: UploadFile | IO[bytes], settings: Settings, *, split: str | None = None
) -> list[UploadItem]:
    """The images of a zip whose top-level folders are the class names, or are train/,
    val/ and test/ folders that hold the class folders.

    One enclosing folder (`photos/cats/1.jpg`) is allowed; hidden files and `__MACOSX`
    are skipped. Sizes in the zip's headers are used for early refusals only: members are
    streamed with caps, since a crafted header can understate what a member expands to.
    Without split folders, every image takes `split` (train when None).
    """
    stream = upload.file if isinstance(upload, UploadFile) else upload
    archive = display_name(
        (upload.filename if isinstance(upload, UploadFile) else None) or "archive"
    )
    stream.seek(0, 2)
    archive_bytes = max(stream.tell(), 1)
    stream.seek(0)
    try:
        zf = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ApiError(
            422,
            "invalid_archive",
            f"{archive}: not a zip archive ({exc}); send a .zip whose top-level folders are "
            "the class names",
            file=archive,
        ) from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > settings.max_zip_members:
            raise _too_large(
                archive,
                f"{len(infos)} entries is over the limit of {settings.max_zip_members}; split "
                "it into several archives (append with POST /v1/datasets/{id}/images)",
            )
        for info in infos:
            _check_entry(info, archive)
        members = [
            (info, parts)
            for info in infos
            if not info.is_dir() and (parts := _parts(info)) and not _is_junk(parts)
        ]
        if not members:
            raise ApiError(
                422,
                "no_images",
                f"{archive}: the archive holds no images; put them in one folder per class",
                file=archive,
            )
        # An archive may expand to as much as loose files could bring in one request, and
        # no more than max_zip_ratio times its own size (images barely compress; a zip
        # bomb expands by thousands).
        total_limit = min(settings.max_upload_bytes, settings.max_zip_ratio * archive_bytes)
        budget = total_limit
        declared = sum(info.file_size for info, _ in members)
        if declared > budget:
            raise _too_large(
                archive,
                f"declares {declared} bytes uncompressed from {archive_bytes} compressed, over "
                f"the limit of {total_limit} (at most {settings.max_upload_bytes} bytes and "
                f"{settings.max_zip_ratio}x the archive's size); split it or send loose files",
            )
        # One enclosing folder is tolerated: strip it when every image sits below it
        # (unless that folder is itself a split folder: val/cats/1.jpg is a split layout).
        roots = {parts[0] for _, parts in members}
        if (
            len(roots) == 1
            and all(len(parts) >= 3 for _, parts in members)
            and not all(_is_split_folder(parts) for _, parts in members)
        ):
            members = [(info, parts[1:]) for info, parts in members]
        members, member_splits = _archive_splits(members, archive, split)
        for info, parts in members:
            if len(parts) < 2:
                raise _archive_error(
                    422,
                    "invalid_archive_layout",
                    archive,
                    info.filename,
                    "is not inside a class folder; put each image in a folder named after "
                    "its class (cats/1.jpg, dogs/2.jpg)",
                )
            if info.file_size > settings.max_image_bytes:  # early; streaming checks again
                raise _archive_error(
                    413,
                    "file_too_large",
                    archive,
                    info.filename,
                    f"is over the per-image limit of {settings.max_image_bytes} bytes; "
                    "downscale or recompress it",
                )
        items: list[UploadItem] = []
        try:
            for (info, parts), member_split in zip(members, member_splits, strict=True):
                spool, size = _copy_member(
                    zf,
                    info,
                    archive,
                    budget=budget,
                    total_limit=total_limit,
                    max_file=settings.max_image_bytes,
                )
                budget -= size
                items.append(
                    UploadItem(
                        filename=info.filename, label=parts[0], content=spool, split=member_split
                    )
                )
        except BaseException:
            for item in items:
                if not isinstance(item.content, bytes):
                    item.content.close()
            raise
        return items


# --- checks ----------------------------------------------------------------------------------


def check_label(label: str, settings: Settings, *, filename: str) -> str:
    """The label with surrounding whitespace removed; refused if empty, long or unprintable."""
    cleaned = label.strip()
    where = f"label {display_name(label)!r} of '{display_name(filename)}'"
    problem = None
    if not cleaned:
        problem = f"label of '{display_name(filename)}' is empty; give every image a class name"
    elif len(cleaned) > settings.max_label_chars:
        problem = (
            f"{where} has {len(cleaned)} characters, over the limit of "
            f"{settings.max_label_chars}; use a shorter class name"
        )
    elif any(unicodedata.category(c)[0] == "C" or c in "\u2028\u2029" for c in cleaned):
        problem = f"{where} contains control or invisible characters; use printable text"
    if problem is not None:
        raise ApiError(422, "invalid_label", problem, field="labels", file=display_name(filename))
    return cleaned


def check_dataset_name(name: str) -> str:
    """The dataset's name, refused if it holds control characters (PostgreSQL stores no NUL)."""
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise ApiError(
            422,
            "invalid_name",
            f"name {display_name(name)!r} contains control characters (such as NUL or a line "
            "break); use printable text",
            field="name",
        )
    return name


def check_image(item: UploadItem, settings: Settings) -> CheckedImage:
    """Read the item with a byte cap and decode it fully; the label is checked too."""
    label = check_label(item.label, settings, filename=item.filename)
    name = display_name(item.filename)
    data = item.read(limit=settings.max_image_bytes)
    if len(data) > settings.max_image_bytes:
        raise ApiError(
            413,
            "file_too_large",
            f"{name}: over the per-image limit of {settings.max_image_bytes} bytes; downscale "
            "or recompress it",
            file=name,
        )
    if not data:
        raise ApiError(422, "invalid_image", f"{name}: the file is empty", file=name)
    try:
        # Decoded, so a truncated file fails here, not in a job. A JPEG at the smallest
        # scale (1/8): every block is still entropy-decoded (benchmarks/decode_speed.py).
        open_image(data, name=name, max_pixels=settings.max_image_pixels, min_side=1).close()
        height, width = image_size(data, name=name, max_pixels=settings.max_image_pixels)
    except ImageDecodeError as exc:
        status = 413 if exc.code == "image_too_large" else 422
        code = exc.code if exc.code == "image_too_large" else "invalid_image"
        raise ApiError(status, code, str(exc), file=name) from exc
    return CheckedImage(
        item=item,
        label=label,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        height=height,
        width=width,
    )


def check_items(items: Sequence[UploadItem], settings: Settings) -> list[CheckedImage]:
    """Check every label first (cheap), then every image; the first problem is raised."""
    if not items:
        raise ApiError(422, "no_images", "no images were sent", field="files")
    for item in items:
        check_label(item.label, settings, filename=item.filename)
    return [check_image(item, settings) for item in items]


def archive_stem(archive: UploadFile | None) -> str:
    """A default dataset name: the archive's file name without its extension."""
    if archive is None or not archive.filename:
        return ""
    return PurePosixPath(archive.filename.replace("\\", "/")).stem[:256]
