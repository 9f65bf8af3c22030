"""The hostile-input corpus against the real app, on SQLite and PostgreSQL.

Every request of tests/reliability/corpus.py must get a 4xx with one of its expected error
codes and a bounded message, never a 5xx; afterwards no row (dataset, image, job, model)
and no file in the artifact store may be left behind. Then the inputs that are accepted on
purpose: names that look like paths, and bytes that are not UTF-8.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.app import create_app
from service.db.models import Dataset, Image, Job, Model
from service.db.session import session_scope
from service.settings import Settings
from tests.factories import save_tiny_model
from tests.reliability import corpus, figures
from tests.reliability.corpus import Hostile
from tests.service.conftest import new_key, register_model

MAX_MESSAGE_CHARS = 2000  # a message quotes client input only in part


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Both databases, the corpus's limits, no rate limit (one key sends the whole corpus)."""
    return settings.model_copy(update={**corpus.LIMITS, "rate_limit_per_minute": 0})


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    # A 5xx must come back as an answer, not as the server's exception.
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {new_key(settings, 'admin', 'acme')}"}


def leftovers(settings: Settings) -> tuple[tuple[int, ...], frozenset[str]]:
    """(row counts of datasets, images, jobs, models; every file in the artifact store)."""
    with session_scope(settings.database_url) as session:
        counts = tuple(
            session.scalar(select(func.count()).select_from(table)) or 0
            for table in (Dataset, Image, Job, Model)
        )
    root = Path(settings.artifacts_url)
    files = frozenset(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return counts, files


def refusal_problem(response: object, case: Hostile) -> str | None:
    """What is wrong with the answer to `case`, or None if it is a right refusal."""
    status = response.status_code  # type: ignore[attr-defined]
    text = response.text[:300]  # type: ignore[attr-defined]
    if not 400 <= status < 500:
        return f"{case.name}: {status} {text}"
    try:
        error = response.json()["error"]  # type: ignore[attr-defined]
    except (ValueError, KeyError, TypeError):
        return f"{case.name}: {status} without the error shape: {text}"
    if error.get("code") not in case.codes:
        return f"{case.name}: code {error.get('code')!r}, expected one of {sorted(case.codes)}"
    if not error.get("message") or len(error["message"]) > MAX_MESSAGE_CHARS:
        return f"{case.name}: message empty or over {MAX_MESSAGE_CHARS} characters"
    return None


def send_all(
    client: TestClient, settings: Settings, headers: dict[str, str], cases: list[Hostile]
) -> None:
    """Send every case; fail once, listing every wrong answer and every leftover."""
    problems = []
    for case in cases:
        before = leftovers(settings)
        request_headers = {**headers, **case.kwargs.get("headers", {})}
        kwargs = {k: v for k, v in case.kwargs.items() if k != "headers"}
        response = client.request(case.method, case.path, headers=request_headers, **kwargs)
        if (problem := refusal_problem(response, case)) is not None:
            problems.append(problem)
        if (after := leftovers(settings)) != before:
            problems.append(f"{case.name}: left behind {before} -> {after}")
    figures.add("hostile inputs tried", len(cases))
    figures.add("hostile inputs wrongly answered", len(problems))
    assert not problems, "\n".join(problems)


def test_hostile_uploads_are_refused_and_leave_nothing(
    client: TestClient, settings: Settings, headers: dict[str, str]
) -> None:
    send_all(client, settings, headers, corpus.upload_cases())


def test_hostile_archives_are_refused_and_leave_nothing(
    client: TestClient, settings: Settings, headers: dict[str, str]
) -> None:
    send_all(client, settings, headers, corpus.archive_cases())


def test_hostile_predictions_are_refused(
    client: TestClient, settings: Settings, headers: dict[str, str], tmp_path: Path
) -> None:
    settings.device = "cpu"
    save_tiny_model(tmp_path / "model")
    model_id = register_model(settings, tmp_path / "model")
    send_all(client, settings, headers, corpus.predict_cases(model_id))


def test_hostile_jobs_are_refused_and_leave_nothing(
    client: TestClient, settings: Settings, headers: dict[str, str]
) -> None:
    form = corpus.upload_form(corpus.four_images())
    response = client.post("/v1/datasets", headers=headers, **form)
    assert response.status_code == 201, response.text
    send_all(client, settings, headers, corpus.job_cases(response.json()["id"]))


# --- accepted on purpose ---------------------------------------------------------------------


def test_filenames_that_look_like_paths_never_become_paths(
    client: TestClient, settings: Settings, headers: dict[str, str], tmp_path: Path
) -> None:
    """Images are stored by content hash: a client's filename names nothing on disk."""
    target = tmp_path / "escaped.png"
    images = corpus.four_images()
    names = [f"../../../../{target}", "/etc/passwd", "..\\..\\win.ini", "C:\\boot.png"]
    renamed = [(name, data, label) for name, (_, data, label) in zip(names, images, strict=True)]
    response = client.post("/v1/datasets", headers=headers, **corpus.upload_form(renamed))
    assert response.status_code == 201, response.text
    assert not target.exists()
    stored = sorted(leftovers(settings)[1])
    assert len(stored) == 4 and all(len(Path(p).name) == 64 for p in stored), stored
    figures.add("hostile inputs tried", len(names))


def test_a_nul_in_a_filename_is_stored_as_a_printable_name(
    client: TestClient, settings: Settings, headers: dict[str, str]
) -> None:
    """PostgreSQL text holds no NUL: the stored name shows it as '?' (it was a 500)."""
    images = corpus.four_images()
    parts = [corpus.file_part(f"{n}\x00.png".encode(), data) for n, data, _ in images]
    parts += [corpus.field_part("labels", label.encode()) for _, _, label in images]
    body = corpus.raw_multipart(parts)
    response = client.post(
        "/v1/datasets", headers={**headers, **body["headers"]}, content=body["content"]
    )
    assert response.status_code == 201, response.text
    with session_scope(settings.database_url) as session:
        names = sorted(session.scalars(select(Image.filename)))
    assert names == sorted(f"{n}?.png" for n, _, _ in images)
    figures.add("hostile inputs tried")


def test_bytes_that_are_not_utf8_never_break_an_upload(
    client: TestClient, settings: Settings, headers: dict[str, str]
) -> None:
    """Starlette reads a form field that is not UTF-8 as Latin-1: a label, never a crash."""
    images = corpus.four_images()
    parts = [corpus.file_part(name.encode(), data) for name, data, _ in images]
    labels = [b"\xff\xfecat", b"\xff\xfecat", b"dog", b"dog"]
    parts += [corpus.field_part("labels", label) for label in labels]
    parts.append(corpus.field_part("name", b"pets-\xc3\x28"))
    body = corpus.raw_multipart(parts)
    response = client.post(
        "/v1/datasets", headers={**headers, **body["headers"]}, content=body["content"]
    )
    assert response.status_code == 201, response.text
    assert response.json()["classes"] == {"ÿþcat": 2, "dog": 2}
    figures.add("hostile inputs tried")
