"""`JobStatus`: the states of a job, and the sets of them the code asks about.

Dependency-free, so that `service.db.models` can use it for the column default. The column
stays a String: a member is its string value, so it compares and binds like one. Which
moves between these states are allowed, and who makes them, is `service.jobs.lifecycle`'s.
"""

from __future__ import annotations

import enum


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A job in one of these states may still run (or is running): it holds or may take a lease,
# and it still reads its dataset.
ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING})
# Final states: a run never starts again unless the job is retried.
TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
# The final states a retry starts again from.
RETRYABLE = frozenset({JobStatus.FAILED, JobStatus.CANCELLED})
