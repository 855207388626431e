"""The sender stage against a real RabbitMQ, Redis and an aiosmtpd peer.

Each test publishes granted batches to its namespace's send queue, runs the stage in burst
mode (it exits once the queue is drained and nothing is in flight), then reads what it
published: the events exchange, the retry queues, the dead-letter queue and ``batches``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pytest
import redis

from mailpipe import codec, suppression
from mailpipe.feedback import is_feedback
from mailpipe.model import Batch, Event, Job, new_id, now_ms
from mailpipe.settings import Settings
from mailpipe.stage import run
from mailpipe.topology import Topology
from sender.claims import claim_key
from sender.stage import SenderStage
from tests.smtp_peer import SmtpPeer, TestCerts, make_test_ca
from tests.stages import settings_env

pytestmark = pytest.mark.integration


def write_servers(settings: Settings, port: int, **fields: Any) -> None:
    table = {"address": f"[127.0.0.1]:{port}", "tls": "none", **fields}
    lines = [f"{k} = {_toml(v)}" for k, v in table.items()]
    Path(settings.servers_file).write_text(
        "[servers.smtp]\n" + "\n".join(lines) + '\n\n[tenants.acme]\nserver = "smtp"\n', encoding="utf-8")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_job(*recipients: str, body: bytes = b"Hello.\r\n", **changes: Any) -> Job:
    fields: dict[str, Any] = {
        "id": new_id(), "tenant": "acme", "server": "smtp", "sender": "hr@acme.example",
        "recipients": recipients, "created_ms": now_ms(),
        "message": b"From: hr@acme.example\r\nSubject: test\r\n\r\n" + body}
    fields.update(changes)
    return Job(**fields)


def granted(jobs: list[Job], *, window_s: float = 30.0, granted_ms: int | None = None,
            batch_id: str | None = None) -> Batch:
    granted_ms = now_ms() if granted_ms is None else granted_ms
    tenants: dict[str, int] = {}
    for job in jobs:
        tenants[job.tenant] = tenants.get(job.tenant, 0) + 1
    return Batch(id=batch_id or new_id(), server="smtp", jobs=tuple(codec.encode_job(j) for j in jobs),
                 mails=len(jobs), bytes=sum(j.size for j in jobs), created_ms=granted_ms - 100,
                 grant_id=new_id(), granted_ms=granted_ms, deadline_ms=granted_ms + int(window_s * 1000),
                 tenants=tenants)


@dataclass
class Bus:
    """Publishes to the send queue, and reads back every output of the stage."""

    settings: Settings
    topology: Topology = field(init=False)
    conn: pika.BlockingConnection = field(init=False)

    def __post_init__(self) -> None:
        self.topology = Topology.from_settings(self.settings)
        self.conn = pika.BlockingConnection(pika.URLParameters(self.settings.amqp_url))
        self.channel = self.conn.channel()
        self.topology.declare(self.channel)
        self.events_queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.events_queue, self.topology.events, routing_key="#")

    def send(self, *batches: Batch) -> None:
        for batch in batches:
            self.channel.basic_publish("", self.topology.send, codec.encode_batch(batch),
                                       pika.BasicProperties(delivery_mode=2))

    def take(self, queue: str) -> list[tuple[bytes, dict[str, Any]]]:
        out: list[tuple[bytes, dict[str, Any]]] = []
        while True:
            method, props, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((body, dict(props.headers or {})))

    def events(self) -> list[Event]:
        return [event for body, _ in self.take(self.events_queue) if not is_feedback(body)
                for event in codec.decode_events(body)]

    def dead(self) -> list[tuple[Job, dict[str, Any]]]:
        return [(codec.decode_job(body), headers) for body, headers in self.take(self.topology.dead)]

    def retries(self) -> list[Job]:
        return [codec.decode_job(body) for q in sorted(set(self.topology.retry_queue(a) for a in range(1, 5)))
                for body, _ in self.take(q)]

    def returned(self) -> list[Batch]:
        return [codec.decode_batch(body) for body, _ in self.take(self.topology.batches)]

    def left_in_send(self) -> int:
        return int(self.channel.queue_declare(self.topology.send, passive=True).method.message_count)


@pytest.fixture
def bus(settings: Settings) -> Iterator[Bus]:
    b = Bus(settings)
    yield b
    b.conn.close()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCerts:
    return make_test_ca(tmp_path_factory.mktemp("ca"))


def run_sender(settings: Settings, **changes: Any) -> SenderStage:
    stage = SenderStage(settings.replace(**changes) if changes else settings)
    assert run(stage, burst=True, idle_exit_s=0.3) == 0
    return stage


def by_outcome(events: list[Event]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in events:
        out.setdefault(e.outcome, []).extend(e.recipients)
    return {k: sorted(v) for k, v in out.items()}


# -- the tests ----------------------------------------------------------------------------------

def test_every_mail_arrives_once_with_its_envelope(settings: Settings, bus: Bus) -> None:
    jobs = [make_job(f"a{i}@example.com", f"b{i}@example.com", body=f"mail {i}\r\n".encode())
            for i in range(12)]
    with SmtpPeer() as peer:
        write_servers(settings, peer.port)
        bus.send(granted(jobs[:6]), granted(jobs[6:]))
        run_sender(settings)
        received = peer.messages
    assert len(received) == 12
    by_body = {m.content.split(b"\r\n\r\n", 1)[1]: m for m in received}
    for i, job in enumerate(jobs):
        m = by_body[f"mail {i}\r\n".encode()]
        assert m.sender == job.sender and m.recipients == job.recipients
    assert bus.left_in_send() == 0
    events = bus.events()
    assert by_outcome(events) == {"sent": sorted(r for j in jobs for r in j.recipients)}
    assert {e.created_ms for e in events} == {j.created_ms for j in jobs}
    assert all(e.code == 250 and e.tenant == "acme" for e in events)
    assert bus.dead() == [] and bus.retries() == [] and bus.returned() == []


def test_one_250_one_451_one_550_in_one_mail(settings: Settings, bus: Bus) -> None:
    job = make_job("ok@example.com", "busy@example.com", "nobody@example.com", attempt=0)
    with SmtpPeer() as peer:
        peer.refuse("busy@example.com", 451, "4.7.1 Greylisted, try again later")
        peer.refuse("nobody@example.com", 550, "5.1.1 <nobody@example.com>: User unknown")
        write_servers(settings, peer.port)
        bus.send(granted([job]))
        run_sender(settings)
        assert [m.recipients for m in peer.messages] == [("ok@example.com",)]
    retried = bus.retries()
    assert [(j.id, j.recipients, j.attempt) for j in retried] == [(job.id, ("busy@example.com",), 1)]
    assert retried[0].message == job.message
    dead = bus.dead()
    assert len(dead) == 1
    dead_job, headers = dead[0]
    assert dead_job.recipients == ("nobody@example.com",) and dead_job.id == job.id
    assert headers["x-mailpipe-code"] == 550 and "User unknown" in headers["x-mailpipe-text"]
    assert headers["x-mailpipe-category"] == "bad_recipient"
    assert headers["x-mailpipe-tenant"] == "acme" and headers["x-mailpipe-job-id"] == job.id
    assert by_outcome(bus.events()) == {"sent": ["ok@example.com"], "deferred": ["busy@example.com"],
                                        "failed": ["nobody@example.com"]}
    client = redis.Redis.from_url(settings.redis_url)
    try:  # the unknown recipient is suppressed for the tenant; the deferred one is not
        [found] = suppression.suppressed(client, settings.namespace,
                                         [("acme", ("nobody@example.com", "busy@example.com"))])
    finally:
        client.close()
    assert list(found) == ["nobody@example.com"] and "User unknown" in found["nobody@example.com"]


def test_a_relay_refusal_says_the_server_is_broken_for_us_and_the_mail_waits(settings: Settings, bus: Bus) -> None:
    """Seed 003's "553 ... not in my list of allowed rcpthosts (#5.7.1)" is the server refusing
    our sender, not the recipient: no dead letter, no retry copy. Refused at RCPT, it could be
    one recipient's (tests/integration/test_relay_denied_alone.py), so the next mails are tried:
    refused too, three in a row with none taken, the batch stops and all its mail goes back to
    wait in its lane, and the three refusals, counted against the server in Redis, pause it."""
    jobs = [make_job(f"someone{i}@elsewhere.example") for i in range(5)]
    seed_reply = "sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"
    with SmtpPeer() as peer:
        peer.refuse(None, 553, seed_reply)
        write_servers(settings, peer.port, concurrency=1)
        bus.send(granted(jobs))
        run_sender(settings)
        assert peer.messages == []
    assert bus.dead() == [] and bus.retries() == []
    [back] = bus.returned()
    assert sorted(codec.decode_job(raw).id for raw in back.jobs) == sorted(j.id for j in jobs)
    assert back.refund == 2  # the two never tried come back with their tokens
    client = redis.Redis.from_url(settings.redis_url)
    try:
        pace: Any = client.hgetall(f"{{{settings.namespace}:smtp}}:pb")
    finally:
        client.close()
    assert (pace[b"streak"], pace[b"state"]) == (b"3", b"paused")


def test_refused_data_and_dropped_connection_are_deferred(settings: Settings, bus: Bus) -> None:
    first, second = make_job("a@example.com"), make_job("b@example.com")
    with SmtpPeer() as peer:
        peer.refuse_data("a@example.com", 452, "4.3.1 Insufficient system storage")
        peer.drop_connections(1, at="data")
        write_servers(settings, peer.port, concurrency=1)
        bus.send(granted([first, second]))
        run_sender(settings)
        assert peer.messages == []
    retried = {j.recipients[0]: j for j in bus.retries()}
    assert set(retried) == {"a@example.com", "b@example.com"}
    events = {e.recipients[0]: e for e in bus.events()}
    assert events["a@example.com"].code == 452
    assert (events["b@example.com"].code, events["b@example.com"].category) == (0, "connection")
    assert bus.dead() == []


def test_retry_older_than_max_age_is_expired(settings: Settings, bus: Bus) -> None:
    old = make_job("busy@example.com", created_ms=now_ms() - 10_000, attempt=3)
    with SmtpPeer() as peer:
        peer.refuse("busy@example.com", 451, "4.7.1 Try again later")
        write_servers(settings, peer.port)
        bus.send(granted([old]))
        run_sender(settings, retry_max_age_s=5.0)
    assert bus.retries() == []
    [(dead_job, headers)] = bus.dead()
    assert dead_job.id == old.id and headers["x-mailpipe-category"] == "expired"
    assert headers["x-mailpipe-code"] == 451
    assert [e.outcome for e in bus.events()] == ["expired"]


def test_batch_picked_up_after_its_deadline_goes_back_with_refund(settings: Settings, bus: Bus) -> None:
    jobs = [make_job(f"u{i}@example.com") for i in range(3)]
    batch = granted(jobs, window_s=60, granted_ms=now_ms() - 61_000)
    with SmtpPeer() as peer:
        write_servers(settings, peer.port)
        bus.send(batch)
        run_sender(settings)
        assert peer.messages == [] and peer.connections == 0
    [back] = bus.returned()
    assert back.grant_id is None and back.deadline_ms is None
    assert back.refund == 3 and back.mails == 3 and back.tenants == {"acme": 3}
    assert [codec.decode_job(raw).id for raw in back.jobs] == [j.id for j in jobs]
    assert back.id != batch.id
    assert bus.events() == [] and bus.dead() == []


def test_deadline_mid_batch_returns_the_rest(settings: Settings, bus: Bus) -> None:
    jobs = [make_job(f"u{i}@example.com") for i in range(30)]
    with SmtpPeer(reply_delay_s=0.05) as peer:
        write_servers(settings, peer.port, concurrency=1)
        bus.send(granted(jobs, window_s=2.0))
        run_sender(settings, send_margin_s=0.5)
        sent = len(peer.messages)
    [back] = bus.returned()
    assert 0 < sent < 30
    assert back.mails == 30 - sent
    # The one mail whose envelope was out at the cutoff (one connection) went back without its
    # body, touched: not refunded. The others nobody touched.
    assert back.refund in (back.mails, back.mails - 1)
    assert len(by_outcome(bus.events())["sent"]) == sent


def test_redelivered_batch_skips_marked_recipients(settings: Settings, bus: Bus) -> None:
    jobs = [make_job(f"a{i}@example.com", f"b{i}@example.com") for i in range(4)]
    batch = granted(jobs)
    with SmtpPeer() as peer:
        write_servers(settings, peer.port)
        bus.send(batch)
        run_sender(settings)
        assert len(peer.messages) == 4
        bus.events()
        # The same batch again, as after a crash between the 250s and the ack.
        bus.send(batch)
        run_sender(settings)
        assert len(peer.messages) == 4
    # Each recipient still gets its "sent" event (at least once), and nothing is retried.
    assert len(by_outcome(bus.events())["sent"]) == 8
    assert bus.retries() == [] and bus.dead() == []
    client = redis.Redis.from_url(settings.redis_url)
    try:
        key = claim_key(settings.namespace, jobs[0])
        assert client.hgetall(key) == {b"a0@example.com": b"s", b"b0@example.com": b"s"}
        ttl = client.ttl(key)
        assert isinstance(ttl, int) and 0 < ttl <= settings.sent_mark_ttl_s
    finally:
        client.close()


def test_starttls_required_is_refused_when_not_offered(settings: Settings, bus: Bus) -> None:
    job = make_job("a@example.com")
    with SmtpPeer() as peer:  # no STARTTLS offered
        write_servers(settings, peer.port, tls="starttls")
        bus.send(granted([job]))
        run_sender(settings)
        assert peer.messages == []
    # A server that cannot do TLS is broken for us: the mail goes back to wait (three such
    # replies in a row pause the server, and its tenants are told why: test_pushback_at_the_peer).
    assert_back_to_wait(bus, [job], "tls_failed")


def test_starttls_and_auth(settings: Settings, bus: Bus, certs: TestCerts,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_SMTP_CREDENTIALS", "mailer s3cret pass")
    job = make_job("a@example.com")
    with SmtpPeer(starttls_context=certs.server_context(), require_starttls=True,
                  auth={"mailer": "s3cret pass"}) as peer:
        write_servers(settings, peer.port, tls="starttls", ca_file=str(certs.ca_file),
                      credentials_env="TEST_SMTP_CREDENTIALS")
        bus.send(granted([job]))
        run_sender(settings)
        [m] = peer.messages
    assert m.tls and m.auth_user == "mailer" and m.recipients == ("a@example.com",)
    assert [e.outcome for e in bus.events()] == ["sent"]


def test_wrong_password_fails_with_auth_failed(settings: Settings, bus: Bus, certs: TestCerts,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_SMTP_CREDENTIALS", "mailer wrong")
    job = make_job("a@example.com")
    with SmtpPeer(tls_context=certs.server_context(), auth={"mailer": "right"}) as peer:
        write_servers(settings, peer.port, tls="implicit", ca_file=str(certs.ca_file),
                      credentials_env="TEST_SMTP_CREDENTIALS")
        bus.send(granted([job]))
        run_sender(settings)
        assert peer.messages == []
    assert_back_to_wait(bus, [job], "auth_failed")


def test_implicit_tls_with_a_test_ca(settings: Settings, bus: Bus, certs: TestCerts) -> None:
    job = make_job("a@example.com")
    with SmtpPeer(tls_context=certs.server_context()) as peer:
        write_servers(settings, peer.port, tls="implicit", ca_file=str(certs.ca_file))
        bus.send(granted([job]))
        run_sender(settings)
        [m] = peer.messages
    assert m.tls


def test_untrusted_certificate_is_refused(settings: Settings, bus: Bus, certs: TestCerts) -> None:
    job = make_job("a@example.com")
    with SmtpPeer(tls_context=certs.server_context()) as peer:
        write_servers(settings, peer.port, tls="implicit")  # no ca_file: the test CA is unknown
        bus.send(granted([job]))
        run_sender(settings)
        assert peer.messages == []
    assert_back_to_wait(bus, [job], "tls_failed")


def assert_back_to_wait(bus: Bus, jobs: list[Job], category: str) -> None:
    """The server is broken for us (a wrong password, no TLS): nothing dead-lettered or retried,
    nothing told yet (the pause is), all of it back, and the signal counted in Redis."""
    assert bus.dead() == [] and bus.retries() == [] and bus.events() == []
    [back] = bus.returned()
    assert sorted(codec.decode_job(raw).id for raw in back.jobs) == sorted(j.id for j in jobs)
    client = redis.Redis.from_url(bus.settings.redis_url)
    try:
        pace: Any = client.hgetall(f"{{{bus.settings.namespace}:smtp}}:pb")
    finally:
        client.close()
    assert pace[b"streak"] == b"1", (category, pace)


def test_invalid_batch_is_dead_lettered(settings: Settings, bus: Bus) -> None:
    with SmtpPeer() as peer:
        write_servers(settings, peer.port)
        bus.channel.basic_publish("", bus.topology.send, b"\x93not a batch")
        run_sender(settings)
    [(body, headers)] = bus.take(bus.topology.dead)
    assert body == b"\x93not a batch" and headers["x-mailpipe-category"] == "invalid"


def test_sigterm_finishes_in_flight_mails_and_gives_back_the_rest(settings: Settings, bus: Bus,
                                                                   tmp_path: Path) -> None:
    jobs = [make_job(f"u{i}@example.com") for i in range(40)]
    with SmtpPeer(reply_delay_s=0.05) as peer:
        write_servers(settings, peer.port, concurrency=1)
        bus.send(granted(jobs, window_s=60))
        with (tmp_path / "sender.log").open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "sender"], env=settings_env(settings),
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            assert len(peer.wait_for(3, timeout_s=20)) >= 3, (tmp_path / "sender.log").read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, (tmp_path / "sender.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        sent = len(peer.messages)
    [back] = bus.returned()
    assert 3 <= sent < 40
    assert back.refund == back.mails == 40 - sent
    assert len(by_outcome(bus.events())["sent"]) == sent
    assert bus.left_in_send() == 0


def test_ready_reflects_redis(settings: Settings) -> None:
    write_servers(settings, 25)
    stage = SenderStage(settings)
    down = SenderStage(settings.replace(redis_url="redis://127.0.0.1:1/0"))
    try:
        stage.smtp.start()
        down.smtp.start()
        assert stage.ready()
        assert not down.ready()
    finally:
        stage.close()
        down.close()


def test_retries_wait_with_jitter_below_their_queue_delay(settings: Settings, bus: Bus) -> None:
    jobs = [make_job(f"u{i}@example.com") for i in range(20)]
    with SmtpPeer() as peer:
        peer.refuse(None, 451, "4.7.1 Greylisted, try again later")
        write_servers(settings, peer.port)
        bus.send(granted(jobs))
        run_sender(settings)
    delay_ms = bus.topology.retry_delay_s(1) * 1000
    expirations = []
    while True:
        method, props, _body = bus.channel.basic_get(bus.topology.retry_queue(1), auto_ack=True)
        if method is None:
            break
        expirations.append(int(props.expiration))
    assert len(expirations) == 20
    assert all(0.8 * delay_ms <= e <= delay_ms for e in expirations)
    assert len(set(expirations)) > 10, "spread, not all the same"
