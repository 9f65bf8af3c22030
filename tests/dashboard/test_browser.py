"""The dashboard in headless Chromium against a live API and a real worker process.

Screenshots of every page are saved under tests/dashboard/artifacts/ to be looked at.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.dashboard.curves import PR_BOX
from service.dashboard.templating import percent
from service.db.models import Dataset, Evaluation, Job, Model
from service.db.session import session_scope
from tests.dashboard.conftest import CV_QUALITY, LiveDashboard, stored_value_at, synthetic_report
from tests.e2e.live import labeled_uploads
from tests.factories import CLASSES, class_png
from tests.polling import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.services]

# SMALL_PLAN of the e2e tests with more steps, so that progress is seen moving: about 10 s
# on one CPU thread, polled every second by the page.
PLAN = {"batch_size": 16, "total_steps": 120, "base_lr": 0.01, "precrop": 40, "crop": 32}
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture
def context(browser: Any, live_dashboard: LiveDashboard) -> Iterator[Any]:
    """A fresh browser profile. The test fails on any script error, CSP refusal or failed
    request, except the statuses a test expects (`ctx.expected`: (status, path) pairs)."""
    ctx = browser.new_context(viewport=DESKTOP, base_url=live_dashboard.url)
    ctx.errors, ctx.expected = [], set()

    def on_console(message: Any) -> None:
        # Failed loads are checked by their response below, where the status is known.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            ctx.errors.append(message.text)

    def on_response(response: Any) -> None:
        path = response.url.removeprefix(live_dashboard.url).split("?")[0]
        if response.status >= 400 and (response.status, path) not in ctx.expected:
            ctx.errors.append(f"{response.status} {response.url}")

    ctx.on("console", on_console)
    ctx.on("response", on_response)
    ctx.on("weberror", lambda error: ctx.errors.append(str(error.error)))
    try:
        yield ctx
    finally:
        ctx.close()
    assert not ctx.errors, ctx.errors


def sign_in(page: Any, key: str) -> None:
    page.goto("/admin/login")
    page.get_by_label("Admin API key").fill(key)
    page.get_by_label("Admin API key").press("Enter")  # the keyboard is enough


def start_job(live: LiveDashboard, plan: dict[str, Any], seed: int) -> int:
    files, labels = labeled_uploads(per_class=5, seed=seed)
    with live.service.client() as client:  # the user's key, through the public API
        response = client.post(
            "/v1/finetune/upload",
            files=files,
            data={"labels": labels, "base_model": "R14x0.5", "overrides": json.dumps(plan)},
        )
    assert response.status_code == 202, response.text
    return int(response.json()["id"])


def api_job(live: LiveDashboard, job_id: int) -> dict[str, Any]:
    with live.service.client() as client:
        return dict(client.get(f"/v1/jobs/{job_id}").json())


def until(page: Any, expression: str, timeout: float = 60) -> None:
    """Wait for a JS expression to be true, polled with `evaluate`: the dashboard's CSP
    refuses the eval() that Playwright's `wait_for_function` would need."""
    wait_for(lambda: page.evaluate(expression), timeout, expression, interval=0.1)


def shot(page: Any, artifacts: Path, name: str) -> None:
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)


def test_a_non_admin_key_is_refused(context: Any, live_dashboard: LiveDashboard, artifacts: Path):
    context.expected.add((401, "/admin/login"))  # the refused sign-in
    page = context.new_page()
    page.goto("/admin/jobs")
    assert page.url.endswith("/admin/login?next=/admin/jobs")
    shot(page, artifacts, "login")
    sign_in(page, live_dashboard.user_key)
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert "That key cannot open the dashboard" in alert.inner_text()
    assert "/admin/login" in page.url
    assert not [c for c in context.cookies() if c["name"] == "bit_admin"]
    shot(page, artifacts, "login-refused")
    page.goto("/admin")
    assert "/admin/login" in page.url


def test_watch_a_job_train_then_open_its_model(
    context: Any, live_dashboard: LiveDashboard, artifacts: Path
):
    page = context.new_page()
    sign_in(page, live_dashboard.admin_key)
    page.wait_for_url("**/admin")
    cookie = next(c for c in context.cookies() if c["name"] == "bit_admin")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    job_id = start_job(live_dashboard, PLAN, seed=0)
    page.goto(f"/admin/jobs/{job_id}")
    page.evaluate("window.__sameDocument = true")  # gone if the page ever reloads
    samples: list[tuple[float, int, str]] = []
    midway = False
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        value, points, status = page.evaluate(
            """() => [document.getElementById('progress').value,
                      Number(document.getElementById('chart-loss').dataset.points),
                      document.querySelector('#status .status').textContent]"""
        )
        samples.append((value, points, status))
        if not midway and 0.3 < value < 0.9:
            midway = True
            shot(page, artifacts, "job-running")
        if status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.1)  # sampling the page, not waiting for it
    assert samples[-1][2] == "succeeded", (samples[-5:], live_dashboard.service.logs())
    assert page.evaluate("window.__sameDocument") is True
    progress = [value for value, _, _ in samples]
    points = [count for _, count, _ in samples]
    assert progress == sorted(progress) and points == sorted(points), samples
    assert len({v for v in progress if 0 < v < 1}) >= 2, samples  # seen moving, not jumping
    assert len({p for p in points if p > 0}) >= 3, samples  # the curve grew while watched
    assert progress[-1] == 1.0
    assert page.locator("#progress-text").inner_text().startswith("120 / 120 steps")
    assert page.locator("#cancel-form").is_hidden()
    assert int(page.locator("#chart-lr").get_attribute("data-points")) == points[-1]
    # 5 images per class: nothing held out, and the empty validation chart says why.
    assert page.locator("#job").get_attribute("data-holdout") == "none"
    assert page.locator("#chart-val").get_attribute("data-empty") == (
        "no held-out images: see the model's cross-validated estimate"
    )
    shot(page, artifacts, "job")

    # Keyboard: every control is reachable with Tab.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"

    phone = context.new_page()
    phone.set_viewport_size(PHONE)
    phone.goto(f"/admin/jobs/{job_id}")
    until(phone, "Number(document.getElementById('chart-loss').dataset.points) > 0")
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the job page scrolls sideways at phone width ({width}px)"
    shot(phone, artifacts, "job-phone")
    phone.close()

    page.locator("#model-link a").click()
    page.wait_for_url("**/admin/models/*")
    # Too few images to hold any out: a cross-validated estimate, never numbers measured
    # on the training images.
    quality = page.locator("#quality")
    assert quality.get_attribute("class").split()[-1] == "quality-cross_validated"
    assert "an estimate of linear-probe quality on frozen features" in quality.inner_text()
    assert "No validation set" not in page.content() and page.locator("svg.heatmap").count() == 0
    shot(page, artifacts, "model")

    page.get_by_label("Image file").set_input_files(
        {"name": "disc.png", "mimeType": "image/png", "buffer": class_png("blue_disc", 99)}
    )
    page.get_by_role("button", name="Classify").click()
    result = page.locator("#try-result")
    result.wait_for()
    assert result.locator("tbody th").first.inner_text() == "blue_disc"
    shot(page, artifacts, "model-try")


def test_overview_lists_and_datasets(context: Any, live_dashboard: LiveDashboard, artifacts: Path):
    job_id = start_job(live_dashboard, {**PLAN, "total_steps": 20}, seed=2)
    with live_dashboard.service.client() as client:
        live_dashboard.service.wait_job(client, job_id, ("succeeded",), timeout=240)
    page = context.new_page()
    sign_in(page, live_dashboard.admin_key)
    page.wait_for_url("**/admin")
    wait_for(
        lambda: page.reload() or "1" in page.locator(".tile-value").nth(2).inner_text(),
        30,
        "the worker to report",
    )
    assert "alive" in page.locator("#workers-h + .table-wrap").inner_text()
    shot(page, artifacts, "overview")

    page.get_by_role("link", name="Jobs", exact=True).click()
    page.wait_for_url("**/admin/jobs")
    assert page.locator("progress").count() >= 1
    page.get_by_label("Status").select_option("succeeded")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url("**status=succeeded**")
    shot(page, artifacts, "jobs")

    page.get_by_role("link", name="Datasets", exact=True).click()
    page.locator("tbody a").first.click()
    page.wait_for_url("**/admin/datasets/*")
    images = page.locator(".thumbs img")
    assert images.count() == 15
    until(page, "[...document.querySelectorAll('.thumbs img')].every(i => i.naturalWidth)")
    shot(page, artifacts, "datasets")

    page.get_by_role("link", name="Base models", exact=True).click()
    page.wait_for_url("**/admin/base-models")
    assert "bit weights pull" in page.content()
    assert "house-R14x0.5" in page.locator("#installed-h + .table-wrap").inner_text()
    shot(page, artifacts, "base-models")

    page.get_by_role("link", name="Models", exact=True).click()
    page.wait_for_url("**/admin/models")
    shot(page, artifacts, "models")


def test_cancel_a_running_job_from_the_ui(
    context: Any, live_dashboard: LiveDashboard, artifacts: Path
):
    page = context.new_page()
    sign_in(page, live_dashboard.admin_key)
    page.wait_for_url("**/admin")
    job_id = start_job(live_dashboard, {**PLAN, "total_steps": 5000}, seed=1)
    page.goto(f"/admin/jobs/{job_id}")
    until(page, "document.getElementById('progress').value > 0", 120)  # a few steps in
    page.once("dialog", lambda dialog: dialog.accept())  # "Cancel job N?"
    page.get_by_role("button", name="Cancel job").click()
    page.wait_for_url(f"**/admin/jobs/{job_id}")
    assert "cancel requested" in page.locator(".flash").inner_text()
    # The page's own polling updates the badge.
    until(page, "document.querySelector('#status .status').textContent.trim() === 'cancelled'")
    assert page.locator("#status .status").inner_text() == "cancelled"
    assert page.locator("#retry-form").is_visible()
    shot(page, artifacts, "job-cancelled")
    job = api_job(live_dashboard, job_id)
    assert job["status"] == "cancelled" and job["step"] < 5000
    with httpx.Client(base_url=live_dashboard.url) as anonymous:  # the JSON needs a session
        assert anonymous.get(f"/admin/api/jobs/{job_id}").status_code == 401


def seed_evaluated_model(live: LiveDashboard) -> tuple[int, dict[str, Any]]:
    """A model row with one finished evaluation, written into the live service's database
    (its files are not needed to show the page). The model id and the stored results."""
    results = {**synthetic_report(CLASSES, seed=2), "temperature": 1.25}
    with session_scope(f"sqlite:///{live.service.home / 'bit.db'}") as session:
        dataset = Dataset(tenant="acme", name="shapes-test")
        session.add(dataset)
        session.flush()
        model = Model(
            tenant="acme", name="evaluated", arch="R14x0.5", classes=CLASSES, crop=32,
            base_model="R14x0.5", plan={}, uri="models/none", sha256="0" * 64,
            metrics={"train_loss": 0.1, "quality": CV_QUALITY}, temperature=1.25,
        )  # fmt: skip
        session.add(model)
        session.flush()
        job = Job(
            tenant="acme", kind="evaluate", status="succeeded", dataset_id=dataset.id,
            base_model="R14x0.5", params={"model_id": model.id, "split": "test"},
        )  # fmt: skip
        session.add(job)
        session.flush()
        session.add(
            Evaluation(
                tenant="acme",
                model_id=model.id,
                job_id=job.id,
                dataset_id=dataset.id,
                split="test",
                results=results,
            )
        )
        return model.id, results


def polyline(page: Any) -> list[tuple[float, float]]:
    points = page.locator("#pr-line").get_attribute("points").split()
    return [(float(x), float(y)) for x, y in (p.split(",") for p in points)]


def shown_at_threshold(page: Any) -> tuple[str, str]:
    return page.locator("#at-precision").inner_text(), page.locator("#at-recall").inner_text()


def test_the_pr_curve_and_the_threshold_slider(
    context: Any, live_dashboard: LiveDashboard, artifacts: Path
):
    model_id, results = seed_evaluated_model(live_dashboard)
    page = context.new_page()
    sign_in(page, live_dashboard.admin_key)
    page.wait_for_url("**/admin")
    page.goto(f"/admin/models/{model_id}")

    # The first class's curve is drawn, one vertex per stored point.
    curves = [results["per_class"][name]["pr_curve"] for name in CLASSES]
    assert len(polyline(page)) == len(curves[0]["precision"])
    assert page.locator("#pr-marker").get_attribute("visibility") == "visible"
    start = shown_at_threshold(page)
    precision, recall = stored_value_at(curves[0], 0.5)
    assert start == (percent(precision), percent(recall))

    # Another class: the script draws its curve with the server's mapping.
    page.locator("#pr-class").select_option(label=CLASSES[1])
    expected = [
        coordinate
        for p, r in zip(curves[1]["precision"], curves[1]["recall"], strict=True)
        for coordinate in (PR_BOX.x(r), PR_BOX.y(p))
    ]
    drawn = [coordinate for point in polyline(page) for coordinate in point]
    assert drawn == pytest.approx(expected, abs=0.051)
    assert page.locator("#pr-class-name").inner_text() == CLASSES[1]

    # Move the slider: precision and recall read off the stored curve at that threshold.
    before = shown_at_threshold(page)
    slider = page.locator("#threshold")
    for value in ("0.2", "0.7", "0.35"):
        slider.fill(value)  # sets the range input and dispatches `input`
        precision, recall = stored_value_at(curves[1], float(value))
        assert shown_at_threshold(page) == (percent(precision), percent(recall)), value
        assert page.locator("#threshold-value").inner_text() == f"{float(value):.2f}"
        marker = page.locator("#pr-marker")
        if precision is not None:
            cx, cy = float(marker.get_attribute("cx")), float(marker.get_attribute("cy"))
            assert (cx, cy) == pytest.approx((PR_BOX.x(recall), PR_BOX.y(precision)), abs=0.051)
    assert shown_at_threshold(page) != before  # 0.35 is not 0.5 on this curve
    shot(page, artifacts, "model-evaluated")
    page.screenshot(path="/tmp/model_page.png", full_page=True)

    # Save it as the model's default threshold.
    page.get_by_role("button", name="Save as default threshold").click()
    page.wait_for_url(f"**/admin/models/{model_id}?evaluation=*")
    assert "default threshold 0.35" in page.locator(".flash").inner_text()
    assert page.locator("#threshold").input_value() == "0.35"
    with session_scope(f"sqlite:///{live_dashboard.service.home / 'bit.db'}") as session:
        stored = session.get(Model, model_id)
        assert stored is not None and stored.threshold == 0.35
    assert "0.35: predict leaves out classes below it" in page.locator("#serving").inner_text()

    phone = context.new_page()
    phone.set_viewport_size(PHONE)
    phone.goto(f"/admin/models/{model_id}")
    width = phone.evaluate("document.documentElement.scrollWidth")
    wide = phone.evaluate(
        """() => [...document.querySelectorAll('main *')]
        .filter(e => e.getBoundingClientRect().right > window.innerWidth
                     && !e.closest('.table-wrap, .heatmap-scroll'))
        .map(e => e.tagName + '#' + e.id + '.' + e.className).slice(0, 8)"""
    )
    assert width <= PHONE["width"], f"the model page scrolls sideways ({width}px): {wide}"
    shot(phone, artifacts, "model-evaluated-phone")
    phone.close()
