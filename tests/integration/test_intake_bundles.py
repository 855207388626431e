"""Bundles on the intake path (issue 24), against real RabbitMQ and Redis: the client sends many
mails in intake bundles (``publish_many``: each refused on its own), the enqueue stage handles
each request of a bundle as a request alone and acks the bundle once all are done, sends the
jobs of a round to the packer in jobs bundles, and the packer acks a jobs bundle once its last
job has shipped. Batches carry each job's own bytes: the limiter and the sender never see a
bundle. A request dead-lettered out of a bundle is its own bytes, and ``mailpipe dead replay``
puts it back on the intake alone."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pika
import pytest
import redis
from prometheus_client import REGISTRY

from mailpipe import dead, suppression
from mailpipe.amqp import Broker, Outgoing
from mailpipe.codec import (
    decode_batch,
    decode_intake,
    decode_job,
    encode_bundle,
    encode_intake,
    encode_job,
    items_of,
    kind_of,
)
from mailpipe.errors import InvalidMessage
from mailpipe.lanes import lane_id, queue_name
from mailpipe.model import Job, new_id, now_ms
from mailpipe.settings import Settings
from mailpipe.stage import run
from mailpipe.topology import DEAD_REASON, Topology
from packer.stage import PackerStage
from producer import Producer
from producer.bundles import BUNDLE_ITEMS
from producer.stage import EnqueueStage
from tests.integration.test_intake import ok as request
from tests.integration.test_memory_bound import Driven

pytestmark = pytest.mark.integration

SERVERS = """
[servers.own]
address = "[127.0.0.1]:2525"
[tenants.acme]
server = "own"
"""
WITH_GLOBEX = SERVERS + '[tenants.globex]\nserver = "own"\n'


@pytest.fixture
def topology(settings: Settings) -> Topology:
    Path(settings.servers_file).write_text(SERVERS, encoding="utf-8")
    topology = Topology.from_settings(settings)
    broker = Broker(settings.amqp_url, client_name="test").connect()
    topology.declare(broker.channel())
    broker.close()
    return topology


def take_all(settings: Settings, queue: str) -> list[tuple[dict[str, object], bytes]]:
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    out = []
    while (got := channel.basic_get(queue, auto_ack=True))[0] is not None:
        out.append((dict(got[1].headers or {}), got[2]))
    conn.close()
    return out


def depth(settings: Settings, queue: str) -> int:
    """Messages in ``queue``, ready (with no consumer connected: unacked ones are back)."""
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    count = int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    conn.close()
    return count


def duplicates() -> float:
    return REGISTRY.get_sample_value("mailpipe_intake_duplicates_total") or 0.0


def test_publish_many_refuses_each_invalid_mail_alone_and_the_rest_travel_bundled(
        settings: Settings, topology: Topology) -> None:
    good = [request(i) for i in range(250)]
    bad = {3: (request(1000, to=("not-an-address",)), "to[0]: 'not-an-address' is not a valid address"),
           77: (request(1001, subject="Hi\r\nBcc: victim@example.com"), "subject: contains CR, LF or NUL"),
           200: (request(1002, to=("a@example.com", "b@example.com"), bulk=True), "bulk: a bulk mail has exactly one")}
    requests = list(good)
    for at, (req, _why) in sorted(bad.items()):
        requests.insert(at, req)
    with Producer(settings.amqp_url, settings.namespace) as producer:
        results = producer.publish_many(requests)
    assert len(results) == len(requests)
    for at, (_req, why) in bad.items():
        refused = results[at]
        assert isinstance(refused, InvalidMessage) and refused.reason.startswith(why), refused
    assert [r for r in results if isinstance(r, str)] == [r.id for r in good]
    assert depth(settings, topology.intake) == 3, "250 requests in bundles of 100"

    assert run(EnqueueStage(settings), burst=True) == 0
    assert depth(settings, topology.intake) == 0
    messages = [body for _h, body in take_all(settings, topology.jobs)]
    jobs = [decode_job(item) for body in messages for item in items_of(body, "job")]
    assert sorted(j.id for j in jobs) == sorted(r.id for r in good), "every valid mail once, no invalid one"
    assert len(messages) < len(jobs) / 10, f"{len(messages)} messages for {len(jobs)} jobs"
    for body in messages:
        assert kind_of(body) in ("job", "jobs") and len(body) <= settings.large_message_bytes
        assert len(items_of(body, "job")) <= BUNDLE_ITEMS
    assert depth(settings, topology.dead) == 0


def test_each_request_of_a_bundle_ends_on_its_own_and_the_bundle_is_acked_once_all_are(
        settings: Settings, topology: Topology) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    suppression.suppress(client, settings.namespace, "acme", "gone@example.com", "550 5.1.1 no such user", 1)
    client.close()
    fine = [request(i) for i in range(5)]
    keyed = request(10, idempotency_key="order-10")
    copy = request(11, id=keyed.id, idempotency_key="order-10")  # a retrying upstream's copy
    bad_address = request(20, to=("not-an-address",))
    unknown_tenant = request(21, tenant="globex", sender="hr@globex.example")
    suppressed = request(22, to=("gone@example.com",))
    garbage = b"\xc1 not msgpack"
    items = [encode_intake(r) for r in [*fine[:3], keyed, bad_address, unknown_tenant]]
    items += [garbage, encode_intake(suppressed), encode_intake(copy), *(encode_intake(r) for r in fine[3:])]
    alone = request(30)
    not_a_bundle = msgpack.packb({"v": 1, "kind": "intakes", "items": ["text, not binary"]})
    broker = Broker(settings.amqp_url, client_name="test").connect()
    broker.publish([Outgoing(topology.intake, encode_bundle("intake", items)),
                    Outgoing(topology.intake, encode_intake(alone), message_id=alone.id),
                    Outgoing(topology.intake, not_a_bundle)])
    broker.close()
    before = duplicates()

    started = time.monotonic()
    assert run(EnqueueStage(settings), burst=True) == 0
    # The copy of the key waited for the first to be queued (held, the bundle unacked meanwhile),
    # then was dropped as a duplicate; the bundle was acked after that.
    assert duplicates() - before == 1
    assert time.monotonic() - started >= 1.0, "the held copy was asked about again after a second"
    assert depth(settings, topology.intake) == 0, "every delivery acked"

    jobs = [decode_job(item) for _h, body in take_all(settings, topology.jobs) for item in items_of(body, "job")]
    assert sorted(j.id for j in jobs) == sorted(r.id for r in [*fine, keyed, alone])
    dead_letters = {body: str(headers[DEAD_REASON]) for headers, body in take_all(settings, topology.dead)}
    assert len(dead_letters) == 5
    # Each refused request is a dead letter of its own bytes, with its own reason.
    assert dead_letters[encode_intake(bad_address)].startswith("to[0]: 'not-an-address' is not a valid address")
    assert "unknown tenant 'globex'" in dead_letters[encode_intake(unknown_tenant)]
    assert dead_letters[garbage].startswith("intake: not valid msgpack")
    assert dead_letters[not_a_bundle].startswith("intakes.items: expected an array of binaries")
    (suppressed_job,) = [decode_job(body) for body, why in dead_letters.items() if why.startswith("suppressed")]
    assert suppressed_job.id == suppressed.id

    # The unknown tenant's request, replayed once the tenant exists, goes back on the intake
    # alone and is queued.
    Path(settings.servers_file).write_text(WITH_GLOBEX, encoding="utf-8")
    broker = Broker(settings.amqp_url, client_name="test").connect()
    broker.publish([Outgoing(topology.dead, body, headers={DEAD_REASON: why, "x-mailpipe-stage": "producer"})
                    for body, why in dead_letters.items()])
    broker.close()
    assert dead.replay(settings, reason="unknown tenant") == 0
    (replayed,) = [decode_intake(body, settings.max_message_bytes) for _h, body in take_all(settings, topology.intake)
                   if kind_of(body) == "intake"] or [None]
    assert replayed is not None and replayed.id == unknown_tenant.id
    broker = Broker(settings.amqp_url, client_name="test").connect()
    broker.publish([Outgoing(topology.intake, encode_intake(replayed), message_id=replayed.id)])
    broker.close()
    assert run(EnqueueStage(settings), burst=True) == 0
    (job,) = [decode_job(item) for _h, body in take_all(settings, topology.jobs) for item in items_of(body, "job")]
    assert (job.id, job.tenant) == (unknown_tenant.id, "globex")
    assert depth(settings, topology.dead) == 4


def a_job(tenant: str, priority: str = "normal", send_at_ms: int | None = None) -> bytes:
    return encode_job(Job(id=new_id(), tenant=tenant, server="own", sender=f"hr@{tenant}.example",
                          recipients=("ann@example.com",), message=b"Subject: x\r\n\r\nHello.\r\n",
                          created_ms=now_ms(), enqueued_ms=now_ms(), priority=priority, send_at_ms=send_at_ms))


def test_a_jobs_bundle_is_acked_once_its_last_job_has_shipped(settings: Settings, topology: Topology) -> None:
    """One bundle: acme's high-priority jobs (a batch that closes at once), globex's normal ones
    (a batch that lingers), a job scheduled for later (parked alone) and an item that is no job
    (dead-lettered alone). The delivery stays unacked until globex's batch has shipped too."""
    settings = settings.replace(linger_ms=1500)
    high = [a_job("acme", "high") for _ in range(3)]
    normal = [a_job("globex") for _ in range(2)]
    later = a_job("acme", send_at_ms=now_ms() + 2 * 3600 * 1000)
    broken = b"\x81\xa4kind\xa3job"  # says it is a job; holds nothing of one
    body = encode_bundle("job", [high[0], normal[0], later, high[1], broken, normal[1], high[2]])
    single = a_job("acme", "high")
    broker = Broker(settings.amqp_url, client_name="test").connect()
    broker.publish([Outgoing(topology.jobs, body), Outgoing(topology.jobs, single)])
    broker.close()
    lanes = {key: queue_name(settings.namespace, "own", lane_id(*key))
             for key in (("acme", "high"), ("globex", "normal"))}

    packer = Driven(PackerStage(settings))
    for lane in lanes.values():
        topology.declare_lane(packer.broker.channel(), lane)
    batches: dict[tuple[str, str], list[bytes]] = {key: [] for key in lanes}

    def shipped(key: tuple[str, str]) -> bool:
        while (got := packer.broker.channel().basic_get(lanes[key], auto_ack=True))[0] is not None:
            batches[key] += decode_batch(got[2]).jobs
        return bool(batches[key])

    try:
        packer.run_until(lambda: shipped(("acme", "high")), timeout_s=10)
        assert sorted(batches[("acme", "high")]) == sorted([*high, single])
        assert not shipped(("globex", "normal"))
        assert packer.broker.unacked_bytes == len(body), "the bundle unacked while a job of it waits to ship"
        packer.run_until(lambda: shipped(("globex", "normal")), timeout_s=10)
        packer.run_until(lambda: packer.broker.unacked_bytes == 0, timeout_s=5)
    finally:
        packer.close()
    assert sorted(batches[("globex", "normal")]) == sorted(normal)
    for jobs in batches.values():  # what the limiter and the sender read: jobs, never a bundle
        assert all(kind_of(job) == "job" and decode_job(job) for job in jobs)
    parked = take_all(settings, topology.schedule_queue(2 * 3600 * 1000, len(later)))
    assert [job for _h, job in parked] == [later]
    ((headers, dead_letter),) = take_all(settings, topology.dead)
    assert dead_letter == broken and str(headers[DEAD_REASON]).startswith("job.v: unsupported schema version")
    assert depth(settings, topology.jobs) == 0
