"""The audit log page: rows with who, what, whose and where; filters; pages of 25."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete

from service.app import create_app
from service.audit import record
from service.auth import Principal
from service.db.models import AuditEvent
from service.db.session import session_scope
from service.settings import Settings
from tests.dashboard.conftest import sign_in
from tests.service.conftest import new_key

START = dt.datetime(2025, 1, 31, 12, 0, tzinfo=dt.UTC)
ALICE = Principal(1, "acme", "user", prefix="bit_aliceAAA", address="10.0.0.1")
ROOT = Principal(2, "ops", "admin", prefix="bit_rootBBBB", address="10.0.0.2")


@pytest.fixture
def admin(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        assert sign_in(client, new_key(settings, "admin", "ops")).status_code == 303
        with session_scope(settings.database_url) as session:
            session.execute(delete(AuditEvent))  # the key's creation and the sign-in
        yield client


def seed(settings: Settings, count: int = 3) -> None:
    """`count` events an hour apart, alternating actors, tenants and actions."""
    with session_scope(settings.database_url) as session:
        for i in range(count):
            row = record(
                session,
                (ALICE, ROOT)[i % 2],
                ("model.delete", "job.cancel")[i % 2],
                tenant=("acme", "globex")[i % 2],
                target=f"thing {i}",
                detail={"name": f"n{i}"},
            )
            row.at = START + dt.timedelta(hours=i)


def rows_of(html: str) -> list[str]:
    """The table's rows as text, whitespace collapsed."""
    body = html.split("<tbody>", 1)[1].split("</tbody>", 1)[0] if "<tbody>" in html else ""
    rows = re.findall(r"<tr>(.*?)</tr>", body, re.S)
    return [" ".join(re.sub(r"<[^>]+>", " ", row).split()) for row in rows]


def test_the_page_shows_who_did_what_newest_first(admin: TestClient, settings: Settings):
    seed(settings)
    page = admin.get("/admin/audit")
    assert page.status_code == 200
    assert '<a href="/admin/audit" aria-current="page">Audit log</a>' in page.text
    assert rows_of(page.text) == [
        "2025-01-31 14:00:00 UTC model.delete acme thing 2 bit_aliceAAA… 10.0.0.1 name: n2",
        "2025-01-31 13:00:00 UTC job.cancel globex thing 1 bit_rootBBBB… (ops) 10.0.0.2 name: n1",
        "2025-01-31 12:00:00 UTC model.delete acme thing 0 bit_aliceAAA… 10.0.0.1 name: n0",
    ]


def test_the_filters_narrow_the_rows(admin: TestClient, settings: Settings):
    seed(settings, 4)

    def targets(query: str) -> list[str]:
        page = admin.get(f"/admin/audit?{query}")
        assert page.status_code == 200, page.text
        return re.findall(r" thing (\d+) ", " ".join(rows_of(page.text)))

    assert targets("tenant=globex") == ["3", "1"]
    assert targets("action=model.delete") == ["2", "0"]
    assert targets("actor=bit_aliceAAA") == ["2", "0"]
    assert targets("since=2025-01-31+13:00&until=2025-01-31T15:00:00%2B01:00") == ["1"]
    assert targets("action=no.such.action") == ["3", "2", "1", "0"]  # ignored, as on /jobs
    empty = admin.get("/admin/audit?tenant=nobody").text
    assert "No events match these filters." in empty and 'href="/admin/audit">Clear' in empty


def test_a_bad_time_is_explained(admin: TestClient, settings: Settings):
    seed(settings)
    page = admin.get("/admin/audit?since=yesterday")
    assert page.status_code == 422
    assert "since &#39;yesterday&#39; is not a time" in page.text
    assert rows_of(page.text) == []
    backwards = admin.get("/admin/audit?since=2025-02-01&until=2025-01-01")
    assert backwards.status_code == 422 and "must be before until" in backwards.text


def test_the_log_pages_by_25_keeping_the_filters(admin: TestClient, settings: Settings):
    seed(settings, 60)  # 30 of acme's
    first = admin.get("/admin/audit?tenant=acme")
    assert len(rows_of(first.text)) == 25 and "Page 1 of 2 (30 in all)" in first.text
    assert 'href="/admin/audit?tenant=acme&amp;page=2"' in first.text
    second = admin.get("/admin/audit?tenant=acme&page=2").text
    assert len(rows_of(second)) == 5 and " thing 0 " in rows_of(second)[-1]
