"""Every refused upload through the real app (SQLite and PostgreSQL): the status, the stable
code, a message naming the file or field, and nothing left behind. Then the parsing and the
upload-limit middleware on their own."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from starlette.types import Message, Receive, Scope, Send

from service.datasets.uploads import UploadItem, check_image, parse_archive
from service.errors import ApiError
from service.settings import Settings
from service.upload_limit import UploadLimitMiddleware
from tests.factories import make_zip, png, png_claiming, symlink_entry, two_classes, zip_with
from tests.service.conftest import SMALL_LIMITS, snapshot, upload, upload_zip


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The conftest's migrated settings (both databases) with small upload limits."""
    return settings.model_copy(update=SMALL_LIMITS)


def expect_refused(
    response: Any, settings: Settings, before: object, status: int, code: str, *names: str
) -> dict[str, Any]:
    """Assert the error answer, that the message names what was wrong, and no leftovers."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    for name in names:
        assert name in error["message"], (name, error["message"])
    assert snapshot(settings) == before
    return error


# --- loose files -----------------------------------------------------------------------------

TRUNCATED_PNG = png(64, 64)[:200]


def truncated_jpeg() -> bytes:
    """Half of a noise JPEG: checked at 1/8 scale, its missing blocks must still fail it."""
    buffer = io.BytesIO()
    PILImage.frombytes("RGB", (96, 96), bytes(range(256)) * 108).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


BAD_IMAGES = {
    "text": ("notes.txt", b"just some text\n"),
    "svg": ("logo.png", b'<svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>'),
    "html": ("page.jpg", b"<!doctype html><html><body><img src=x></body></html>"),
    "truncated": ("cut.png", TRUNCATED_PNG),
    "truncated jpeg": ("cut.jpg", truncated_jpeg()),
    "empty": ("empty.png", b""),
}


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_non_images_and_corrupt_files_are_refused(
    kind: str, client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    name, data = BAD_IMAGES[kind]
    before = snapshot(settings)
    response = upload(client, user_headers, [*two_classes(), (name, data, "cat")])
    error = expect_refused(response, settings, before, 422, "invalid_image", name)
    assert error["file"] == name


def test_pixel_bomb_is_refused_before_decoding(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    before = snapshot(settings)
    bomb = ("huge.png", png_claiming(50_000, 50_000), "cat")
    response = upload(client, user_headers, [*two_classes(), bomb])
    expect_refused(response, settings, before, 413, "image_too_large", "huge.png")


def test_file_over_the_per_image_limit_is_refused(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    before = snapshot(settings)
    big = png(120, 120)  # noise does not compress: ~43 KB, over the 32 KiB limit
    response = upload(client, user_headers, [*two_classes(), ("big.png", big, "dog")])
    expect_refused(response, settings, before, 413, "file_too_large", "big.png", "32768")


def test_request_over_the_upload_limit_is_refused(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    before = snapshot(settings)
    images = [(f"{i}.png", png(40, 40), "cat") for i in range(60)]  # ~5 KB each, ~300 KB
    response = upload(client, user_headers, images)
    error = expect_refused(response, settings, before, 413, "upload_too_large", "262144")
    assert error["limit_bytes"] == 262144


def test_chunked_request_over_the_upload_limit_is_refused(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    """No Content-Length: the body is counted as it arrives."""
    before = snapshot(settings)
    boundary = "b0undary"
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:
        yield part
        for _ in range(40):
            yield b"\0" * 8192

    response = client.post(
        "/v1/datasets",
        content=body(),
        headers={**user_headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert "content-length" not in response.request.headers
    expect_refused(response, settings, before, 413, "upload_too_large")


@pytest.mark.parametrize(
    ("labels", "names"),
    [
        (["cat", "cat", "dog"], ["3 label(s) for 4 file(s)"]),
        ([], ["0 label(s) for 4 file(s)"]),
        (['["cat", "cat", "dog"]'], ["3 label(s) for 4 file(s)"]),
    ],
    ids=["fewer", "missing", "short-json"],
)
def test_labels_not_matching_the_files_are_refused(
    labels: list[str],
    names: list[str],
    client: TestClient,
    user_headers: dict[str, str],
    settings: Settings,
) -> None:
    before = snapshot(settings)
    files = [("files", (name, data, "image/png")) for name, data, _ in two_classes()]
    response = client.post(
        "/v1/datasets", files=files, data={"labels": labels}, headers=user_headers
    )
    error = expect_refused(response, settings, before, 422, "labels_mismatch", "labels", *names)
    assert error["field"] == "labels"


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("   ", "is empty"),
        ("x" * 21, "over the limit of 20"),
        ("cat\x07", "control"),
        ("a\u200bb", "invisible"),
        ('["unclosed', "not valid JSON"),
    ],
    ids=["empty", "too-long", "control", "zero-width", "bad-json"],
)
def test_invalid_labels_are_refused(
    label: str,
    expected: str,
    client: TestClient,
    user_headers: dict[str, str],
    settings: Settings,
) -> None:
    before = snapshot(settings)
    response = upload(client, user_headers, [("odd.png", png(), label)])
    error = expect_refused(response, settings, before, 422, "invalid_label", expected)
    assert error["field"] == "labels"
    if expected != "not valid JSON":
        assert "odd.png" in error["message"]


def test_too_many_classes_are_refused(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    before = snapshot(settings)
    images = [(f"{c}{i}.png", png(), c) for c in "abcd" for i in range(2)]
    response = upload(client, user_headers, images)
    expect_refused(response, settings, before, 422, "too_many_classes", "4 classes", "3")


def test_classes_with_too_few_images_are_named(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    before = snapshot(settings)
    image = png()
    # The copy does not count: classes are counted after duplicates are dropped.
    images = [("c1.png", png(), "cat"), ("c2.png", png(), "cat"), ("o.png", png(), "owl")]
    images += [("e1.png", image, "emu"), ("e1-copy.png", image, "emu")]
    response = upload(client, user_headers, images)
    error = expect_refused(
        response, settings, before, 422, "too_few_images", "'emu' (1)", "'owl' (1)", "2"
    )
    assert error["classes"] == ["emu", "owl"] and error["minimum"] == 2


def test_one_image_under_two_labels_is_refused(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    before = snapshot(settings)
    image = png()
    images = [*two_classes(), ("a.png", image, "cat"), ("b.png", image, "dog")]
    response = upload(client, user_headers, images)
    expect_refused(response, settings, before, 422, "conflicting_labels", "a.png", "b.png")


def test_nothing_or_both_forms_are_refused(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    before = snapshot(settings)
    response = client.post("/v1/datasets", data={"name": "x"}, headers=user_headers)
    expect_refused(response, settings, before, 422, "no_images", "files", "archive")
    files = [
        ("files", ("a.png", png(), "image/png")),
        ("archive", ("pets.zip", make_zip({"cat/1.png": png()}), "application/zip")),
    ]
    response = client.post(
        "/v1/datasets", files=files, data={"labels": ["cat"]}, headers=user_headers
    )
    expect_refused(response, settings, before, 422, "invalid_upload_form", "archive")


def test_a_refused_append_leaves_the_dataset_as_it_was(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    dataset_id = upload(client, user_headers, two_classes()).json()["id"]
    before = snapshot(settings)
    response = upload(
        client,
        user_headers,
        [("ok.png", png(), "cat"), ("bad.png", b"GIF89a-not-really", "cat")],
        url=f"/v1/datasets/{dataset_id}/images",
    )
    expect_refused(response, settings, before, 422, "invalid_image", "bad.png")


# --- archives --------------------------------------------------------------------------------


def test_not_a_zip_is_refused(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    before = snapshot(settings)
    response = upload_zip(client, user_headers, png(), filename="pets.zip")
    expect_refused(response, settings, before, 422, "invalid_archive", "pets.zip", "not a zip")


@pytest.mark.parametrize("name", ["../cats/evil.png", "/etc/cats/x.png", "cats/..\\..\\x.png"])
def test_zip_slip_and_absolute_paths_are_refused(
    name: str, client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    before = snapshot(settings)
    archive = make_zip({"cats/1.png": png(), "cats/2.png": png(), name: png()})
    response = upload_zip(client, user_headers, archive)
    error = expect_refused(response, settings, before, 422, "unsafe_archive_path", name)
    assert error["file"] == name


def test_symlinks_in_a_zip_are_refused(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    before = snapshot(settings)
    archive = zip_with(
        symlink_entry("cats/link.png"), b"/etc/passwd", {"cats/1.png": png(), "cats/2.png": png()}
    )
    response = upload_zip(client, user_headers, archive)
    expect_refused(
        response, settings, before, 422, "unsafe_archive_entry", "cats/link.png", "symbolic link"
    )


def test_zip_with_too_many_members_is_refused(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    before = snapshot(settings)
    archive = make_zip({f"cats/{i}.png": b"x" for i in range(31)})
    response = upload_zip(client, user_headers, archive)
    expect_refused(response, settings, before, 413, "archive_too_large", "31 entries", "30")


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        # One member of 10 MB zeros in a 10 KB zip: over the upload limit once inflated.
        ({"cats/bomb.bmp": b"\0" * 10_000_000}, "262144 bytes"),
        # Members each under the per-image limit, but the zip expands over 200x its size.
        ({f"cats/{i}.bmp": b"\0" * 31_000 for i in range(8)}, "200x"),
    ],
    ids=["huge-member", "ratio"],
)
def test_zip_bombs_are_refused(
    members: dict[str, bytes],
    expected: str,
    client: TestClient,
    user_headers: dict[str, str],
    settings: Settings,
) -> None:
    before = snapshot(settings)
    response = upload_zip(client, user_headers, make_zip(members))
    expect_refused(response, settings, before, 413, "archive_too_large", "pets.zip", expected)


def test_images_outside_class_folders_are_refused(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    before = snapshot(settings)
    archive = make_zip({"cats/1.png": png(), "cats/2.png": png(), "stray.png": png()})
    response = upload_zip(client, user_headers, archive)
    expect_refused(response, settings, before, 422, "invalid_archive_layout", "stray.png")


def test_zip_without_images_is_refused(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    before = snapshot(settings)
    archive = make_zip({"__MACOSX/._x": b"junk", ".hidden/x.png": png()})
    response = upload_zip(client, user_headers, archive)
    expect_refused(response, settings, before, 422, "no_images", "pets.zip")


def test_bad_images_inside_a_zip_are_named_by_their_path(
    client: TestClient, user_headers: dict[str, str], settings: Settings
) -> None:
    before = snapshot(settings)
    archive = make_zip({"cats/1.png": png(), "cats/2.png": png(), "dogs/readme.txt": b"hi"})
    response = upload_zip(client, user_headers, archive)
    expect_refused(response, settings, before, 422, "invalid_image", "dogs/readme.txt")
    archive = make_zip({"cats/1.png": png(), "cats/2.png": png(), "dogs/big.png": png(120, 120)})
    response = upload_zip(client, user_headers, archive)
    expect_refused(response, settings, before, 413, "file_too_large", "dogs/big.png")


# --- parsing and checks on their own ---------------------------------------------------------


def test_zip_headers_understating_a_member_do_not_get_past_the_checks() -> None:
    """A member whose headers claim 1 KB but which inflates to 200 KB."""
    settings = Settings(**SMALL_LIMITS)  # type: ignore[arg-type]
    data = bytearray(make_zip({"cats/a.bmp": b"\0" * 200_000}))
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(signature) + offset  # the uncompressed-size field of each header
        data[at : at + 4] = struct.pack("<I", 1000)
    with pytest.raises(ApiError) as caught:
        parse_archive(io.BytesIO(bytes(data)), settings)
    assert caught.value.code == "invalid_archive"
    assert "cats/a.bmp" in caught.value.message


def test_sizes_are_recorded_as_displayed_after_exif_rotation() -> None:
    buffer = io.BytesIO()
    exif = PILImage.Exif()
    exif[0x0112] = 6  # rotate 90°: stored 30 wide x 20 high, shown 20 wide x 30 high
    PILImage.new("RGB", (30, 20), (200, 10, 10)).save(buffer, "JPEG", exif=exif.tobytes())
    checked = check_image(
        UploadItem(filename="phone.jpg", label=" cat ", content=buffer.getvalue()),
        Settings(),
    )
    assert (checked.height, checked.width) == (30, 20)
    assert checked.label == "cat"  # surrounding whitespace is dropped
    assert checked.size_bytes == len(buffer.getvalue())


# --- the upload-limit middleware -------------------------------------------------------------


async def _reading_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body, then answers 200; re-raises whatever receive raises."""
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _call(
    headers: list[tuple[bytes, bytes]], chunks: int, chunk: bytes = b"x" * 10
) -> tuple[list[Message], int]:
    """Run the middleware (limit 25 bytes) over a body of `chunks` chunks; (sent, read)."""
    sent: list[Message] = []
    read = 0

    async def receive() -> Message:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": chunk, "more_body": read < chunks}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    await UploadLimitMiddleware(_reading_app, max_bytes=25)(scope, receive, send)
    return sent, read


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "chunks", "status", "max_read"),
    [
        ([], 2, 200, 2),  # under the limit
        ([(b"content-length", b"1000")], 100, 413, 0),  # declared too large: nothing read
        ([], 100, 413, 3),  # chunked: cut off at the chunk that passes the limit
        ([(b"content-length", b"20")], 100, 413, 3),  # a lying Content-Length
    ],
    ids=["small", "declared", "chunked", "lying"],
)
async def test_middleware_stops_reading_at_the_limit(
    headers: list[tuple[bytes, bytes]], chunks: int, status: int, max_read: int
) -> None:
    sent, read = await _call(headers, chunks)
    assert sent[0]["status"] == status
    assert read <= max_read
    if status == 413:
        assert b"upload_too_large" in sent[1]["body"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
