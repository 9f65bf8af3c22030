"""Date-times as the API documents them: RFC 3339 text with a time zone, and nothing else.

Pydantic also reads a number as a Unix time and a bare date as midnight, so a query such as
`until=-6.4e-275` would pass although the OpenAPI schema says `date-time`; a client that
sent one meant something else, and hears so.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AwareDatetime, BeforeValidator

RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)


def _only_rfc3339(value: object) -> object:
    if isinstance(value, str) and not RFC3339.fullmatch(value):
        raise ValueError("expected an RFC 3339 date-time with a zone, e.g. 2026-12-01T09:30:00Z")
    if isinstance(value, int | float):
        raise ValueError("expected an RFC 3339 date-time string, not a number")
    return value


Rfc3339 = Annotated[AwareDatetime, BeforeValidator(_only_rfc3339)]
