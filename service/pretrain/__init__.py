"""Upstream pre-training jobs: requests, plans, data sources."""
