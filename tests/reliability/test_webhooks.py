"""Webhooks as a careful operator tries them: refused destinations (literal, through DNS,
through a redirect, through DNS rebinding), signatures (replay, staleness, rotation), the
startup check of the secret, and delivery across a receiver that is down, a lost message
and a worker killed with kill -9 mid-POST: every final status called back exactly once.

Only loopback traffic: a refused destination is refused before any connection, which each
test proves with a spy on the POST and, where the destination is on loopback, with a
listening socket that must see no connection."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import func, select

import worker.webhook
from service.app import create_app
from service.cli import worker_command
from service.db.models import AuditEvent, Job, WebhookAttempt, WebhookDelivery, utcnow
from service.db.session import session_scope
from service.jobs.lifecycle import JobStatus, finish, take_lease
from service.queueing import celery_client
from service.settings import Settings
from service.webhooks import (
    MIN_SECRET_CHARS,
    AllowList,
    DestinationRefused,
    WebhookSettingsError,
    check_webhook_settings,
    sign,
    verify,
)
from service.webhooks.destination import check_destination
from service.webhooks.outbox import send_pending
from tests.dashboard.conftest import csrf_of, sign_in
from tests.factories import png_bytes
from tests.polling import free_port, wait_for
from tests.reliability import figures
from tests.service.conftest import REDIS_URL, migrated_settings, new_key, snapshot, upload
from tests.worker.webhook_receiver import webhook_receiver
from worker.reconciler import queue_depths, reconcile_webhooks
from worker.webhook import deliver

SECRET = "reliability-webhook-secret-0123456789abcdef"
OLD_SECRET = "the-previous-webhook-secret-9876543210fedcba"
HOOKS = {
    "webhook_secret": SECRET,
    "webhook_allow": "127.0.0.1",
    "webhook_backoff_s": 0.05,
    "webhook_backoff_max_s": 0.2,
    "webhook_timeout_s": 5.0,
}

# Every kind of address a callback must never reach, as a literal in the URL, with the
# words the refusal names it by.
REFUSED_LITERALS = [
    ("http://127.0.0.1/hook", "loopback"),
    ("http://127.1/hook", "loopback"),  # short form
    ("http://2130706433/hook", "loopback"),  # decimal
    ("http://0x7f000001/hook", "loopback"),  # hexadecimal
    ("http://[::1]/hook", "loopback"),
    ("http://0.0.0.0/hook", "this network"),
    ("http://0.1.2.3/hook", "this network"),
    ("http://10.0.0.1/hook", "private"),
    ("http://172.16.0.1/hook", "private"),
    ("http://192.168.1.1/hook", "private"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://169.254.1.1/hook", "link-local"),
    ("http://100.64.0.1/hook", "carrier-grade NAT"),
    ("http://100.100.100.200/hook", "carrier-grade NAT"),  # a cloud's metadata address
    ("http://192.0.0.192/hook", "IETF protocol"),  # another cloud's metadata address
    ("http://168.63.129.16/hook", "host service"),
    ("http://192.0.2.1/hook", "private"),  # documentation
    ("http://198.18.0.1/hook", "private"),  # benchmarking
    ("http://224.0.0.1/hook", "multicast"),
    ("http://239.255.255.250/hook", "multicast"),
    ("http://240.0.0.1/hook", "private"),  # reserved for future use
    ("http://255.255.255.255/hook", "private"),  # broadcast
    ("http://[::]/hook", "unspecified"),
    ("http://[::ffff:127.0.0.1]/hook", "embedding 127.0.0.1, which is loopback"),
    ("http://[::ffff:169.254.169.254]/hook", "embedding 169.254.169.254"),
    ("http://[::ffff:10.0.0.1]/hook", "embedding 10.0.0.1"),
    ("http://[::127.0.0.1]/hook", "reserved"),  # IPv4-compatible (deprecated)
    ("http://[2002:7f00:1::1]/hook", "embedding 127.0.0.1"),  # 6to4
    ("http://[64:ff9b::a9fe:a9fe]/hook", "embedding 169.254.169.254"),  # NAT64
    ("http://[fe80::1]/hook", "link-local"),
    ("http://[fc00::1]/hook", "private"),
    ("http://[fd00:ec2::254]/hook", "cloud metadata"),
    ("http://[fec0::1]/hook", "site-local"),
    ("http://[ff02::1]/hook", "multicast"),
    ("http://[2001:db8::1]/hook", "private"),  # documentation
    ("http://[2001::1]/hook", "Teredo"),
    ("http://[100::1]/hook", "private"),  # discard-only
    ("https://127.0.0.1:8443/hook", "loopback"),
]

# Names, and what a (fake) DNS answers for them; "localhost" is the real resolver's.
REFUSED_NAMES = {
    "hooks.internal.example": ["10.0.0.5"],
    "metadata.example": ["169.254.169.254"],
    "v6-loopback.example": ["::1"],
    "mapped.example": ["::ffff:192.168.0.10"],
    # One public and one private address: the connection could use either, so refused.
    "mixed.example": ["93.184.216.34", "127.0.0.1"],
    "localhost": [],
}
PUBLIC = {"public.example": ["93.184.216.34"], "public6.example": ["2606:2800:220:1::1"]}


def hooks(settings: Settings, **overrides: Any) -> Settings:
    return settings.model_copy(update={**HOOKS, **overrides})


class FakeDns:
    """socket.getaddrinfo for the whole process, answering for the names it is given
    (a list of answers per name is used in turn, the last one repeatedly) and passing
    everything else to the real resolver; it counts the questions."""

    def __init__(self, real: Callable[..., Any], answers: dict[str, list[list[str]]]) -> None:
        self.real, self.answers = real, answers
        self.asked: list[str] = []

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in self.answers:
            return self.real(host, port, *args, **kwargs)
        self.asked.append(name)
        queue = self.answers[name]
        addresses = queue.pop(0) if len(queue) > 1 else queue[0]
        infos: list[tuple[Any, ...]] = []
        for address in addresses:
            if ipaddress.ip_address(address).version == 6:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return infos


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, list[list[str]]]], FakeDns]:
    def install(answers: dict[str, list[list[str]]]) -> FakeDns:
        dns = FakeDns(socket.getaddrinfo, answers)
        monkeypatch.setattr(socket, "getaddrinfo", dns)
        return dns

    return install


@pytest.fixture
def posts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The destinations the worker POSTed to (the real POST still happens)."""
    seen: list[str] = []
    real = worker.webhook.post

    def spy(destination: Any, *args: Any, **kwargs: Any) -> int:
        seen.append(destination.url)
        return real(destination, *args, **kwargs)

    monkeypatch.setattr(worker.webhook, "post", spy)
    return seen


def ended_job(settings: Settings, url: str, status: JobStatus = JobStatus.FAILED) -> int:
    """A job that ran and ended with `status`, with `url` as its callback (stored as is,
    as if it had passed the check at creation); the id of its webhook delivery."""
    with session_scope(settings.database_url) as session:
        job = Job(tenant="acme", kind="finetune", base_model="R14x0.5", callback_url=url)
        session.add(job)
        session.flush()
        session.commit()
        assert take_lease(session, job.id, "w0", 60) is not None
        assert finish(session, job, status, owner="w0", error="it broke", error_code="boom")
        session.commit()
        ids = list(
            session.scalars(select(WebhookDelivery.id).where(WebhookDelivery.job_id == job.id))
        )
    assert len(ids) == 1
    return ids[0]


def delivery(settings: Settings, delivery_id: int) -> WebhookDelivery:
    with session_scope(settings.database_url) as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        return row


def attempts(settings: Settings, delivery_id: int) -> list[WebhookAttempt]:
    with session_scope(settings.database_url) as session:
        query = select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id)
        return list(session.scalars(query.order_by(WebhookAttempt.id)))


def make_due(settings: Settings, delivery_id: int) -> None:
    """Skip the backoff's wait (its length is tested on its own)."""
    with session_scope(settings.database_url) as session:
        session.execute(
            sa.update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(next_attempt_at=utcnow() - dt.timedelta(seconds=1))
        )


def refused_at_creation(client: TestClient, headers: dict[str, str], url: str) -> str:
    """POST /v1/finetune with `url` as callback: the 422's message (any other answer fails)."""
    response = client.post(
        "/v1/finetune", json={"dataset_id": 1, "callback_url": url}, headers=headers
    )
    assert response.status_code == 422, (url, response.text)
    error = response.json()["error"]
    assert error["code"] == "callback_url_refused", (url, error)
    assert "BIT_WEBHOOK_ALLOW" in error["message"], error
    return str(error["message"])


def refused_at_send(settings: Settings, url: str, posts: list[str]) -> str:
    """A delivery to `url` is attempted: the attempt's error (no POST may have happened)."""
    delivery_id = ended_job(settings, url)
    assert deliver(settings, delivery_id, "w1") == "pending"  # retried later, never sent
    (attempt,) = attempts(settings, delivery_id)
    assert attempt.status_code is None and (attempt.error or "").startswith("refused: ")
    assert posts == [], posts
    return attempt.error or ""


@pytest.fixture
def api(sqlite_settings: Settings) -> Iterator[tuple[TestClient, Settings, dict[str, str]]]:
    """The app with webhooks on and an empty allow-list, and a user key's headers."""
    settings = hooks(sqlite_settings, webhook_allow="")
    headers = {"Authorization": f"Bearer {new_key(settings)}"}
    with TestClient(create_app(settings)) as client:
        yield client, settings, headers


# --- where a webhook may go ------------------------------------------------------------------


def test_every_refused_literal_address_is_refused_at_creation_and_at_send(
    api: tuple[TestClient, Settings, dict[str, str]], posts: list[str]
):
    client, settings, headers = api
    for url, why in REFUSED_LITERALS:
        assert why in refused_at_creation(client, headers, url), url
        assert why in refused_at_send(settings, url, posts), url
    figures.add("webhook destinations refused", len(REFUSED_LITERALS))
    for url in ("ftp://example.com/x", "file:///etc/passwd", "gopher://example.com/"):
        with pytest.raises(DestinationRefused, match="scheme must be http or https"):
            check_destination(url, AllowList())


def test_a_loopback_receiver_that_is_not_allowed_sees_no_connection(
    sqlite_settings: Settings, posts: list[str]
):
    settings = hooks(sqlite_settings, webhook_allow="")
    with webhook_receiver() as receiver:
        assert "loopback" in refused_at_send(settings, receiver.url, posts)
    assert receiver.connections == 0 and receiver.received == []
    figures.add("webhook destinations refused")


def test_names_that_resolve_to_refused_addresses_are_refused(
    api: tuple[TestClient, Settings, dict[str, str]],
    posts: list[str],
    fake_dns: Callable[[dict[str, list[list[str]]]], FakeDns],
):
    client, settings, headers = api
    fake = {name: [addresses] for name, addresses in REFUSED_NAMES.items() if addresses}
    dns = fake_dns({**fake, **{name: [a] for name, a in PUBLIC.items()}})
    for name in REFUSED_NAMES:
        url = f"https://{name}/hooks/bit"
        message = refused_at_creation(client, headers, url)
        assert f"{name} resolves to" in message, message
        assert "resolves to" in refused_at_send(settings, url, posts), url
    assert set(dns.asked) == set(fake)  # each name was looked up, by the check itself
    for name in PUBLIC:  # a public name passes, pinned to the address it resolved to
        checked = check_destination(f"https://{name}/x", AllowList())
        assert checked.address == PUBLIC[name][0] and checked.port == 443
    figures.add("webhook destinations refused", len(REFUSED_NAMES))


def test_the_allow_list_opens_hosts_and_networks_and_nothing_else(
    fake_dns: Callable[[dict[str, list[list[str]]]], FakeDns],
):
    fake_dns({"hooks.internal": [["10.1.2.3"]], "other.internal": [["10.1.2.3"]]})
    allow = AllowList.parse("hooks.internal, 192.168.7.0/24, 127.0.0.1")
    assert check_destination("http://hooks.internal:8080/x", allow).address == "10.1.2.3"
    assert check_destination("http://192.168.7.9/x", allow).address == "192.168.7.9"
    assert check_destination("http://127.0.0.1:9/x", allow).address == "127.0.0.1"
    for url in ("http://other.internal/x", "http://192.168.8.1/x", "http://127.0.0.2/x"):
        with pytest.raises(DestinationRefused, match="BIT_WEBHOOK_ALLOW"):
            check_destination(url, allow)
    with pytest.raises(ValueError, match="neither a hostname"):
        AllowList.parse("http://hooks.internal/")


def test_a_redirect_is_a_failed_attempt_and_its_target_sees_nothing(
    sqlite_settings: Settings, posts: list[str]
):
    settings = hooks(sqlite_settings)  # 127.0.0.1 allowed; 127.0.0.2 is not
    codes = [301, 302, 303, 307, 308]
    with (
        webhook_receiver("127.0.0.2") as target,
        webhook_receiver(answers=codes, location=target.url) as receiver,
    ):
        for code in codes:
            delivery_id = ended_job(settings, receiver.url)
            assert deliver(settings, delivery_id, "w1") == "pending"
            (attempt,) = attempts(settings, delivery_id)
            assert attempt.status_code == code, attempt.error
            assert "redirects are not followed" in (attempt.error or "")
    assert len(receiver.received) == len(codes) and len(posts) == len(codes)
    assert target.connections == 0 and target.received == []
    figures.add("webhook destinations refused", len(codes))


def test_dns_rebinding_cannot_move_the_connection(
    sqlite_settings: Settings,
    posts: list[str],
    fake_dns: Callable[[dict[str, list[list[str]]]], FakeDns],
):
    # 127.0.0.2 stands for a public address (allowed); 127.0.0.1 for the private one that
    # a rebinding name answers on the second lookup (not allowed). The fake DNS serves the
    # whole process: a second lookup at connect time would get 127.0.0.1.
    settings = hooks(sqlite_settings, webhook_allow="127.0.0.2")
    port = free_port()
    with (
        webhook_receiver("127.0.0.2", port=port) as good,
        webhook_receiver("127.0.0.1", port=port) as evil,
    ):
        url = f"http://rebind.example:{port}/hook"
        dns = fake_dns({"rebind.example": [["127.0.0.2"], ["127.0.0.1"]]})
        delivery_id = ended_job(settings, url)
        assert deliver(settings, delivery_id, "w1") == "delivered"
        assert dns.asked == ["rebind.example"]  # one lookup: the check's, then pinned
        (received,) = good.received
        assert received.headers["Host"] == f"rebind.example:{port}"
        assert evil.connections == 0

        # Rebound between creation and send: the send's own check refuses the new address.
        later = ended_job(settings, url)
        assert deliver(settings, later, "w1") == "pending"
        assert "127.0.0.1, which is loopback" in (attempts(settings, later)[0].error or "")
        assert evil.connections == 0 and len(good.received) == 1
    figures.add("webhook destinations refused")


# --- signatures ----------------------------------------------------------------------------------


def test_signatures_refuse_replays_stale_and_tampered_requests():
    body = b'{"id":"evt_1","type":"job.succeeded"}'
    now = 1_800_000_000
    header = sign([SECRET], body, timestamp=now)
    assert header.startswith(f"t={now},v1=")
    assert verify([SECRET], header, body, now=now + 299)
    refused = {
        "replayed after the tolerance": verify([SECRET], header, body, now=now + 301),
        "stale when signed": verify(
            [SECRET], sign([SECRET], body, timestamp=now - 3600), body, now=now
        ),
        "from the future": verify(
            [SECRET], sign([SECRET], body, timestamp=now + 3600), body, now=now
        ),
        "timestamp changed": verify(
            [SECRET], header.replace(f"t={now}", f"t={now + 1}"), body, now=now
        ),
        "body changed": verify([SECRET], header, body.replace(b"succeeded", b"failed"), now=now),
        "another secret": verify(["x" * MIN_SECRET_CHARS], header, body, now=now),
        "no timestamp": verify([SECRET], header.split(",", 1)[1], body, now=now),
        "no signature": verify([SECRET], f"t={now}", body, now=now),
        "empty": verify([SECRET], "", body, now=now),
    }
    assert not any(refused.values()), refused
    figures.add("webhook signatures refused", len(refused))


def test_during_a_rotation_both_secrets_verify():
    body, now = b'{"id":"evt_2"}', 1_800_000_000
    both = sign([SECRET, OLD_SECRET], body, timestamp=now)
    assert both.count("v1=") == 2
    assert verify([SECRET], both, body, now=now)  # a receiver already on the new secret
    assert verify([OLD_SECRET], both, body, now=now)  # one still on the old secret
    assert verify([SECRET, OLD_SECRET], sign([OLD_SECRET], body, timestamp=now), body, now=now)
    assert not verify([SECRET], sign([OLD_SECRET], body, timestamp=now), body, now=now)


def test_startup_refuses_a_missing_or_short_secret(sqlite_settings: Settings, tmp_path: Path):
    short = "s" * (MIN_SECRET_CHARS - 1)
    refused: list[dict[str, Any]] = [
        {"webhook_secret": short},
        {"webhooks_enabled": True},
        {"webhook_secret": SECRET, "webhook_secret_previous": short},
        {"webhook_secret": SECRET, "webhook_allow": "not a host/"},
    ]
    for values in refused:
        with pytest.raises(WebhookSettingsError, match="BIT_WEBHOOK"):
            create_app(sqlite_settings.model_copy(update=values))
    started: list[dict[str, Any]] = [
        {},
        {"webhook_secret": SECRET},
        {"webhook_secret": short, "webhooks_enabled": False},
    ]
    for values in started:
        check_webhook_settings(sqlite_settings.model_copy(update=values))
    env = {**os.environ, "BIT_HOME": str(tmp_path), "BIT_WEBHOOK_SECRET": short}
    for command in (
        [sys.executable, "-m", "service", "worker", "--queues", "webhooks"],
        [sys.executable, "-c", "import worker.celery_app"],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0, done
        assert f"at least {MIN_SECRET_CHARS} characters" in done.stderr, done.stderr[-2000:]
    figures.add("webhook secret settings refused at startup", len(refused) + 2)


def test_a_callback_url_with_webhooks_off_is_refused_and_nothing_is_kept(
    sqlite_settings: Settings,
):
    headers = {"Authorization": f"Bearer {new_key(sqlite_settings)}"}
    before = snapshot(sqlite_settings)
    with TestClient(create_app(sqlite_settings)) as client:
        response = client.post(
            "/v1/finetune",
            json={"dataset_id": 1, "callback_url": "https://example.com/h"},
            headers=headers,
        )
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "webhooks_disabled"
        images = [(f"{i}.png", png_bytes(i), f"c{i % 2}") for i in range(4)]
        response = upload(
            client,
            headers,
            images,
            url="/v1/finetune/upload",
            base_model="R14x0.5",
            callback_url="https://example.com/h",
        )
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "webhooks_disabled"
    assert snapshot(sqlite_settings) == before


# --- delivery ------------------------------------------------------------------------------------


def test_delivery_is_retried_across_a_receiver_that_is_down(settings: Settings, posts: list[str]):
    settings = hooks(settings)
    port = free_port()  # nothing listens there yet: the receiver is down
    delivery_id = ended_job(settings, f"http://127.0.0.1:{port}/hook")
    assert deliver(settings, delivery_id, "w1") == "pending"
    assert queue_depths(celery_client(settings))["webhooks"] == 1  # the retry is scheduled
    row = delivery(settings, delivery_id)
    assert row.next_attempt_at is not None and row.next_attempt_at > row.created_at
    with webhook_receiver(port=port, answers=[500, 503]) as receiver:
        outcomes = []
        for _ in range(3):
            make_due(settings, delivery_id)
            outcomes.append(deliver(settings, delivery_id, "w1"))
        assert deliver(settings, delivery_id, "w1") == "skipped"  # delivered: never again
    assert outcomes == ["pending", "pending", "delivered"]
    log = attempts(settings, delivery_id)
    assert [a.status_code for a in log] == [None, 500, 503, 204]
    assert "ConnectError" in (log[0].error or "") and all(a.duration_ms >= 0 for a in log)
    assert {d.event_id for d in receiver.received} == {delivery(settings, delivery_id).event_id}
    for received in receiver.received:
        assert verify([SECRET], received.signature, received.body)
    with session_scope(settings.database_url) as session:
        job = session.scalar(select(Job).join(WebhookDelivery, WebhookDelivery.job_id == Job.id))
        assert job is not None and job.callback_status == "delivered"
    figures.add("webhook deliveries retried to success")


def test_a_delivery_gives_up_after_its_retry_window(sqlite_settings: Settings):
    settings = hooks(sqlite_settings)
    delivery_id = ended_job(settings, f"http://127.0.0.1:{free_port()}/hook")
    with session_scope(settings.database_url) as session:
        session.execute(
            sa.update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(give_up_at=utcnow() - dt.timedelta(seconds=1))
        )
    assert deliver(settings, delivery_id, "w1") == "failed"
    assert queue_depths(celery_client(settings))["webhooks"] == 0  # no further attempt
    with session_scope(settings.database_url) as session:
        assert session.scalar(select(Job.callback_status)) == "failed"


def test_the_backoff_doubles_up_to_its_cap_with_full_jitter():
    from service.webhooks.outbox import backoff_s

    ceilings = [backoff_s(n, 10, 3600, rng=lambda: 1.0) for n in range(1, 12)]
    assert ceilings[:4] == [10, 20, 40, 80] and ceilings[-1] == 3600
    assert backoff_s(5, 10, 3600, rng=lambda: 0.0) == 0.0  # jitter spans down to zero


def test_the_reconciler_resends_a_lost_message_once(settings: Settings):
    settings = hooks(settings, queued_grace_s=0.0)
    held = ended_job(settings, "http://127.0.0.1:9/hook")  # a live worker is on it
    with session_scope(settings.database_url) as session:
        session.execute(
            sa.update(WebhookDelivery)
            .where(WebhookDelivery.id == held)
            .values(lease_owner="live", lease_expires_at=utcnow() + dt.timedelta(seconds=60))
        )
    lost = ended_job(settings, "http://127.0.0.1:9/hook")  # never enqueued: its message lost
    with session_scope(settings.database_url) as session:
        assert reconcile_webhooks(session, settings) == [lost]
        # Its message now waits in the queue: the next pass sends nothing more.
        assert reconcile_webhooks(session, settings) == []
    assert queue_depths(celery_client(settings))["webhooks"] == 1


def test_each_final_status_calls_back_exactly_once(
    settings: Settings, user_headers: dict[str, str], admin_headers: dict[str, str]
):
    settings = hooks(settings)
    images = [(f"{i}.png", png_bytes(i), f"c{i % 2}") for i in range(4)]
    with TestClient(create_app(settings)) as client, webhook_receiver() as receiver:
        dataset_id = upload(client, user_headers, images).json()["id"]
        job = client.post(
            "/v1/finetune",
            json={"dataset_id": dataset_id, "base_model": "R14x0.5", "callback_url": receiver.url},
            headers=user_headers,
        ).json()
        # Cancelled while queued: no run ever sees it, and it calls back.
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=user_headers).json()
        assert cancelled["status"] == "cancelled"
        assert queue_depths(celery_client(settings))["webhooks"] == 1
        # Retried, it ends again: a second occurrence, with its own event.
        assert client.post(f"/v1/jobs/{job['id']}/retry", headers=user_headers).status_code == 200
        with session_scope(settings.database_url) as session:
            row = take_lease(session, job["id"], "w0", 60)
            assert row is not None and finish(session, row, "failed", owner="w0", error="x")
            session.commit()
            assert not finish(session, row, "failed", owner="w0")  # ended once only
            send_pending(session, settings, row.id)
        ids = [
            w["id"]
            for w in client.get(f"/v1/jobs/{job['id']}", headers=user_headers).json()["webhooks"]
        ]
        for delivery_id in ids + ids:  # a duplicate message finds nothing to send
            deliver(settings, delivery_id, "w1")
        detail = client.get(f"/v1/jobs/{job['id']}", headers=user_headers).json()
        events = [(d.payload["type"], d.payload["occurrence"]) for d in receiver.received]
        assert events == [("job.cancelled", 1), ("job.failed", 2)]
        assert len({d.event_id for d in receiver.received}) == 2
        webhooks = detail["webhooks"]
        assert [w["state"] for w in webhooks] == ["delivered", "delivered"]
        assert [[a["status_code"] for a in w["attempt_log"]] for w in webhooks] == [[204], [204]]

        # An admin re-sends the first: same event id, audited; a user may not.
        path = f"/v1/jobs/{job['id']}/webhooks/{ids[0]}/resend"
        assert client.post(path, headers=user_headers).status_code == 403
        resent = client.post(path, headers=admin_headers)
        assert resent.status_code == 200, resent.text
        assert resent.json()["state"] == "pending"
        assert resent.json()["event_id"] == webhooks[0]["event_id"]
        assert deliver(settings, ids[0], "w1") == "delivered"
        assert receiver.received[-1].event_id == webhooks[0]["event_id"]
        missing = f"/v1/jobs/{job['id']}/webhooks/{ids[-1] + 1}/resend"
        assert client.post(missing, headers=admin_headers).status_code == 404
    with session_scope(settings.database_url) as session:
        audited = session.scalars(select(AuditEvent).where(AuditEvent.action == "webhook.resend"))
        assert [(a.target, a.detail["delivery_id"]) for a in audited] == [
            (f"job {job['id']}", ids[0])
        ]
        total = session.scalar(select(func.count()).select_from(WebhookDelivery))
        assert total == 2
    figures.add("webhook final statuses called back exactly once", 2)


def test_the_dashboard_lists_deliveries_and_re_sends(sqlite_settings: Settings):
    settings = hooks(sqlite_settings)
    delivery_id = ended_job(settings, "http://127.0.0.1:9/hook")
    deliver(settings, delivery_id, "w1")  # refused by nobody listening: one failed attempt
    with session_scope(settings.database_url) as session:
        job_id = session.scalar(select(WebhookDelivery.job_id))
    with TestClient(create_app(settings)) as client:
        assert sign_in(client, new_key(settings, "admin")).status_code == 303
        page = client.get(f"/admin/jobs/{job_id}")
        assert page.status_code == 200
        event_id = delivery(settings, delivery_id).event_id
        assert event_id in page.text and "ConnectError" in page.text
        action = f"/admin/jobs/{job_id}/webhooks/{delivery_id}/resend"
        assert action in page.text
        answer = client.post(
            action, data={"csrf_token": csrf_of(page.text)}, follow_redirects=False
        )
        assert answer.status_code == 303
        forged = client.post(action, data={"csrf_token": "forged"}, follow_redirects=False)
        assert forged.status_code in (400, 403)
    row = delivery(settings, delivery_id)
    assert row.state == "pending" and row.last_result == "re-send requested"


# --- a worker killed mid-delivery -----------------------------------------------------------


@pytest.fixture
def postgres_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    return migrated_settings(request, tmp_path, "postgres")


@pytest.mark.slow
def test_a_worker_killed_mid_delivery_is_replaced_and_the_event_delivered_once(
    postgres_settings: Settings, tmp_path: Path
):
    prefix = f"bit-webhooks-{os.getpid()}-{tmp_path.name}:"
    settings = hooks(
        postgres_settings,
        broker_url=REDIS_URL,
        broker_key_prefix=prefix,
        webhook_timeout_s=2.0,  # the lease is a few times this: the test waits it out
        reconcile_every_s=0.5,
        queued_grace_s=0.5,
    )
    env = {
        **os.environ,
        "BIT_HOME": str(settings.home),
        "BIT_DATABASE_URL": settings.database_url,
        "BIT_BROKER_URL": REDIS_URL,
        "BIT_BROKER_KEY_PREFIX": prefix,
        "BIT_WEBHOOK_SECRET": SECRET,
        "BIT_WEBHOOK_ALLOW": "127.0.0.1",
        "BIT_WEBHOOK_TIMEOUT_S": "2",
        "BIT_RECONCILE_EVERY_S": "0.5",
        "BIT_QUEUED_GRACE_S": "0.5",
    }
    workers: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 (the child keeps it)
        process = subprocess.Popen(
            worker_command(["webhooks"], "INFO"),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        workers.append(process)
        return process

    def logs() -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in tmp_path.glob("*.log"))

    try:
        with webhook_receiver(hold=True) as receiver:
            delivery_id = ended_job(settings, receiver.url)
            job_id = delivery(settings, delivery_id).job_id
            with session_scope(settings.database_url) as session:
                assert send_pending(session, settings, job_id) == [delivery_id]
            first = start("first")
            if not receiver.arrived.wait(60):
                raise AssertionError(f"the first worker never POSTed\n{logs()}")
            os.killpg(first.pid, signal.SIGKILL)  # kill -9 while the receiver holds its POST
            first.wait(timeout=30)
            receiver.hold = False
            receiver.release.set()
            held = delivery(settings, delivery_id)
            assert held.state == "pending" and (held.lease_owner or "").startswith(
                f"{socket.gethostname()}:{first.pid}/"
            )
            second = start("second")
            wait_for(
                lambda: delivery(settings, delivery_id).state == "delivered",
                90,
                f"the second worker to deliver\n{logs()}",
            )
        row = delivery(settings, delivery_id)
        assert row.attempts == 2  # the killed attempt and the one that delivered
        (attempt,) = attempts(settings, delivery_id)  # the killed one never returned
        assert attempt.status_code == 204
        assert attempt.worker == f"{socket.gethostname()}:{second.pid}"
        # The receiver saw the event twice (the first POST had reached it), with one id:
        # the receiver's idempotency key.
        assert [d.event_id for d in receiver.received] == [row.event_id, row.event_id]
        assert all(verify([SECRET], d.signature, d.body) for d in receiver.received)
        with session_scope(settings.database_url) as session:
            assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 1
        figures.add("webhook worker kills survived")
    finally:
        for process in workers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
        import redis

        with redis.Redis.from_url(REDIS_URL) as client:
            keys = list(client.scan_iter(f"{prefix}*"))
            if keys:
                client.delete(*keys)


def test_the_readme_receiver_check_accepts_our_signatures_and_refuses_replays():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    snippet = readme.split("### Webhooks", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(snippet, namespace)  # the receiver's code, exactly as the README shows it
    receiver_verify = namespace["verify"]
    body = b'{"id":"evt_3","type":"job.failed"}'
    assert receiver_verify(SECRET, sign([SECRET, OLD_SECRET], body), body)
    assert receiver_verify(OLD_SECRET, sign([SECRET, OLD_SECRET], body), body)
    old = sign([SECRET], body, timestamp=int(time.time()) - 301)
    assert not receiver_verify(SECRET, old, body)
    assert not receiver_verify(SECRET, sign([SECRET], body), body + b" ")
