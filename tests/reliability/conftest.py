"""Reliability suite: faults, hostile input, fuzzing, load and security. Prints its figures."""

from __future__ import annotations

import pytest

from tests.reliability.figures import FIGURES
from tests.service.conftest import (  # noqa: F401 (fixtures)
    REDIS_URL,
    admin_headers,
    client,
    other_tenant_headers,
    postgres_url,
    settings,
    sqlite_settings,
    user_headers,
)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One block of figures at the end of any run that reached these tests."""
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for name in sorted(FIGURES):
        value = FIGURES[name]
        shown = f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"
        terminalreporter.write_line(f"{name}: {shown}")
