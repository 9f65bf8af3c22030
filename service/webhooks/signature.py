"""Webhook signatures, as Stripe signs them: a timestamp and an HMAC-SHA256 over
`f"{t}.{body}"`, so a captured request cannot be replayed once it is older than the
receiver's tolerance, and the body cannot be changed without the secret.

    X-BiT-Signature: t=1735689600,v1=<hex>[,v1=<hex>]

During a secret rotation every request carries one `v1` per secret (the current and the
previous one), so a receiver that knows either accepts it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence

SIGNATURE_HEADER = "X-BiT-Signature"
EVENT_ID_HEADER = "X-BiT-Webhook-Id"
EVENT_TYPE_HEADER = "X-BiT-Event"
SCHEME = "v1"
# A receiver's default window: wide enough for clock skew and a slow network, narrow
# enough that a captured request is useless soon after.
DEFAULT_TOLERANCE_S = 300


def digest(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of `{timestamp}.{body}` under `secret`."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secrets: Sequence[str], body: bytes, *, timestamp: int | None = None) -> str:
    """The signature header's value: `t=<unix>` and one `v1=` per (non-empty) secret."""
    t = int(time.time()) if timestamp is None else timestamp
    parts = [f"t={t}"] + [f"{SCHEME}={digest(s, t, body)}" for s in secrets if s]
    return ",".join(parts)


def verify(
    secrets: Sequence[str],
    header: str,
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True if `header` signs `body` with one of `secrets` and its timestamp is within
    `tolerance_s` of `now`. Compares in constant time (hmac.compare_digest)."""
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == SCHEME:
            signatures.append(value)
    if timestamp is None or not signatures:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False  # stale, or a replay of an old request
    expected = [digest(s, timestamp, body) for s in secrets if s]
    # Every pair is compared (no early exit) so the time taken says nothing about which.
    matches = [hmac.compare_digest(e, got) for e in expected for got in signatures]
    return any(matches)
