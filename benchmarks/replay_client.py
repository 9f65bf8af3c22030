"""A lean HTTP/1.1 load client: replays one prepared request over keep-alive connections.

httpx spends about 2.5 ms of CPU on each multipart predict on a 2-core machine. In a load
generator that shares the cores with the server under test, that time shows up as
service latency and steals CPU from the server. This client encodes the request once
(with httpx, so the bytes are exactly what httpx would send) and then only writes those
bytes and reads the answer: its status line, Content-Length and body.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

HEAD_LIMIT = 64 * 1024  # answers from the API have small headers


class ReplayError(Exception):
    """The server closed the connection or sent something this client does not read."""


def encode(request: httpx.Request) -> bytes:
    """The request as HTTP/1.1 bytes on the wire, body included."""
    body = request.read()
    target = request.url.raw_path.decode("ascii")
    head = [f"{request.method} {target} HTTP/1.1"]
    head += [f"{name}: {value}" for name, value in request.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]  # names and values lowercased


class ReplayConnection:
    """One keep-alive connection to `base_url`; reconnects when the server closes it."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def send(self, raw: bytes) -> Answer:
        """Send one encoded request and read its answer."""
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port, limit=HEAD_LIMIT)
        reader, writer = self._streams
        try:
            writer.write(raw)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status, headers = _parse_head(head)
            body = await reader.readexactly(int(headers["content-length"]))
        except ReplayError:
            await self.close()
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            await self.close()
            raise ReplayError(f"{type(exc).__name__}: {exc}") from exc
        if headers.get("connection") == "close":
            await self.close()
        return Answer(status, body, headers)

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            with contextlib.suppress(OSError):  # already reset by the server
                await writer.wait_closed()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """(status, headers); the headers hold a Content-Length."""
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError) as exc:
        raise ReplayError(f"not an HTTP status line: {lines[0]!r}") from exc
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    if "content-length" not in headers:
        raise ReplayError("answer without Content-Length (chunked bodies are not read)")
    return status, headers
