"""Every dashboard page for an admin, on seeded rows; actions; thumbnails; try it."""

from __future__ import annotations

import io
import re

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import delete

from bit_core import weights
from service.app import create_app
from service.dashboard.thumbnails import SIZES
from service.db.models import Image, Job, Worker
from service.db.session import session_scope
from service.settings import Settings
from tests.dashboard.conftest import Seeded, csrf_of, seed, sign_in
from tests.factories import CLASSES, class_png, make_bit_npz
from tests.polling import wait_for
from tests.service.conftest import new_key


@pytest.fixture
def seeded(settings: Settings) -> Seeded:
    return seed(settings)


@pytest.fixture
def admin(settings: Settings, seeded: Seeded):
    with TestClient(create_app(settings)) as client:
        assert sign_in(client, new_key(settings, "admin")).status_code == 303
        yield client


def text_of(html: str) -> str:
    """The page's visible text, whitespace collapsed (for assertions on wording)."""
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def test_every_page_renders_for_an_admin(admin: TestClient, seeded: Seeded):
    pages = [
        "/admin",
        "/admin/jobs",
        "/admin/jobs?status=failed&kind=finetune",
        *(f"/admin/jobs/{job_id}" for job_id in seeded.jobs.values()),
        "/admin/models",
        f"/admin/models/{seeded.model_id}",
        "/admin/datasets",
        f"/admin/datasets/{seeded.dataset_id}",
        "/admin/base-models",
        "/admin/audit",
    ]
    for path in pages:
        response = admin.get(path)
        assert response.status_code == 200, (path, response.text[:500])
        assert response.headers["content-type"].startswith("text/html")
        assert response.headers["cache-control"] == "no-store"
        assert "Sign out" in response.text


def test_overview_shows_status_counts_queues_workers_and_failures(
    admin: TestClient, seeded: Seeded
):
    page = text_of(admin.get("/admin").text)
    assert "finetune queue 0 messages waiting" in page  # the embedded broker, empty
    assert "pretrain queue 0 messages waiting" in page
    assert "workers alive 1" in page
    assert re.search(r"w1@gpu-1 alive gpu-1 cuda:0 \(H100\) finetune job \d+", page)
    assert "w2@old gone old cpu pretrain idle" in page
    assert "ValueError: the loss diverged" in page
    assert "failed 1 0" in page and "queued 1 1" in page  # finetune, pretrain columns
    assert "No worker is alive" not in page


def test_overview_warns_when_no_worker_is_alive(admin: TestClient, settings: Settings):
    with session_scope(settings.database_url) as session:
        session.execute(delete(Worker).where(Worker.name == "w1@gpu-1"))  # only "gone" left
    page = text_of(admin.get("/admin").text)
    assert "workers alive 0" in page
    assert "No worker is alive: queued jobs wait until one starts." in page


def test_jobs_are_filtered_paginated_with_progress_and_eta(admin: TestClient, seeded: Seeded):
    html = admin.get("/admin/jobs").text
    assert html.count("<progress") == 7
    assert 'value="0.4000"' in html and "30 s" in html  # a running job's progress and ETA
    failed = admin.get("/admin/jobs?status=failed").text
    assert failed.count('href="/admin/jobs/') == 1
    assert f'href="/admin/jobs/{seeded.jobs["failed"]}"' in failed
    pretrain = admin.get("/admin/jobs?kind=pretrain").text
    assert pretrain.count("<progress") == 1
    assert "No jobs match" in admin.get("/admin/jobs?status=cancelling&kind=pretrain").text
    assert admin.get("/admin/jobs?status=bogus").status_code == 200  # unknown filter ignored


def test_the_jobs_list_pages_by_25(admin: TestClient, settings: Settings):
    with session_scope(settings.database_url) as session:
        for _ in range(30):
            session.add(Job(tenant="acme", kind="finetune", status="queued", base_model="x"))
    first = admin.get("/admin/jobs").text
    assert first.count("<progress") == 25 and "Page 1 of 2 (37 in all)" in first
    second = admin.get("/admin/jobs?page=2").text
    assert second.count("<progress") == 12 and 'rel="prev"' in second


def test_a_failed_job_shows_plan_error_traceback_history_and_retry(
    admin: TestClient, seeded: Seeded
):
    html = admin.get(f"/admin/jobs/{seeded.jobs['failed']}").text
    assert "ValueError: the loss diverged" in html and "Traceback (most recent call last)" in html
    assert "<dt>supports</dt><dd>10, 50, 100</dd>" in html
    assert re.search(r'id="cancel-form"[^>]*hidden', html)
    assert not re.search(r'id="retry-form"[^>]*hidden', html)
    running = admin.get(f"/admin/jobs/{seeded.jobs['running']}").text
    assert "resumed" in running and "123.4 img/s" in running and 'id="chart-loss"' in running
    assert not re.search(r'id="cancel-form"[^>]*hidden', running)


def test_a_pretrain_job_shows_its_upstream_plan(admin: TestClient, seeded: Seeded):
    html = admin.get(f"/admin/jobs/{seeded.jobs['pretrain']}").text
    assert "Plan (upstream recipe, resolved)" in html
    assert "<dt>plan.global_batch</dt><dd>64</dd>" in html and "<dt>nnodes</dt><dd>1</dd>" in html


def test_the_job_state_endpoint_sends_only_new_curve_points(admin: TestClient, seeded: Seeded):
    job_id = seeded.jobs["running"]
    state = admin.get(f"/admin/api/jobs/{job_id}").json()
    assert state["status"] == "running" and state["active"] and state["can_cancel"]
    assert [p["step"] for p in state["points"]] == [0, 10, 20, 30, 40]
    assert state["progress"] == 0.4 and state["eta_s"] == 30.0
    again = admin.get(f"/admin/api/jobs/{job_id}?after={state['last_id']}").json()
    assert again["points"] == [] and again["last_id"] == state["last_id"]
    assert admin.get("/admin/api/jobs/999").status_code == 404


def test_cancel_and_retry_call_the_job_service(
    admin: TestClient, settings: Settings, seeded: Seeded
):
    job_id = seeded.jobs["queued"]
    token = csrf_of(admin.get(f"/admin/jobs/{job_id}").text)
    done = admin.post(f"/admin/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert done.status_code == 200 and f"Job {job_id}: cancel requested (cancelled)." in done.text
    again = admin.post(f"/admin/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert "already ended (cancelled)" in again.text  # the service's 409, as a notice
    assert "already ended" not in admin.get(f"/admin/jobs/{job_id}").text  # shown once
    retried = admin.post(f"/admin/jobs/{job_id}/retry", data={"csrf_token": token})
    assert f"Job {job_id}: queued again (queued)." in retried.text
    with session_scope(settings.database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "queued"
    running = seeded.jobs["running"]
    admin.post(f"/admin/jobs/{running}/cancel", data={"csrf_token": token})
    with session_scope(settings.database_url) as session:
        assert session.get(Job, running).status == "cancelling"  # type: ignore[union-attr]
    missing = admin.post("/admin/jobs/999/cancel", data={"csrf_token": token})
    assert missing.status_code == 404


def test_a_model_with_validation_shows_its_heat_map_and_per_class_table(
    admin: TestClient, seeded: Seeded
):
    html = admin.get(f"/admin/models/{seeded.model_id}").text
    assert "On the validation set: 9 held-out images" in html
    svg = re.search(r"<svg class=\"heatmap\".*?</svg>", html, re.S)
    assert svg, html
    assert svg.group(0).count("<rect") == len(CLASSES) ** 2
    assert "true green_stripes, predicted red_square: 1 (33%)" in svg.group(0)
    assert 'fill="#08306b"' in svg.group(0)  # a full row share is the darkest blue
    table = text_of(html.split('class="per-class"')[1].split("</table>")[0])
    assert "red_square 90.0 % 80.0 % 3" in table
    assert "88.9 %" in html  # top-1
    assert "Try it" in html and 'type="file"' in html and 'for="try-image"' in html


def test_a_model_without_validation_is_evaluated_on_its_training_images(
    admin: TestClient, seeded: Seeded
):
    url = f"/admin/models/{seeded.plain_model_id}"
    assert 'data-ready="false"' in admin.get(url).text

    def evaluated() -> list[httpx.Response]:  # the evaluation runs on a background thread
        response = admin.get(f"{url}/evaluation")
        return [] if response.status_code == 202 else [response]

    [response] = wait_for(evaluated, 60, "the evaluation on the training images")
    assert response.status_code == 200, response.text
    assert "No validation set" in response.text and "training images (12)" in response.text
    svg = re.search(r"<svg class=\"heatmap\".*?</svg>", response.text, re.S)
    assert svg is not None
    counts = [int(n) for n in re.findall(r'class="hm-count"[^>]*>(\d+)<', svg.group(0))]
    assert len(counts) == 9 and sum(counts) == 12
    assert 'data-ready="true"' in admin.get(url).text  # computed once, then served


def test_try_it_classifies_an_uploaded_image(admin: TestClient, seeded: Seeded):
    url = f"/admin/models/{seeded.model_id}"
    token = csrf_of(admin.get(url).text)
    upload = {"image": ("disc.png", class_png("blue_disc", 7), "image/png")}
    response = admin.post(f"{url}/try", data={"csrf_token": token, "top_k": "2"}, files=upload)
    assert response.status_code == 200, response.text
    result = response.text.split('id="try-result"')[1]
    assert result.count("<meter") == 2 and "Top 2 for disc.png" in result
    assert 'src="data:image/jpeg;base64,' in result  # a re-encoded preview, not the upload
    bad = admin.post(
        f"{url}/try",
        data={"csrf_token": token},
        files={"image": ("notes.png", b"not an image", "image/png")},
    )
    assert bad.status_code == 422 and "not an image Pillow can read" in bad.text
    forged = admin.post(f"{url}/try", data={"csrf_token": "x"}, files=upload)
    assert forged.status_code == 403


def test_datasets_show_class_counts_and_thumbnails(admin: TestClient, seeded: Seeded):
    listing = text_of(admin.get("/admin/datasets").text)
    assert f"Dataset {seeded.dataset_id} shapes 3 12 acme" in listing
    html = admin.get(f"/admin/datasets/{seeded.dataset_id}").text
    assert html.count('src="/admin/thumbnails/') == 12
    assert "red_square 3 1" in text_of(html)  # train, validation
    assert "datasets/" not in html  # no artifact key, no raw file link


def test_thumbnails_are_resized_jpegs_with_cache_headers(admin: TestClient, seeded: Seeded):
    url = f"/admin/thumbnails/{seeded.image_ids[0]}.jpg"
    for size in SIZES:
        response = admin.get(f"{url}?size={size}")
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/jpeg"
        assert response.headers["cache-control"] == "private, max-age=86400"
        assert response.headers["x-content-type-options"] == "nosniff"
        image = PILImage.open(io.BytesIO(response.content))
        assert image.format == "JPEG" and max(image.size) == size  # from 320 x 240
        assert image.size == (size, size * 3 // 4)  # aspect kept
    etag = admin.get(url).headers["etag"]
    assert admin.get(url, headers={"If-None-Match": etag}).status_code == 304
    assert admin.get(f"{url}?size=4000").status_code == 404
    assert admin.get("/admin/thumbnails/999999.jpg").status_code == 404


def test_a_stored_file_that_is_not_an_image_never_reaches_the_browser(
    admin: TestClient, settings: Settings, seeded: Seeded
):
    from service.db.artifacts import LocalArtifactStore

    with session_scope(settings.database_url) as session:
        image = session.get(Image, seeded.image_ids[1])
        assert image is not None
        LocalArtifactStore(settings.artifacts_url).put_bytes(
            image.uri, b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>"
        )
        image.sha256 = "f" * 64  # a fresh cache key
    response = admin.get(f"/admin/thumbnails/{seeded.image_ids[1]}.jpg")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert PILImage.open(io.BytesIO(response.content)).format == "JPEG"  # a grey placeholder
    assert b"script" not in response.content


def test_base_models_show_installed_ones_and_how_to_install_others(
    admin: TestClient, settings: Settings, tmp_path
):
    npz = make_bit_npz(tmp_path / "house.npz", "R14x0.5", 5)
    weights.import_file(npz, settings.weights_dir, name="house-base")
    page = text_of(admin.get("/admin/base-models").text)
    assert "Installed Name Architecture Source sha256 house-base R14x0.5" in page
    assert "bit weights pull BiT-M-R50x1" in page
    assert "bit weights import FILE --name NAME" in page
    assert "R14x0.5" in page  # from scratch


def test_unknown_rows_answer_an_html_404(admin: TestClient):
    for path in ("/admin/jobs/999", "/admin/models/999", "/admin/datasets/999"):
        response = admin.get(path)
        assert response.status_code == 404 and "does not exist" in response.text
        assert response.headers["content-type"].startswith("text/html")
