"""Celery worker: runs fine-tuning and pre-training jobs by id."""
