"""A webhook endpoint on loopback that records every signed POST it receives."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from worker.webhook import SIGNATURE_HEADER


@dataclass(frozen=True)
class Delivery:
    body: bytes
    signature: str

    @property
    def payload(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@contextmanager
def webhook_receiver() -> Iterator[tuple[str, list[Delivery]]]:
    """(url, deliveries so far); answers 204 to every POST."""
    received: list[Delivery] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(Delivery(body, self.headers[SIGNATURE_HEADER]))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", received
    finally:
        server.shutdown()
        server.server_close()
