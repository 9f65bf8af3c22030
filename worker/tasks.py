"""Celery tasks: take a job (or webhook delivery) id, run it. Nothing else lives here."""

from __future__ import annotations

from service.settings import get_settings
from worker.celery_app import app, set_current_job, worker_name
from worker.evaluation import run_evaluation_job
from worker.pretrain import run_pretrain_job
from worker.runner import run_finetune_job
from worker.webhook import deliver


@app.task(name="bit.finetune")
def finetune(job_id: int) -> str:
    """Run fine-tuning job `job_id` (resuming from its checkpoint if it has one)."""
    set_current_job(job_id)
    try:
        return run_finetune_job(get_settings(), job_id, worker_name())
    finally:
        set_current_job(None)


@app.task(name="bit.pretrain")
def pretrain(job_id: int) -> str:
    """Run pre-training job `job_id`: launch and supervise its distributed run."""
    set_current_job(job_id)
    try:
        return run_pretrain_job(get_settings(), job_id, worker_name())
    finally:
        set_current_job(None)


@app.task(name="bit.evaluate")
def evaluate(job_id: int) -> str:
    """Run evaluation job `job_id`: the model's report on the images it pinned."""
    set_current_job(job_id)
    try:
        return run_evaluation_job(get_settings(), job_id, worker_name())
    finally:
        set_current_job(None)


@app.task(name="bit.webhook")
def webhook(delivery_id: int) -> str:
    """Make one attempt of webhook delivery `delivery_id` (the next is scheduled by it)."""
    return deliver(get_settings(), delivery_id, worker_name())
