"""Every dashboard page for an admin, on seeded rows; actions; thumbnails; try it."""

from __future__ import annotations

import io
import json
import re

import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import delete, select

from bit_core import weights
from service.app import create_app
from service.dashboard.curves import pr_points
from service.dashboard.templating import percent
from service.dashboard.thumbnails import SIZES
from service.db.models import AuditEvent, Evaluation, Image, Job, Model, ModelAlias, Worker
from service.db.session import session_scope
from service.settings import Settings
from tests.dashboard.conftest import Seeded, csrf_of, seed, sign_in, stored_value_at
from tests.factories import CLASSES, class_png, make_bit_npz
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
    assert html.count("<progress") == 9  # 6 fine-tunes, 1 pre-training, 2 evaluations
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
    assert first.count("<progress") == 25 and "Page 1 of 2 (39 in all)" in first
    second = admin.get("/admin/jobs?page=2").text
    assert second.count("<progress") == 14 and 'rel="prev"' in second


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


def test_a_job_page_states_what_it_held_out(admin: TestClient, settings: Settings, seeded: Seeded):
    job_id = seeded.jobs["succeeded"]
    for source, ids, shown in (
        ("auto", [1, 5], "held out 2 images (automatic: 20.0 % of each class, seed 3); they never"),
        ("split", [4, 8, 12], "held out 3 images (the dataset's val split); they never train"),
        ("none", [], "held out nothing: too few images per class; the model reports a cross-"),
    ):
        holdout = {"source": source, "fraction": 0.2, "seed": 3, "val_image_ids": ids}
        with session_scope(settings.database_url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            job.params = {**job.params, "holdout": holdout}
        html = admin.get(f"/admin/jobs/{job_id}").text
        assert shown in text_of(html)
        assert f'data-holdout="{source}"' in html
        count = len(ids)
        assert f"<dt>holdout.val_image_ids</dt><dd>{count} images</dd>" in html  # not the ids


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


def evaluation_results(settings: Settings, evaluation_id: int) -> dict:
    with session_scope(settings.database_url) as session:
        evaluation = session.get(Evaluation, evaluation_id)
        assert evaluation is not None
        return dict(evaluation.results)


def test_a_model_page_shows_held_out_quality_and_its_latest_finished_evaluation(
    admin: TestClient, settings: Settings, seeded: Seeded
):
    html = admin.get(f"/admin/models/{seeded.model_id}").text
    page = text_of(html)
    assert "Measured on 9 held-out images that never trained" in page
    # Training-set numbers are never shown: not the accuracy on training images, nor a
    # report said to be on them (the seeded metrics hold train_top1 = 1.0).
    assert "train_top1" not in html and "training images (" not in page
    assert "No validation set" not in page and "0.1" in page  # train_loss stays, labelled
    # The newest evaluation is still running: the page details the newest finished one.
    assert f"Report of evaluation {seeded.evaluation_id}: dataset {seeded.dataset_id}" in page
    rows = html.split('class="evaluations"')[1].split("</table>")[0]
    assert rows.count("<tr") == 3  # head + two evaluations, newest first
    assert rows.index(f"Evaluation {seeded.running_evaluation_id}") < rows.index(
        f"Evaluation {seeded.evaluation_id}"
    )
    assert "status-running" in rows and "status-succeeded" in rows

    results = evaluation_results(settings, seeded.evaluation_id)
    assert f"{100 * results['top1']:.1f} %" in page and f"{100 * results['map']:.1f} %" in page
    ece = results["calibration"]["ece"]
    assert f"expected calibration error {100 * ece:.1f} %" in page
    assert "temperature 1.5 applied" in page
    # The PR data the script reads are the stored curves, class by class.
    block = re.search(r'<script type="application/json" id="pr-data">(.*?)</script>', html, re.S)
    assert block is not None
    data = json.loads(block.group(1))
    assert data["classes"] == CLASSES
    for name, curve in zip(CLASSES, data["curves"], strict=True):
        assert curve == results["per_class"][name]["pr_curve"]
    first = results["per_class"][CLASSES[0]]
    points = re.search(r'<polyline id="pr-line" points="([^"]+)"', html)
    assert points is not None
    assert points.group(1) == pr_points(first["pr_curve"]["precision"], first["pr_curve"]["recall"])
    assert len(points.group(1).split()) == len(first["pr_curve"]["precision"])
    # The slider starts at 0.5 (no default threshold): P and R read off the stored curve.
    precision, recall = stored_value_at(first["pr_curve"], 0.5)
    assert 'type="range" min="0" max="1" step="0.01" value="0.50"' in html
    shown = re.search(r'id="at-precision">([^<]+)<.*?id="at-recall">([^<]+)<', html, re.S)
    assert shown is not None
    assert shown.groups() == (percent(precision), percent(recall))
    # Per-class table: precision, recall, F1, support, AP, the best-F1 threshold.
    table = text_of(html.split('class="per-class"')[1].split("</table>")[0])
    red = results["per_class"]["red_square"]
    values = (red["precision"], red["recall"], red["f1"])
    assert "red_square " + " ".join(f"{100 * v:.1f} %" for v in values) in table
    assert f"20 {100 * red['ap']:.1f} %" in table
    # Confusion matrix of the evaluation, and a reliability diagram of its non-empty bins.
    svg = re.search(r"<svg class=\"heatmap\".*?</svg>", html, re.S)
    assert svg is not None
    counts = [int(n) for n in re.findall(r'class="hm-count"[^>]*>(\d+)<', svg.group(0))]
    assert counts == [n for row in results["confusion"] for n in row] and sum(counts) == 60
    reliability = html.split('id="reliability"')[1].split("</svg>")[0]
    filled = [b for b in results["calibration"]["bins"] if b["count"]]
    assert reliability.count('<g class="bin">') == len(filled)
    # No script runs inline: the page's data is JSON, its code a static file.
    assert not re.search(r"<script(?![^>]*(src=|application/json))", html)


def test_other_reports_are_chosen_by_query(admin: TestClient, seeded: Seeded):
    url = f"/admin/models/{seeded.model_id}"
    running = text_of(admin.get(f"{url}?evaluation={seeded.running_evaluation_id}").text)
    assert "The evaluation is running: its results show here when job" in running
    held_out = admin.get(f"{url}?evaluation=holdout").text
    assert "Report on the held-out images of training" in text_of(held_out)
    assert 'id="pr-data"' in held_out
    unknown = text_of(admin.get(f"{url}?evaluation=999").text)  # the default again
    assert f"Report of evaluation {seeded.evaluation_id}" in unknown
    assert admin.get(f"{url}/evaluation").status_code == 404  # no training-image evaluation


def test_a_model_with_nothing_held_out_says_so(admin: TestClient, seeded: Seeded):
    html = admin.get(f"/admin/models/{seeded.plain_model_id}").text
    page = text_of(html)
    assert "Nothing held out exists for this model" in page
    assert "no held-out images and too few to cross-validate" in page
    assert "split=val" in page and "run an evaluation below" in page
    assert "No evaluations yet." in page and "No report to show" in page
    assert "top-1 accuracy" not in page and "heatmap" not in html and "train_top1" not in html


def test_a_cross_validated_estimate_is_labelled_as_one(admin: TestClient, seeded: Seeded):
    page = text_of(admin.get(f"/admin/models/{seeded.cv_model_id}").text)
    assert "An estimate, not a measurement of this model" in page
    assert "top-1 mean ± std over 4 folds (k-fold) of 12 images" in page
    assert "an estimate of linear-probe quality on frozen features" in page
    assert "75.0 % ± 12.5 %" in page
    # Recall keyed by class index reads as class names.
    assert f"{CLASSES[1]} 50.0 %" in page and f"{CLASSES[2]} 75.0 %" in page


def test_the_models_list_shows_quality_never_training_accuracy(admin: TestClient):
    page = text_of(admin.get("/admin/models").text)
    assert "on 9 held out" in page
    assert "75.0 % ± 12.5 % cross-validated estimate" in page
    assert "not measured" in page
    assert "100.0 %" not in page  # train_top1 of the seeded models


def test_the_threshold_form_sets_the_model_default(
    admin: TestClient, settings: Settings, seeded: Seeded
):
    url = f"/admin/models/{seeded.model_id}"
    token = csrf_of(admin.get(url).text)

    def threshold() -> float | None:
        with session_scope(settings.database_url) as session:
            model = session.get(Model, seeded.model_id)
            assert model is not None
            return model.threshold

    form = {"csrf_token": token, "threshold": "0.42", "evaluation": str(seeded.evaluation_id)}
    saved = admin.post(f"{url}/threshold", data=form, follow_redirects=False)
    assert saved.status_code == 303
    assert saved.headers["location"] == f"{url}?evaluation={seeded.evaluation_id}#threshold-h"
    assert threshold() == 0.42
    page = admin.get(saved.headers["location"]).text
    assert f"Model {seeded.model_id}: default threshold 0.42." in text_of(page)
    assert "0.42: predict leaves out classes below it" in text_of(page)
    assert 'step="0.01" value="0.42"' in page  # the slider starts at the default
    first = evaluation_results(settings, seeded.evaluation_id)["per_class"][CLASSES[0]]
    precision, recall = stored_value_at(first["pr_curve"], 0.42)
    assert f'id="at-precision">{percent(precision)}<' in page
    assert f'id="at-recall">{percent(recall)}<' in page

    refused = admin.post(f"{url}/threshold", data={**form, "threshold": "1.5"})
    assert "threshold must be a probability between 0 and 1" in refused.text
    assert "not a number" in admin.post(f"{url}/threshold", data={**form, "threshold": "x"}).text
    assert threshold() == 0.42
    forged = admin.post(f"{url}/threshold", data={**form, "csrf_token": "x"})
    assert forged.status_code == 403 and threshold() == 0.42
    cleared = admin.post(f"{url}/threshold", data={**form, "clear": "1"})
    assert "default threshold none" in cleared.text and threshold() is None
    missing = admin.post("/admin/models/999/threshold", data=form)
    assert missing.status_code == 404


def test_run_evaluation_creates_one_with_its_job(
    admin: TestClient, settings: Settings, seeded: Seeded
):
    url = f"/admin/models/{seeded.model_id}"
    token = csrf_of(admin.get(url).text)
    form = {"csrf_token": token, "dataset_id": str(seeded.dataset_id), "split": "val"}
    created = admin.post(f"{url}/evaluations", data=form, follow_redirects=False)
    assert created.status_code == 303, created.text
    with session_scope(settings.database_url) as session:
        newest = session.scalars(
            select(Evaluation)
            .where(Evaluation.model_id == seeded.model_id)
            .order_by(Evaluation.id.desc())
        ).first()
        assert newest is not None and newest.split == "val" and newest.results == {}
        job = session.get(Job, newest.job_id)
        assert job is not None and job.kind == "evaluate"
    assert created.headers["location"] == f"{url}?evaluation={newest.id}#report-h"
    page = text_of(admin.get(created.headers["location"]).text)
    assert f"Evaluation {newest.id} queued as job {job.id}" in page
    assert f"Report of evaluation {newest.id}" in page
    refused = admin.post(f"{url}/evaluations", data={**form, "dataset_id": "999"})
    assert "dataset 999" in text_of(refused.text)
    bad = admin.post(f"{url}/evaluations", data={**form, "dataset_id": "", "split": "x"})
    assert "Give the id of a dataset" in bad.text
    forged = admin.post(f"{url}/evaluations", data={**form, "csrf_token": "x"})
    assert forged.status_code == 403


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
    assert "red_square 3 1 0" in text_of(html)  # train, val, test
    assert "All classes 9 3 0" in text_of(html)
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


def test_a_model_page_shows_its_name_versions_and_aliases(
    admin: TestClient, seeded: Seeded, settings: Settings
):
    with session_scope(settings.database_url) as session:
        model = session.get(Model, seeded.model_id)
        assert model is not None
        name = model.name
        session.add(
            ModelAlias(tenant=model.tenant, name=name, alias="production", model_id=model.id)
        )
    page = text_of(admin.get(f"/admin/models/{seeded.model_id}").text)
    assert f"name {name}, version 1 (predict with {name}:1 ) versions 1 aliases" in page
    assert f"{name}@production → this version" in page
    other = text_of(admin.get(f"/admin/models/{seeded.plain_model_id}").text)
    assert "aliases none" in other


def test_the_alias_form_points_an_alias_at_this_version(
    admin: TestClient, settings: Settings, seeded: Seeded
):
    url = f"/admin/models/{seeded.plain_model_id}"
    token = csrf_of(admin.get(url).text)
    form = {"csrf_token": token, "alias": "staging"}
    forged = admin.post(f"{url}/alias", data={**form, "csrf_token": "x"})
    assert forged.status_code == 403
    moved = admin.post(f"{url}/alias", data=form, follow_redirects=False)
    assert moved.status_code == 303 and moved.headers["location"] == f"{url}#naming"
    page = text_of(admin.get(url).text)
    assert "@staging now points at version 1." in page
    assert "@staging → this version" in page
    refused = text_of(admin.post(f"{url}/alias", data={**form, "alias": "no way"}).text)
    assert "alias" in refused and "no way" in refused and "is invalid" in refused
    with session_scope(settings.database_url) as session:
        rows = session.scalars(select(ModelAlias)).all()
        assert [(r.alias, r.model_id) for r in rows] == [("staging", seeded.plain_model_id)]
        actions = session.scalars(select(AuditEvent.action)).all()
        assert actions.count("alias.move") == 1
    assert admin.post("/admin/models/999/alias", data=form).status_code == 404
