"""The table of job status edges, walked pair by pair (STYLE 13): an allowed edge changes
the row and writes one event; a refused one raises InvalidTransition and changes nothing."""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import func, select

from service.db.models import Job, JobEvent
from service.db.session import session_scope
from service.jobs.lifecycle import EDGES, InvalidTransition, transition
from service.jobs.status import ACTIVE, RETRYABLE, TERMINAL, JobStatus
from service.settings import Settings

PAIRS = list(itertools.product(JobStatus, JobStatus))
ALLOWED = {
    (JobStatus.QUEUED, JobStatus.CANCELLED),
    (JobStatus.QUEUED, JobStatus.RUNNING),
    (JobStatus.RUNNING, JobStatus.CANCELLING),
    (JobStatus.RUNNING, JobStatus.SUCCEEDED),
    (JobStatus.RUNNING, JobStatus.FAILED),
    (JobStatus.RUNNING, JobStatus.CANCELLED),
    (JobStatus.RUNNING, JobStatus.QUEUED),
    (JobStatus.CANCELLING, JobStatus.CANCELLED),
    (JobStatus.CANCELLING, JobStatus.SUCCEEDED),
    (JobStatus.CANCELLING, JobStatus.FAILED),
    (JobStatus.FAILED, JobStatus.QUEUED),
    (JobStatus.CANCELLED, JobStatus.QUEUED),
}


def test_the_table_is_the_documented_one():
    assert {(a, b) for a, targets in EDGES.items() for b in targets} == ALLOWED
    assert set(EDGES) == set(JobStatus)
    assert set(JobStatus) == ACTIVE | TERMINAL and not ACTIVE & TERMINAL
    assert RETRYABLE <= TERMINAL
    assert all(not EDGES[s] - {JobStatus.QUEUED} for s in TERMINAL)  # only a retry leaves


@pytest.mark.parametrize(("source", "target"), PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_every_pair_of_statuses(settings: Settings, source: JobStatus, target: JobStatus):
    with session_scope(settings.database_url) as session:
        job = Job(tenant="acme", kind="finetune", base_model="R14x0.5", params={})
        job.status = source
        session.add(job)
        session.commit()
        if (source, target) in ALLOWED:
            assert transition(session, job, target, event="moved")
            session.commit()
            assert job.status == target
            kinds = session.scalars(select(JobEvent.kind).where(JobEvent.job_id == job.id))
            assert list(kinds) == ["moved"]
        else:
            with pytest.raises(InvalidTransition) as caught:
                transition(session, job, target)
            assert caught.value.job_id == job.id
            assert (caught.value.source, caught.value.target) == (source, target)
            assert f"job {job.id}: {source} -> {target}" in str(caught.value)
            session.rollback()
            assert session.get(Job, job.id, populate_existing=True).status == source
            events = session.scalar(select(func.count()).where(JobEvent.job_id == job.id))
            assert events == 0


def test_a_fenced_transition_of_a_run_that_lost_its_lease_changes_nothing(settings: Settings):
    with session_scope(settings.database_url) as session:
        job = Job(tenant="acme", kind="finetune", base_model="R14x0.5", params={})
        job.status, job.lease_owner = JobStatus.RUNNING, "worker-b"
        session.add(job)
        session.commit()
        assert not transition(session, job, JobStatus.SUCCEEDED, owner="worker-a")
        assert not transition(session, job, JobStatus.SUCCEEDED, unleased=True)
        assert not transition(session, job, JobStatus.QUEUED, only_from={JobStatus.QUEUED})
        assert transition(session, job, JobStatus.SUCCEEDED, owner="worker-b")
        session.commit()
        kinds = session.scalars(select(JobEvent.kind).where(JobEvent.job_id == job.id))
        assert list(kinds) == [JobStatus.SUCCEEDED]
