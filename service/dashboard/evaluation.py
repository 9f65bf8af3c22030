"""What a model page shows as its evaluation: the validation set, or else its training images.

Jobs fine-tuned on a dataset without a validation split carry no confusion matrix. The
page then evaluates the model on (up to MAX_IMAGES of) the images it was trained on, once,
in the background with the inference cache's predictor, and says so: training-set numbers
flatter a model. Results are kept in memory and under $BIT_HOME/cache, keyed by the
model's weights hash, so a restart does not recompute them.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from bit_core.evaluate import metrics_from_logits
from bit_core.images import ImageDecodeError, ImageSource
from bit_core.predict import Predictor
from service.db.artifacts import ArtifactStore
from service.db.models import Image, Job, Model
from service.db.session import session_factory
from service.inference.cache import ModelRef
from service.inference.threads import run_in_fresh_thread
from service.settings import Settings

log = logging.getLogger(__name__)

MAX_IMAGES = 500  # bounds the work one page view can start
KEPT_IN_MEMORY = 64  # reports; a 1000-class confusion matrix is a million numbers
BATCH = 32


def validation_report(model: Model) -> dict[str, Any] | None:
    """The worker's validation metrics, when the job had a validation set."""
    report = (model.metrics or {}).get("validation")
    if isinstance(report, dict) and report.get("confusion") is not None:
        return report
    return None


ImageRow = tuple[str, str, str]  # label, uri, sha256


def _round_robin(rows: list[ImageRow], limit: int) -> list[ImageRow]:
    """At most `limit` images, taking classes in turn, so every class is seen."""
    by_class: dict[str, list[ImageRow]] = {}
    for row in rows:
        by_class.setdefault(row[0], []).append(row)
    chosen: list[ImageRow] = []
    queues = [iter(items) for _, items in sorted(by_class.items())]
    while queues and len(chosen) < limit:
        alive = []
        for queue in queues:
            item = next(queue, None)
            if item is not None and len(chosen) < limit:
                chosen.append(item)
                alive.append(queue)
        queues = alive
    return chosen


def evaluate_on_training_images(
    settings: Settings,
    store: ArtifactStore,
    predictor: Predictor,
    model_id: int,
) -> dict[str, Any]:
    """The model's metrics on up to MAX_IMAGES of its training images (labels it knows)."""
    with session_factory(settings.database_url)() as session:
        model = session.get(Model, model_id)
        job = session.get(Job, model.job_id) if model and model.job_id else None
        if model is None or job is None or job.dataset_id is None:
            return {"unavailable": "the training images of this model are no longer stored"}
        classes = [str(c) for c in model.classes]
        rows = [
            (label, uri, sha256)
            for label, uri, sha256 in session.execute(
                select(Image.label, Image.uri, Image.sha256)
                .where(Image.dataset_id == job.dataset_id, Image.label.in_(classes))
                .order_by(Image.id)
            )
        ]
    if not rows:
        return {"unavailable": "the training images of this model are no longer stored"}
    chosen = _round_robin(rows, MAX_IMAGES)
    index = {name: i for i, name in enumerate(classes)}
    probabilities, labels, skipped = [], [], 0
    for start in range(0, len(chosen), BATCH):
        batch = chosen[start : start + BATCH]
        try:
            sources: list[ImageSource] = [
                str(store.cached_file(uri, sha256)) for _, uri, sha256 in batch
            ]
            pixels = predictor.preprocess(sources)
        except (ImageDecodeError, OSError, ValueError):
            skipped += len(batch)  # a file lost from the store must not hide the rest
            continue
        probabilities.append(predictor.probabilities(pixels))
        labels += [index[label] for label, _, _ in batch]
    if not labels:
        return {"unavailable": "none of the training images could be read"}
    # log-probabilities are logits up to a constant per row: same argmax, same loss.
    logits = torch.cat(probabilities).clamp_min(1e-12).log()
    report = metrics_from_logits(logits, torch.tensor(labels), classes).summary()
    report.update(source="training", evaluated=len(labels), available=len(rows), skipped=skipped)
    return report


class TrainingEvaluations:
    """Evaluations on training images, computed once per model in the background.

    Each runs on a fresh thread that exits when done (see service/inference/threads.py),
    one at a time, so evaluations queue up instead of competing with predictions for CPU.
    """

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._lock = threading.Lock()
        self._done: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._running: dict[str, Future[None]] = {}
        self._one_at_a_time = threading.Lock()
        self._closed = False

    def _path(self, key: str) -> Path:
        return self.cache_dir / f"eval-{key}.json"

    def get(self, ref: ModelRef, compute: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """The finished report, or None while it is computed (started on first call)."""
        key = f"{ref.id}-{ref.sha256[:16]}"
        with self._lock:
            if key in self._done:
                self._done.move_to_end(key)
                return self._done[key]
            path = self._path(key)
            if path.exists():
                try:
                    return self._keep(key, json.loads(path.read_text()))
                except (OSError, ValueError):
                    pass  # unreadable cache file: compute again
            if key not in self._running:
                self._running[key] = run_in_fresh_thread(
                    lambda: self._run(key, compute), name="bit-dashboard-eval"
                )
            return None

    def _keep(self, key: str, report: dict[str, Any]) -> dict[str, Any]:
        self._done[key] = report  # callers hold the lock
        while len(self._done) > KEPT_IN_MEMORY:
            self._done.popitem(last=False)
        return report

    def _run(self, key: str, compute: Callable[[], dict[str, Any]]) -> None:
        with self._one_at_a_time:
            if self._closed:
                return
            self._compute_and_keep(key, compute)

    def _compute_and_keep(self, key: str, compute: Callable[[], dict[str, Any]]) -> None:
        try:
            report = compute()
        except Exception as exc:
            log.exception("evaluation of model %s on its training images failed", key)
            # Kept in memory only: the page stops asking, and a restart tries again.
            with self._lock:
                self._keep(key, {"unavailable": f"the evaluation failed ({exc})"})
                self._running.pop(key, None)
            return
        with self._lock:
            self._keep(key, report)
            self._running.pop(key, None)
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            temp = self._path(key).with_suffix(".tmp")
            temp.write_text(json.dumps(report))
            temp.replace(self._path(key))
        except OSError:
            log.warning("could not keep the evaluation of model %s on disk", key, exc_info=True)

    def close(self) -> None:
        """Start no more evaluations; one running finishes on its own thread."""
        self._closed = True
