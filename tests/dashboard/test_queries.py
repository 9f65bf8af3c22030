"""The dashboard's building blocks: queue depths on Redis, heat-map cells, formatting."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from bit_core.quality import precision_recall_curve
from service.dashboard.curves import RELIABILITY_BOX, reliability_bars, value_at
from service.dashboard.evaluation import _thin, model_quality, report_view, training_metrics
from service.dashboard.heatmap import MAX_HEATMAP_CLASSES, heatmap, top_confusions
from service.dashboard.queries import holdout_of, plan_rows, queue_depths
from service.dashboard.templating import duration
from service.db.models import Model
from service.queueing import celery_client, enqueue_job, enqueue_webhook
from tests.service.conftest import REDIS_URL, make_settings


@pytest.mark.services
def test_queue_depths_count_the_messages_waiting_in_redis(tmp_path: Path):
    settings = make_settings(
        tmp_path, broker_url=REDIS_URL, broker_key_prefix=f"bit-dash-{uuid.uuid4().hex[:8]}:"
    )
    for job_id, kind in ((1, "finetune"), (2, "finetune"), (3, "pretrain")):
        enqueue_job(settings, job_id, kind)
    enqueue_webhook(settings, 1)
    try:
        assert queue_depths(settings) == {"finetune": 2, "pretrain": 1, "webhooks": 1}
    finally:
        with celery_client(settings).connection_for_write() as connection:
            for queue in celery_client(settings).conf.task_queues:
                queue(connection.default_channel).purge()


def test_a_broker_that_is_down_reads_unreachable_without_hanging_the_page(tmp_path: Path):
    settings = make_settings(tmp_path, broker_url="redis://127.0.0.1:1/0")
    began = time.monotonic()
    assert queue_depths(settings) == {"finetune": None, "pretrain": None, "webhooks": None}
    assert time.monotonic() - began < 10


def test_heatmap_cells_are_coloured_by_their_share_of_the_row():
    drawn = heatmap([[8, 2], [0, 0]], ["cat", "dog"])
    assert drawn is not None and len(drawn.cells) == 4 and drawn.show_counts
    cat_cat, cat_dog, dog_cat, _ = drawn.cells
    assert cat_cat.fill != cat_dog.fill and cat_cat.ink == "#ffffff" and cat_dog.ink != "#ffffff"
    assert dog_cat.fill == "#f7fbff"  # an empty row is all lightest, not a division by zero
    assert cat_dog.title == "true cat, predicted dog: 2 (20%)"
    assert drawn.width > drawn.left + 2 * drawn.cell  # room for the rotated last label


def test_matrices_too_large_to_draw_list_their_top_confusions():
    n = MAX_HEATMAP_CLASSES + 1
    classes = [f"c{i}" for i in range(n)]
    confusion = [[10 if i == j else 0 for j in range(n)] for i in range(n)]
    confusion[3][4], confusion[5][1] = 7, 2
    assert heatmap(confusion, classes) is None
    assert top_confusions(confusion, classes) == [("c3", "c4", 7), ("c5", "c1", 2)]


def test_plans_flatten_into_readable_rows():
    rows = plan_rows(
        {
            "base_lr": 0.00300000001,
            "supports": [100, 200],
            "overrides": {"batch_size": 16},
            "plan": {},
            "classes": [f"k{i}" for i in range(20)],
        }
    )
    assert rows[:4] == [
        ("base_lr", "0.003"),
        ("supports", "100, 200"),
        ("overrides.batch_size", "16"),
        ("plan", "—"),
    ]
    assert rows[4][1].endswith("… (20 classes)")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "—"),
        (-1, "—"),
        (float("nan"), "—"),
        (12.4, "12 s"),
        (245, "4 min 05 s"),
        (7800, "2 h 10 min"),
        (90000, "1 d 1 h"),
    ],
)
def test_durations_read_like_a_person_writes_them(seconds, text):
    assert duration(seconds) == text


def test_a_threshold_reads_the_stored_curve_like_predictions_at_that_threshold():
    rng = np.random.default_rng(0)
    positives = rng.random(200) < 0.3
    scores = np.clip(0.35 * positives + rng.random(200) * 0.65, 0, 1).round(3)  # with ties
    precision, recall, thresholds = precision_recall_curve(scores, positives)
    curve = {"precision": precision.tolist(), "recall": recall.tolist(),
             "thresholds": thresholds.tolist()}  # fmt: skip
    for t in np.linspace(thresholds.min(), thresholds.max(), 37):
        predicted = scores >= t  # what a prediction at threshold t would keep
        tp = int((predicted & positives).sum())
        expected = (tp / predicted.sum(), tp / positives.sum())
        assert value_at(curve, float(t)) == pytest.approx(expected), t
    assert value_at(curve, float(thresholds.max()) + 1e-6) == (None, 0.0)  # nothing kept


def test_thinned_curves_keep_their_ends_and_stay_aligned():
    thresholds = [i / 1000 for i in range(1000)]
    curve = {
        "precision": [t / 2 for t in thresholds] + [1.0],
        "recall": [1 - t for t in thresholds] + [0.0],
        "thresholds": thresholds,
    }
    thin = _thin(curve, 100)
    assert len(thin["thresholds"]) == 100 and len(thin["precision"]) == 101
    assert thin["precision"][-1] == 1.0 and thin["recall"][-1] == 0.0
    for p, r, t in zip(thin["precision"], thin["recall"], thin["thresholds"], strict=False):
        assert (p, r) == (t / 2, 1 - t)
    assert _thin(curve, 5000) == curve


def test_reliability_bars_skip_empty_bins_and_sit_on_the_axis():
    bins = [
        {"lower": 0.0, "upper": 0.5, "count": 0, "confidence": 0.0, "accuracy": 0.0},
        {"lower": 0.5, "upper": 1.0, "count": 4, "confidence": 0.8, "accuracy": 0.5},
    ]
    [bar] = reliability_bars(bins)
    assert bar.y + bar.height == RELIABILITY_BOX.y(0.0)
    assert bar.y == RELIABILITY_BOX.y(0.5) and bar.confidence_y == RELIABILITY_BOX.y(0.8)
    assert "4 images" in bar.title


def test_accuracy_on_training_images_is_left_out_of_the_training_metrics():
    metrics = {"train_loss": 0.2, "train_top1": 1.0, "train_accuracy": 1.0, "val_top1": 0.8}
    assert training_metrics(metrics) == {"train_loss": 0.2, "val_top1": 0.8}


def test_a_job_hold_out_is_summarised():
    params = {"holdout": {"source": "auto", "fraction": 0.2, "seed": 0, "val_image_ids": [4, 9]}}
    assert holdout_of(params) == {"source": "auto", "count": 2, "fraction": 0.2, "seed": 0}
    assert holdout_of({}) is None
    assert ("holdout.val_image_ids", "2 images") in plan_rows(params)


def test_older_models_and_reports_still_read():
    validation = {
        "count": 6,
        "top1": 0.5,
        "top5": 1.0,
        "classes": ["a", "b"],
        "confusion": [[2, 1], [2, 1]],
        "per_class": {"a": {"precision": 0.5}},
    }
    legacy = Model(metrics={"train_loss": 0.3, "validation": validation})
    quality = model_quality(legacy)
    assert quality["kind"] == "holdout" and quality["count"] == 6
    view = report_view(quality["report"], threshold=None)
    assert view["curves"] == {} and "calibration" not in view  # drawn as "no curves stored"
    assert [row["support"] for row in view["rows"]] == [3, 3]  # from the confusion rows
    assert model_quality(Model(metrics={"train_loss": 0.3}))["kind"] == "none"
