"""Evaluations of models on datasets, run as jobs (table: service.db.models.Evaluation)."""
