"""The whole pipeline, end to end: four stages as separate processes, real RabbitMQ and Redis,
an aiosmtpd peer as the tenant's SMTP server."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import pika
import pytest

from mailpipe.codec import decode_events
from mailpipe.feedback import is_feedback
from mailpipe.model import Event, IntakeRequest, new_id, now_ms
from mailpipe.settings import Settings
from mailpipe.topology import DEAD_REASON, Topology
from producer import Producer
from tests.smtp_peer import Received, SmtpPeer
from tests.stages import StageProcesses

pytestmark = pytest.mark.integration

ALL_STAGES = ("producer", "packer", "limiter", "sender")
MESSAGE_ID = re.compile(rb"^Message-ID: <([0-9a-f]+)@", re.MULTILINE | re.IGNORECASE)


def write_servers(settings: Settings, port: int, extra: str = "") -> None:
    Path(settings.servers_file).write_text(
        f'[servers.tenant-smtp]\naddress = "[127.0.0.1]:{port}"\ntls = "none"\nunlimited = true\n{extra}\n'
        '[tenants.acme]\nserver = "tenant-smtp"\ndaily_limit = 100000\n', encoding="utf-8")


def mails(n: int, *, body: str = "Hello from mailpipe.\n",
          to: str = "user{i}@example.com") -> list[IntakeRequest]:
    return [IntakeRequest(id=new_id(), tenant="acme", sender="hr@acme.example", created_ms=now_ms(),
                          to=(to.format(i=i),), subject=f"Mail {i}", text=body) for i in range(n)]


class Events:
    """An exclusive queue bound to the events exchange, declared before anything is published."""

    def __init__(self, settings: Settings) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        self.channel = self.conn.channel()
        topology = Topology.from_settings(settings)
        topology.declare(self.channel)
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, topology.events, routing_key="#")
        self.seen: list[Event] = []

    def drain(self) -> list[Event]:
        while True:
            method, _props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.seen
            if not is_feedback(body):  # bounced, suppressed ...: issue 23's events
                self.seen.extend(decode_events(body))

    def close(self) -> None:
        self.conn.close()


def wait_until(condition, timeout_s: float, what: str, stages: StageProcesses) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{stages.logs()}")
        if len(stages.alive()) < len(stages.procs):
            pytest.fail(f"a stage died while waiting for {what}\n{stages.logs()}")
        time.sleep(0.1)


def job_id(received: Received) -> str:
    match = MESSAGE_ID.search(received.content)
    assert match, "every rendered mail carries a Message-ID made of its job id"
    return match.group(1).decode()


def test_1000_mails_arrive_once_with_their_envelope(settings: Settings, tmp_path: Path) -> None:
    requests = mails(1000)
    with SmtpPeer() as peer:
        write_servers(settings, peer.port)
        with StageProcesses(settings, tmp_path, *ALL_STAGES) as stages:
            with Producer(settings.amqp_url, settings.namespace) as producer:
                ids = producer.publish_requests(requests)
            wait_until(lambda: len(peer.messages) >= 1000, 120, "1,000 mails at the SMTP peer", stages)
            time.sleep(1.0)  # long enough for a duplicate to show up
            codes = stages.stop()
        received = peer.messages
    assert codes == {f"{s}-0": 0 for s in ALL_STAGES}, "every stage exits 0 on SIGTERM"
    by_job = Counter(job_id(r) for r in received)
    assert set(by_job) == set(ids)
    assert [j for j, n in by_job.items() if n > 1] == [], "no mail is delivered twice"
    expected = {r.id: r for r in requests}
    for r in received:
        req = expected[job_id(r)]
        assert r.sender == req.sender
        assert r.recipients == req.to


def test_550_ends_in_dead_letter_queue_with_the_reply(settings: Settings, tmp_path: Path) -> None:
    events = Events(settings)
    with SmtpPeer() as peer:
        peer.refuse("spam-trap@example.com", 550, "5.7.1 High probability of spam")
        write_servers(settings, peer.port)
        with StageProcesses(settings, tmp_path, *ALL_STAGES) as stages, \
                Producer(settings.amqp_url, settings.namespace) as producer:
            good, bad = producer.publish_requests(
                [*mails(1), *mails(1, to="spam-trap@example.com")])
            wait_until(lambda: any(e.outcome == "failed" for e in events.drain()), 60,
                       "the failed event", stages)
            wait_until(lambda: len(peer.messages) >= 1, 30, "the good mail", stages)
    failed = [e for e in events.drain() if e.outcome == "failed"]
    assert [e.job_id for e in failed] == [bad]
    assert failed[0].code == 550 and "High probability of spam" in failed[0].text
    assert [job_id(r) for r in peer.messages] == [good]

    channel = events.channel
    method, props, _body = channel.basic_get(Topology.from_settings(settings).dead, auto_ack=True)
    assert method is not None, "the refused mail is in the dead-letter queue"
    reason = props.headers[DEAD_REASON]
    assert "550" in reason and "High probability of spam" in reason
    events.close()


def test_451_is_delivered_on_a_later_attempt(settings: Settings, tmp_path: Path) -> None:
    events = Events(settings)
    with SmtpPeer() as peer:
        peer.refuse("busy@example.com", 451, "4.7.1 Try again later", times=1)
        write_servers(settings, peer.port)
        with StageProcesses(settings, tmp_path, *ALL_STAGES) as stages, \
                Producer(settings.amqp_url, settings.namespace) as producer:
            (job,) = producer.publish_requests(mails(1, to="busy@example.com"))
            wait_until(lambda: len(peer.messages) >= 1, 60, "the retried mail", stages)
            time.sleep(0.5)
        assert [job_id(r) for r in peer.messages] == [job]
    outcomes = [(e.outcome, e.attempt) for e in events.drain() if e.job_id == job]
    assert ("deferred", 0) in outcomes
    assert ("sent", 1) in outcomes
    events.close()


def test_a_batch_of_500_mails_of_160_kb_is_one_batch_delivered_inside_its_window(
        settings: Settings, tmp_path: Path) -> None:
    # 160 KiB rendered: the body plus about 400 bytes of headers and a CR per line.
    line = "x" * 75 + "\n"
    body = line * (160 * 1024 // 77 - 6)
    settings = settings.replace(linger_ms=20_000)  # the batch closes on its count, not its linger
    events = Events(settings)
    with SmtpPeer() as peer:
        write_servers(settings, peer.port)
        with StageProcesses(settings, tmp_path, *ALL_STAGES) as stages, \
                Producer(settings.amqp_url, settings.namespace) as producer:
            requests = mails(500, body=body)
            for i in range(0, 500, 50):
                producer.publish_requests(requests[i:i + 50])
            wait_until(lambda: len(peer.messages) >= 500, 120, "500 large mails", stages)
        sizes = [len(r.content) for r in peer.messages]
    sent = [e for e in events.drain() if e.outcome == "sent"]
    assert len(sent) == 500
    assert len({e.batch_id for e in sent}) == 1, "all 500 mails travel in one batch"
    assert 500 * 160 * 1000 < sum(sizes) <= settings.max_batch_bytes
    assert max(e.at_ms for e in sent) - min(e.at_ms for e in sent) < settings.window_s * 1000
    assert not [e for e in events.drain() if e.outcome != "sent"]
    events.close()


def test_a_scheduled_mail_is_not_sent_before_its_send_at(settings: Settings, tmp_path: Path) -> None:
    with SmtpPeer() as peer:
        write_servers(settings, peer.port)
        with StageProcesses(settings, tmp_path, *ALL_STAGES) as stages, \
                Producer(settings.amqp_url, settings.namespace) as producer:
            send_at = time.time() + 4
            later = producer.publish(tenant="acme", sender="hr@acme.example", to=["ann@example.com"],
                                     subject="Tomorrow's reminder", text="Soon.", send_at=send_at)
            now = producer.publish(tenant="acme", sender="hr@acme.example", to=["bob@example.com"],
                                   subject="Now", text="Now.")
            wait_until(lambda: len(peer.messages) >= 2, 30, "both mails", stages)
        arrived = {job_id(r): r.time for r in peer.messages}
    assert arrived[now] < send_at
    assert send_at <= arrived[later] < send_at + 3, "released within a couple of seconds of send_at"


def test_transactional_mail_overtakes_5000_bulk_mails_of_the_same_tenant(
        settings: Settings, tmp_path: Path) -> None:
    # 36,000/h is 10 mails a second: the bulk mail would take over eight minutes to drain.
    settings = settings.replace(burst_mails=50, window_s=1.0, send_margin_s=0.2)  # grants of 40
    with SmtpPeer() as peer:
        write_servers(settings, peer.port)
        Path(settings.servers_file).write_text(
            Path(settings.servers_file).read_text().replace("unlimited = true", "rate_per_hour = 36000"))
        with StageProcesses(settings, tmp_path, *ALL_STAGES) as stages, \
                Producer(settings.amqp_url, settings.namespace) as producer:
            bulk = mails(5000)
            for i in range(0, len(bulk), 500):
                producer.publish_requests(bulk[i:i + 500])
            reset = producer.publish(tenant="acme", sender="hr@acme.example", to=["ann@example.com"],
                                     subject="Reset your password", text="Click the link.", priority="high")
            wait_until(lambda: reset in {job_id(r) for r in peer.messages}, 60, "the transactional mail", stages)
            order = [job_id(r) for r in peer.messages]
    before = order.index(reset)
    assert before < 500, f"{before} bulk mails went before the transactional one"
