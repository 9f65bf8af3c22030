"""Database and artifact storage: shared by the API and the workers (never the reverse)."""
