"""Dashboard fixtures: an app on a migrated database with keys, seeded rows, a signed-in
client; and for the browser tests, a live API + worker and a headless Chromium."""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bit_core.checkpoint import WEIGHTS_FILE
from bit_core.quality import classification_report
from service.app import create_app
from service.db.artifacts import LocalArtifactStore
from service.db.models import (
    Dataset,
    Evaluation,
    Image,
    Job,
    JobEvent,
    JobMetric,
    Model,
    Worker,
    utcnow,
)
from service.db.session import session_scope
from service.settings import Settings
from tests.e2e.conftest import service_env
from tests.e2e.live import LiveService
from tests.factories import CLASSES, class_png, make_bit_npz, save_tiny_model
from tests.service.conftest import migrated_settings, postgres_url  # noqa: F401 (fixture)

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Migrated settings on SQLite and on PostgreSQL (pages must render on both), on the CPU."""
    return migrated_settings(request, tmp_path, request.param, device="cpu")


@pytest.fixture
def sqlite_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    return migrated_settings(request, tmp_path, device="cpu")


@pytest.fixture
def client(sqlite_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(sqlite_settings)) as test_client:
        yield test_client


def login_token(client: TestClient) -> str:
    page = client.get("/admin/login")
    found = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert found, page.text
    return found.group(1)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def sign_in(client: TestClient, key: str, next_path: str = "/admin"):
    return client.post(
        "/admin/login",
        data={"api_key": key, "login_token": login_token(client), "next": next_path},
        follow_redirects=False,
    )


@dataclass
class Seeded:
    dataset_id: int
    image_ids: list[int]
    jobs: dict[str, int]  # status (and "pretrain") -> job id
    model_id: int  # quality on held-out images, with a finished and a running evaluation
    plain_model_id: int  # quality "none": nothing held out
    cv_model_id: int  # a cross-validated estimate
    evaluation_id: int  # the finished evaluation of model_id
    running_evaluation_id: int  # newer, its job still running


def synthetic_report(
    classes: list[str], *, per_class: int = 20, seed: int = 0, margin: float = 1.5
) -> dict[str, Any]:
    """A classification report (bit_core.quality) of noisy predictions on synthetic labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(classes)), per_class)
    logits = rng.normal(size=(len(labels), len(classes)))
    logits[np.arange(len(labels)), labels] += margin
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return classification_report(probabilities, labels, list(classes))


def stored_value_at(curve: dict[str, list[float]], threshold: float) -> tuple[float | None, float]:
    """The contract, computed apart from the page: the smallest stored threshold >= t."""
    thresholds = np.asarray(curve["thresholds"])
    above = np.flatnonzero(thresholds >= threshold)
    if not len(above):
        return None, 0.0
    i = above[np.argmin(thresholds[above])]
    return curve["precision"][i], curve["recall"][i]


CV_QUALITY = {
    "kind": "cross_validated",
    "method": "k-fold",
    "folds": 4,
    "top1": 0.75,
    "top1_std": 0.125,
    "fold_top1": [0.625, 0.875, 0.625, 0.875],
    "per_class_recall": {"0": 1.0, "1": 0.5, "2": 0.75},
    "count": 12,
    "label": "estimate of linear-probe quality on frozen features",
}


def seed(settings: Settings, *, per_class: int = 4) -> Seeded:
    """What a working service leaves behind: a dataset with real images, jobs in every
    status with curves and history, three models (quality held out, none, cross-validated),
    evaluations of the first (finished, and running), workers."""
    store = LocalArtifactStore(settings.artifacts_url)
    now = utcnow()
    with session_scope(settings.database_url) as session:
        dataset = Dataset(tenant="acme", name="shapes")
        session.add(dataset)
        session.flush()
        images = []
        for c, label in enumerate(CLASSES):
            for i in range(per_class):
                data = class_png(label, 100 * c + i, size=(240, 320))
                key = f"datasets/{dataset.id}/{label}-{i}"
                store.put_bytes(key, data)
                image = Image(
                    dataset_id=dataset.id,
                    label=label,
                    filename=f"{label}-{i}.png",
                    sha256=f"{c:02d}{i:02d}".ljust(64, "a"),
                    width=320,
                    height=240,
                    size_bytes=len(data),
                    split="val" if i == per_class - 1 else "train",
                    uri=key,
                )
                session.add(image)
                images.append(image)
        jobs: dict[str, Job] = {}
        for status in ("queued", "running", "cancelling", "succeeded", "failed", "cancelled"):
            running = status in ("running", "cancelling")
            job = Job(
                tenant="acme" if status != "cancelled" else "globex",
                kind="finetune",
                status=status,
                dataset_id=dataset.id,
                base_model="R14x0.5",
                params={"batch_size": 16, "total_steps": 100, "supports": [10, 50, 100]},
                total_steps=100,
                step=100 if status == "succeeded" else 40 if running else 0,
                progress=1.0 if status == "succeeded" else 0.4 if running else 0.0,
                images_per_s=123.4 if running else None,
                eta_s=30.0 if running else None,
                attempts=2 if status == "running" else 1,
                started_at=now - dt.timedelta(minutes=5),
                error="ValueError: the loss diverged" if status == "failed" else None,
                error_code="internal_error" if status == "failed" else None,
                traceback="Traceback (most recent call last):\n  File 'x'\nValueError: boom"
                if status == "failed"
                else None,
            )
            session.add(job)
            jobs[status] = job
        pretrain = Job(
            tenant="acme",
            kind="pretrain",
            status="queued",
            base_model="R26x1",
            mode="pretrain",
            params={"arch": "R26x1", "plan": {"global_batch": 64, "epochs": 2}, "nnodes": 1},
        )
        session.add(pretrain)
        session.flush()
        jobs_by_kind = {"pretrain": pretrain.id}
        for status, job in jobs.items():
            session.add(JobEvent(job_id=job.id, kind="created"))
            if status != "queued":
                session.add(JobEvent(job_id=job.id, kind="started", attempt=1, worker="w1"))
            for step in range(0, job.step + 1, 10):
                session.add(
                    JobMetric(job_id=job.id, step=step, loss=2.0 / (1 + step), lr=0.001 * step)
                )
        session.add(JobEvent(job_id=jobs["running"].id, kind="resumed", attempt=2, step=30))
        session.add(
            Worker(
                name="w1@gpu-1",
                host="gpu-1",
                device="cuda:0 (H100)",
                queues="finetune",
                current_job_id=jobs["running"].id,
                last_seen=now,
            )
        )
        session.add(
            Worker(
                name="w2@old",
                host="old",
                device="cpu",
                queues="pretrain",
                last_seen=now - dt.timedelta(hours=1),
            )
        )
        held_out = synthetic_report(CLASSES, per_class=3, seed=1)
        qualities = [
            {"kind": "holdout", **{k: held_out[k] for k in ("top1", "top5", "count")}},
            {"kind": "none", "label": "no held-out images and too few to cross-validate"},
            CV_QUALITY,
        ]
        qualities[0]["report"] = held_out
        model_ids: list[int] = []
        for i, quality in enumerate(qualities):
            metrics = {"train_loss": 0.1 + 0.1 * i, "train_top1": 1.0, "quality": quality}
            job = jobs["succeeded"]
            key = f"jobs/{job.id}/model-{len(model_ids)}"
            info = save_tiny_model(store.path(key), seed=len(model_ids))
            model = Model(
                tenant="acme",
                job_id=job.id,
                name=f"shapes-{len(model_ids)}",
                arch=info.arch,
                classes=info.classes,
                crop=info.crop,
                base_model=info.base_model,
                plan=info.plan,
                metrics=metrics,
                uri=key,
                sha256=info.sha256,
                size_bytes=(store.path(key) / WEIGHTS_FILE).stat().st_size,
            )
            session.add(model)
            session.flush()
            model_ids.append(model.id)
        jobs["succeeded"].model_id = model_ids[0]
        evaluation_ids = []
        for status, results in (
            ("succeeded", {**synthetic_report(CLASSES, seed=2), "temperature": 1.5}),
            ("running", {}),
        ):
            job = Job(
                tenant="acme",
                kind="evaluate",
                status=status,
                dataset_id=dataset.id,
                base_model="R14x0.5",
                params={"model_id": model_ids[0], "split": "test"},
            )
            session.add(job)
            session.flush()
            evaluation = Evaluation(
                tenant="acme",
                model_id=model_ids[0],
                job_id=job.id,
                dataset_id=dataset.id,
                split="test",
                results=results,
            )
            session.add(evaluation)
            session.flush()
            evaluation_ids.append(evaluation.id)
        return Seeded(
            dataset_id=dataset.id,
            image_ids=[image.id for image in images],
            jobs={status: job.id for status, job in jobs.items()} | jobs_by_kind,
            model_id=model_ids[0],
            plain_model_id=model_ids[1],
            cv_model_id=model_ids[2],
            evaluation_id=evaluation_ids[0],
            running_evaluation_id=evaluation_ids[1],
        )


# --- browser tests ---------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (nothing is downloaded at run time).

    Module-scoped: Playwright's sync API keeps an asyncio loop running in this thread while
    it is open, and later tests that call asyncio.run() must not find it there.
    """
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class LiveDashboard:
    service: LiveService
    admin_key: str
    user_key: str

    @property
    def url(self) -> str:
        return self.service.url


@pytest.fixture(scope="module")
def live_dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDashboard]:
    """The API process and a real worker on the embedded default, with an admin key."""
    home = tmp_path_factory.mktemp("live-dashboard")
    # On the CPU even where a GPU is present: the job must last long enough to be watched.
    service = LiveService(home, service_env(home, BIT_DEVICE="cpu")).start()
    service.start_worker()
    # One installed base model, so the base-models page shows both of its tables.
    npz = make_bit_npz(home / "house.npz", "R14x0.5", 10)
    service.bit("weights", "import", str(npz), "--name", "house-R14x0.5")
    admin_key = service.bit("admin", "create-key", "--role", "admin", "--tenant", "ops")
    try:
        yield LiveDashboard(service, admin_key.splitlines()[-1], service.key)
    finally:
        service.stop()
        if os.environ.get("BIT_TEST_SHOW_LOGS"):
            print(service.logs())


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Screenshots land here (git-ignored), to be looked at."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
