"""The intake against real RabbitMQ and Redis: 1,000 requests with a mix of faults, each ending
where it should with the right reason; idempotency; suppression."""

from __future__ import annotations

import random
from pathlib import Path

import pika
import pytest
import redis

from mailpipe import suppression
from mailpipe.amqp import Broker, Outgoing
from mailpipe.codec import decode_job, encode_intake, items_of
from mailpipe.model import Attachment, IntakeRequest, Job, new_id, now_ms
from mailpipe.settings import Settings
from mailpipe.stage import run
from mailpipe.topology import DEAD_REASON, Topology
from producer import Producer
from producer.stage import EnqueueStage

pytestmark = pytest.mark.integration

SERVERS = """
[servers.own]
address = "[127.0.0.1]:2525"
[tenants.acme]
server = "own"
"""


def ok(i: int, **fields: object) -> IntakeRequest:
    base: dict[str, object] = dict(id=new_id(), tenant="acme", sender="hr@acme.example", created_ms=now_ms(),
                                   to=(f"user{i}@example.com",), subject=f"Mail {i}", text="Hello there.\n")
    base.update(fields)
    return IntakeRequest(**base)  # type: ignore[arg-type]


# Each fault: how to spoil a request, and a fragment its dead-letter reason must hold.
FAULTS: list[tuple[str, dict[str, object], str]] = [
    ("bad address", dict(to=("not-an-address",)), "to[0]: 'not-an-address' is not a valid address"),
    ("CR/LF in a header", dict(subject="Hi\r\nBcc: victim@example.com"), "subject: contains CR, LF or NUL"),
    ("unknown tenant", dict(tenant="nobody"), "unknown tenant 'nobody'"),
    ("unknown server", dict(server="nowhere"), "unknown server 'nowhere'"),
    ("executable", dict(attachments=(Attachment("run.exe", "application/octet-stream", b"MZ"),)),
     "executable_attachment"),
    ("too large", dict(text="x" * 200_000), "over the 100000-byte limit"),
    ("no body", dict(text=None), "text, html: give at least one body part"),
    ("suppressed", dict(to=("gone@example.com",)), "suppressed: gone@example.com"),
]


def consume_all(settings: Settings, queue: str) -> list[tuple[dict[str, object], bytes]]:
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    out = []
    while True:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append((dict(props.headers or {}), body))
    conn.close()
    return out


def test_1000_requests_with_a_mix_of_faults_each_end_where_they_should(settings: Settings) -> None:
    settings = settings.replace(max_message_bytes=100_000)
    Path(settings.servers_file).write_text(SERVERS, encoding="utf-8")
    topology = Topology.from_settings(settings)
    client = redis.Redis.from_url(settings.redis_url)
    suppression.suppress(client, settings.namespace, "acme", "gone@example.com", "550 5.1.1 no such user", 1)
    client.close()

    rng = random.Random(7)
    expected_jobs: set[str] = set()
    expected_dead: dict[str, str] = {}  # request id -> reason fragment
    messages: list[Outgoing] = []
    for i in range(1000):
        if rng.random() < 0.3:
            _name, fields, fragment = FAULTS[i % len(FAULTS)]
            req = ok(i, **fields)
            expected_dead[req.id] = fragment
        else:
            req = ok(i)
            expected_jobs.add(req.id)
        messages.append(Outgoing(topology.intake, encode_intake(req), message_id=req.id))
    garbage = [b"", b"\xc1", b"\x93\x01\x02", b"\x81\xa1v\x01", b"\xdd\xff\xff\xff\xff"]
    messages += [Outgoing(topology.intake, g) for g in garbage]

    broker = Broker(settings.amqp_url, client_name="test").connect()
    topology.declare(broker.channel())
    broker.publish(messages)
    broker.close()

    assert run(EnqueueStage(settings), burst=True) == 0

    jobs = [decode_job(job) for _h, body in consume_all(settings, topology.jobs) for job in items_of(body, "job")]
    assert {j.id for j in jobs} == expected_jobs
    assert all(j.server == "own" and j.recipients for j in jobs)
    dead = consume_all(settings, topology.dead)
    assert len(dead) == len(expected_dead) + len(garbage)
    reasons = [str(h[DEAD_REASON]) for h, _ in dead]
    for fragment in set(expected_dead.values()):
        count = sum(1 for f in expected_dead.values() if f == fragment)
        assert sum(1 for r in reasons if fragment in r) == count, fragment
    undecodable = [r for r in reasons if r.startswith("intake") and "byte limit" not in r]
    assert len(undecodable) == len(garbage)


def test_publishing_twice_with_one_idempotency_key_queues_once(settings: Settings) -> None:
    Path(settings.servers_file).write_text(SERVERS, encoding="utf-8")
    topology = Topology.from_settings(settings)
    broker = Broker(settings.amqp_url, client_name="test").connect()
    topology.declare(broker.channel())
    broker.close()
    with Producer(settings.amqp_url, settings.namespace) as producer:
        first = producer.publish(tenant="acme", sender="hr@acme.example", to=["ann@example.com"],
                                 subject="Reset your password", text="Click.", idempotency_key="reset-42")
        assert run(EnqueueStage(settings), burst=True) == 0
        second = producer.publish(tenant="acme", sender="hr@acme.example", to=["ann@example.com"],
                                  subject="Reset your password", text="Click.", idempotency_key="reset-42")
        other = producer.publish(tenant="acme", sender="hr@acme.example", to=["ann@example.com"],
                                 subject="Reset your password", text="Click.", idempotency_key="reset-43")
    assert second == first != other
    assert run(EnqueueStage(settings), burst=True) == 0
    jobs: list[Job] = [decode_job(job) for _h, body in consume_all(settings, topology.jobs)
                       for job in items_of(body, "job")]
    assert sorted(j.id for j in jobs) == sorted([first, other])
