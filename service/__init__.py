"""The BiT service: HTTP API, auth, inference and the database layer shared with workers."""
