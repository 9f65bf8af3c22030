"""The dashboard's building blocks: queue depths on Redis, heat-map cells, formatting."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from service.dashboard.evaluation import _round_robin
from service.dashboard.heatmap import MAX_HEATMAP_CLASSES, heatmap, top_confusions
from service.dashboard.queries import plan_rows, queue_depths
from service.dashboard.templating import duration
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


def test_the_training_image_sample_takes_every_class_in_turn():
    rows = [("a", f"a{i}", f"sha-a{i}") for i in range(10)]
    rows += [("b", "b0", "sha-b0"), ("c", "c0", "sha-c0"), ("c", "c1", "sha-c1")]
    chosen = _round_robin(rows, 5)
    assert [label for label, _, _ in chosen] == ["a", "b", "c", "a", "c"]
    assert len(_round_robin(rows, 100)) == len(rows)
