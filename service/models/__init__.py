"""Trained models: schemas and service functions (table: service.db.models.Model)."""
