"""Weights directory: pull over HTTP (resume, offline, bad answers), import, index, verify.

Downloads come from an http.server on 127.0.0.1 serving a small random-weight R14x0.5
checkpoint; the official name's architecture is patched to R14x0.5 so `pull` accepts it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from bit_core import create_model, registry, save_bit_npz
from bit_core.npz import CheckpointError
from bit_core.registry import OfficialModel
from bit_core.weights import (
    WeightsDownloadError,
    WeightsIntegrityError,
    default_weights_dir,
    find,
    import_file,
    infer_npz_architecture,
    list_installed,
    pull,
    verify,
)

NAME = "BiT-S-R50x1"
SMALL = "R14x0.5"
CLASSES = 7


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official-format R14x0.5 npz with random weights (a zero head would hide bugs)."""
    torch.manual_seed(0)
    model = create_model(SMALL, CLASSES)
    with torch.no_grad():
        for param in model.parameters():
            torch.nn.init.normal_(param)
    path = tmp_path_factory.mktemp("source") / "small.npz"
    save_bit_npz(model, path)
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's own settings must not leak in; a proxy would swallow 127.0.0.1.
    for var in ("BIT_WEIGHTS_DIR", "BIT_HOME", "http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def small_official(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make NAME an official R14x0.5 so that the served small file passes the arch check."""
    monkeypatch.setitem(
        registry.OFFICIAL_MODELS, NAME, OfficialModel(NAME, SMALL, "ILSVRC-2012", CLASSES)
    )


class _Server(ThreadingHTTPServer):
    files: dict[str, bytes]
    range_headers: list[str | None]  # the Range header of every request, in order
    drop_after: int | None  # cut the next response's body after this many bytes
    ignore_range: bool  # answer 200 with the whole file, as some servers do


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        server = self.server
        range_header = self.headers.get("Range")
        server.range_headers.append(range_header)
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if range_header is not None and not server.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", range_header)
            assert match is not None, range_header
            start = int(match[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.drop_after is not None:
            cut, server.drop_after = server.drop_after, None
            body = body[:cut]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server(checkpoint: Path) -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.files = {"/small.npz": checkpoint.read_bytes(), "/notes.txt": b"not weights\n"}
    httpd.range_headers = []
    httpd.drop_after = None
    httpd.ignore_range = False
    # A short poll interval: shutdown() waits for the loop's next poll.
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _url(server: _Server, path: str = "/small.npz") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- pull -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("small_official")
def test_pull_downloads_validates_and_indexes(
    server: _Server, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = checkpoint.read_bytes()
    entry = pull(NAME, tmp_path, url=_url(server), progress=True)

    assert entry.path == tmp_path / f"{NAME}.npz"
    assert entry.path.read_bytes() == source
    assert entry.sha256 == _sha256(entry.path.read_bytes()) == _sha256(source)
    assert (entry.arch, entry.num_classes, entry.size_bytes) == (SMALL, CLASSES, len(source))
    assert entry.source == _url(server)
    installed_at = datetime.datetime.fromisoformat(entry.installed_at)
    assert installed_at.utcoffset() == datetime.timedelta(0)
    assert not (tmp_path / f"{NAME}.npz.partial").exists()
    assert server.range_headers == [None]  # a fresh download asks for the whole file

    index = json.loads((tmp_path / "index.json").read_text())
    assert [record["name"] for record in index["entries"]] == [NAME]
    assert index["entries"][0]["sha256"] == _sha256(source)
    assert "directory" not in index["entries"][0]  # paths stay relative: the dir can move
    assert find(NAME, tmp_path) == entry
    assert list_installed(tmp_path) == [entry]
    verify(entry)
    assert NAME in capsys.readouterr().err  # the tqdm bar, labelled with the name


@pytest.mark.usefixtures("small_official")
def test_pull_of_an_installed_entry_does_not_download_again(
    server: _Server, tmp_path: Path
) -> None:
    first = pull(NAME, tmp_path, url=_url(server), progress=False)
    again = pull(NAME, tmp_path, url=_url(server), progress=False)
    assert again == first
    assert len(server.range_headers) == 1


@pytest.mark.usefixtures("small_official")
def test_interrupted_download_resumes_with_a_range_request(
    server: _Server, checkpoint: Path, tmp_path: Path
) -> None:
    source = checkpoint.read_bytes()
    cut = len(source) // 3
    server.drop_after = cut
    partial = tmp_path / f"{NAME}.npz.partial"

    with pytest.raises(WeightsDownloadError, match=f"after {cut} of {len(source)} bytes"):
        pull(NAME, tmp_path, url=_url(server), progress=False)
    assert partial.read_bytes() == source[:cut]
    assert find(NAME, tmp_path) is None

    entry = pull(NAME, tmp_path, url=_url(server), progress=False)
    assert server.range_headers == [None, f"bytes={cut}-"]
    assert entry.path.read_bytes() == source
    assert entry.sha256 == _sha256(source)
    assert not partial.exists()


@pytest.mark.usefixtures("small_official")
def test_server_ignoring_range_restarts_from_zero(
    server: _Server, checkpoint: Path, tmp_path: Path
) -> None:
    # Stale bytes that do not belong to the file: appending the 200 body to them would
    # give a corrupt result, so they must be discarded.
    (tmp_path / f"{NAME}.npz.partial").write_bytes(b"stale" * 100)
    server.ignore_range = True

    entry = pull(NAME, tmp_path, url=_url(server), progress=False)
    assert server.range_headers == ["bytes=500-"]
    assert entry.path.read_bytes() == checkpoint.read_bytes()


@pytest.mark.usefixtures("small_official")
def test_partial_already_complete_is_finished_on_416(
    server: _Server, checkpoint: Path, tmp_path: Path
) -> None:
    source = checkpoint.read_bytes()
    (tmp_path / f"{NAME}.npz.partial").write_bytes(source)

    entry = pull(NAME, tmp_path, url=_url(server), progress=False)
    assert server.range_headers == [f"bytes={len(source)}-"]
    assert entry.sha256 == _sha256(source)


def test_offline_gives_download_error_with_import_hint(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{NAME}.npz"

    with pytest.raises(WeightsDownloadError) as caught:
        pull(NAME, tmp_path, url=url, progress=False)
    message = str(caught.value)
    assert isinstance(caught.value, RuntimeError)
    assert "failed: cannot reach the server" in message and "refused" in message
    assert f"`bit weights import FILE --name {NAME}`" in message
    assert url in message and "partial" in message
    assert find(NAME, tmp_path) is None


def test_silent_server_times_out(tmp_path: Path) -> None:
    # The kernel accepts the connection (backlog) but nobody ever answers.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.npz"
        with pytest.raises(WeightsDownloadError, match=r"no answer within 0\.2 s"):
            pull(NAME, tmp_path, url=url, progress=False, timeout=0.2)


def test_http_error_status_gives_download_error(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(WeightsDownloadError, match="HTTP 404"):
        pull(NAME, tmp_path, url=_url(server, "/missing.npz"), progress=False)


def test_download_of_wrong_architecture_is_rejected_and_deleted(
    server: _Server, tmp_path: Path
) -> None:
    # NAME is still the official R50x1 here, the server has an R14x0.5.
    with pytest.raises(CheckpointError, match=f"holds a {re.escape(SMALL)}, expected R50x1"):
        pull(NAME, tmp_path, url=_url(server), progress=False)
    assert not (tmp_path / f"{NAME}.npz.partial").exists()
    assert not (tmp_path / f"{NAME}.npz").exists()
    assert list_installed(tmp_path) == []


def test_download_of_a_non_npz_is_rejected(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"not a readable BiT \.npz"):
        pull(NAME, tmp_path, url=_url(server, "/notes.txt"), progress=False)
    assert list_installed(tmp_path) == []


def test_pull_of_unknown_name_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown official model 'BiT-X-R9'") as caught:
        pull("BiT-X-R9", tmp_path, progress=False)
    assert "BiT-M-R50x1" in str(caught.value)
    assert not tmp_path.joinpath("index.json").exists()


# --- import -----------------------------------------------------------------------------------


def test_import_copies_and_infers_architecture(checkpoint: Path, tmp_path: Path) -> None:
    entry = import_file(checkpoint, tmp_path / "weights")

    assert (entry.name, entry.arch, entry.num_classes) == ("small", SMALL, CLASSES)
    assert entry.path == tmp_path / "weights" / "small.npz"
    assert entry.path.read_bytes() == checkpoint.read_bytes()
    assert entry.sha256 == _sha256(checkpoint.read_bytes())
    assert entry.source == str(checkpoint.resolve())
    assert list_installed(tmp_path / "weights") == [entry]
    verify(entry)


def test_import_under_the_same_name_replaces_the_entry(checkpoint: Path, tmp_path: Path) -> None:
    import_file(checkpoint, tmp_path, name="base")
    second = import_file(checkpoint, tmp_path, name="base")
    other = import_file(checkpoint, tmp_path, name="other")
    assert list_installed(tmp_path) == [second, other]


@pytest.mark.parametrize(
    "content",
    [b"", b"plain text, not an npz\n", b"PK\x03\x04truncated zip"],
    ids=["empty", "text", "broken-zip"],
)
def test_import_of_a_non_npz_names_the_file(content: bytes, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.npz"
    bogus.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(str(bogus))):
        import_file(bogus, tmp_path / "weights")
    assert not (tmp_path / "weights").exists()


def test_import_of_a_truncated_checkpoint_fails(checkpoint: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(checkpoint.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"truncated\.npz"):
        import_file(truncated, tmp_path / "weights")


def test_import_detects_corrupt_data_by_crc(checkpoint: Path, tmp_path: Path) -> None:
    # Flip one byte inside the largest member's data: headers still parse, the CRC does not.
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        import_file(corrupt, tmp_path / "weights")


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "with space", "a\\b"])
def test_import_refuses_names_that_are_not_plain_file_names(
    name: str, checkpoint: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="invalid weights name"):
        import_file(checkpoint, tmp_path / "weights", name=name)
    assert not (tmp_path / "weights").exists()


def test_import_under_an_official_name_checks_the_architecture(
    checkpoint: Path, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match="official R50x1"):
        import_file(checkpoint, tmp_path, name="BiT-M-R50x1")


def test_import_of_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        import_file(tmp_path / "nope.npz", tmp_path)


# --- infer_npz_architecture -------------------------------------------------------------------


def _arrays(checkpoint: Path) -> dict[str, np.ndarray]:
    with np.load(checkpoint) as archive:
        return {key: archive[key] for key in archive.files}


def test_infer_without_head_reports_zero_classes(checkpoint: Path, tmp_path: Path) -> None:
    arrays = {k: v for k, v in _arrays(checkpoint).items() if not k.startswith("resnet/head/")}
    headless = tmp_path / "headless.npz"
    np.savez(headless, **arrays)
    assert infer_npz_architecture(headless) == (SMALL, 0)


def test_infer_rejects_unknown_root_width(checkpoint: Path, tmp_path: Path) -> None:
    arrays = _arrays(checkpoint)
    arrays["resnet/root_block/standardized_conv2d/kernel"] = np.zeros((7, 7, 3, 48), np.float32)
    odd = tmp_path / "odd.npz"
    np.savez(odd, **arrays)
    with pytest.raises(CheckpointError, match=r"no known architecture.*48-channel root"):
        infer_npz_architecture(odd)


def test_infer_rejects_an_npz_that_is_not_bit(tmp_path: Path) -> None:
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a BiT checkpoint"):
        infer_npz_architecture(other)


# --- index, verify, directory -----------------------------------------------------------------


def test_verify_detects_a_changed_or_missing_file(checkpoint: Path, tmp_path: Path) -> None:
    entry = import_file(checkpoint, tmp_path)
    data = bytearray(entry.path.read_bytes())
    data[-1] ^= 0xFF
    entry.path.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="sha256"):
        verify(entry)
    entry.path.unlink()
    with pytest.raises(WeightsIntegrityError, match="missing"):
        verify(entry)


def test_corrupt_index_is_reported_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "index.json"))):
        list_installed(tmp_path)


def test_empty_directory_has_nothing_installed(tmp_path: Path) -> None:
    assert list_installed(tmp_path / "absent") == []
    assert find(NAME, tmp_path / "absent") is None


def test_default_weights_dir_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert default_weights_dir() == Path(".bit") / "weights"
    monkeypatch.setenv("BIT_HOME", str(tmp_path / "home"))
    assert default_weights_dir() == tmp_path / "home" / "weights"
    monkeypatch.setenv("BIT_WEIGHTS_DIR", str(tmp_path / "explicit"))
    assert default_weights_dir() == tmp_path / "explicit"


def test_functions_use_the_default_directory(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BIT_WEIGHTS_DIR", str(tmp_path))
    entry = import_file(checkpoint)
    assert entry.directory == tmp_path
    assert find("small") == entry
