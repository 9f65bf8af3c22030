"""A webhook endpoint on loopback that records every POST it receives (body and headers),
answers the status codes it is told to, and can hold a request until it is released."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from service.webhooks.signature import EVENT_ID_HEADER, SIGNATURE_HEADER


@dataclass(frozen=True)
class Delivery:
    body: bytes
    headers: dict[str, str]

    @property
    def payload(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    @property
    def signature(self) -> str:
        return self.headers.get(SIGNATURE_HEADER, "")

    @property
    def event_id(self) -> str:
        return self.headers.get(EVENT_ID_HEADER, "")


@dataclass
class Receiver:
    """`answers`: the status codes of the first POSTs, in order (then 204). `hold`: each
    POST waits for `release` before it is answered (`arrived` is set when one waits)."""

    url: str = ""
    answers: list[int] = field(default_factory=list)
    location: str = ""  # the Location of a 3xx answer
    hold: bool = False
    received: list[Delivery] = field(default_factory=list)
    connections: int = 0  # TCP connections accepted, whether or not a request followed
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@contextmanager
def webhook_receiver(
    host: str = "127.0.0.1",
    *,
    answers: Sequence[int] = (),
    location: str = "",
    hold: bool = False,
    port: int = 0,
) -> Iterator[Receiver]:
    """A receiver listening on `host` (a free port unless `port`), stopped on exit."""
    receiver = Receiver(answers=list(answers), location=location, hold=hold)
    lock = threading.Lock()

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                receiver.received.append(Delivery(body, dict(self.headers.items())))
                code = receiver.answers.pop(0) if receiver.answers else 204
            if receiver.hold:
                receiver.arrived.set()
                receiver.release.wait(timeout=60)
            self.send_response(code)
            if 300 <= code < 400:
                self.send_header("Location", receiver.location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def verify_request(self, request: Any, client_address: Any) -> bool:
            with lock:
                receiver.connections += 1
            return True

    server = Server((host, port), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    receiver.url = f"http://{host}:{server.server_port}/hook"
    try:
        yield receiver
    finally:
        receiver.release.set()
        server.shutdown()
        server.server_close()
