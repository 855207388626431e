"""The intake tells the truth under faults (issue 12), against real RabbitMQ and Redis.

Finding 1: a confirmed request is never lost when redelivered and fresh requests arrive in one
poll (the runner hands the fresh ones over first; a multiple ack over them acked the
redelivered ones unhandled). Finding 5: an idempotency key is claimed atomically, per tenant,
in two phases, so two copies in flight queue one job, tenants never collide, and a dead
holder's claim ends with its lease.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pika
import pytest
import redis
from prometheus_client import REGISTRY

from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.codec import decode_intake, decode_job, encode_intake, encode_job, items_of
from mailpipe.errors import BrokerUnavailable, Unroutable
from mailpipe.model import IntakeRequest, Job, new_id
from mailpipe.settings import Settings
from mailpipe.stage import _handle, run
from mailpipe.topology import Topology
from producer.idempotency import Idempotency, Verdict
from producer.stage import EnqueueStage
from tests.integration.test_intake import ok as request

pytestmark = pytest.mark.integration

SERVERS = """
[servers.own]
address = "[127.0.0.1]:2525"
[tenants.acme]
server = "own"
[tenants.globex]
server = "own"
"""


def job(key: str, tenant: str = "acme") -> Job:
    return Job(id=new_id(), tenant=tenant, server="own", sender=f"hr@{tenant}.example",
               recipients=("ann@example.com",), message=b"Subject: x\r\n\r\nx\r\n", idempotency_key=key)


@pytest.fixture
def topology(settings: Settings) -> Topology:
    Path(settings.servers_file).write_text(SERVERS, encoding="utf-8")
    topology = Topology.from_settings(settings)
    broker = Broker(settings.amqp_url, client_name="test").connect()
    topology.declare(broker.channel())
    broker.close()
    return topology


@pytest.fixture
def client(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url)
    yield client
    client.close()


def publish(settings: Settings, queue: str, requests: list[IntakeRequest]) -> None:
    broker = Broker(settings.amqp_url, client_name="test").connect()
    broker.publish([Outgoing(queue, encode_intake(r), message_id=r.id) for r in requests])
    broker.close()


def depth(settings: Settings, queue: str) -> int:
    """Messages ready in ``queue`` (not the ones delivered and unacked)."""
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    count = int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    conn.close()
    return count


def consume_all(settings: Settings, queue: str) -> list[bytes]:
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    out = []
    while True:
        method, _props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append(body)
    conn.close()
    return out


def duplicates() -> float:
    return REGISTRY.get_sample_value("mailpipe_intake_duplicates_total") or 0.0


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 15.0,
             step: Callable[[], object] | None = None) -> None:
    """Poll ``condition`` (running ``step`` between looks) until it holds, or fail saying what."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        if step is not None:
            step()
        else:
            time.sleep(0.05)


class DrivenStage:
    """An EnqueueStage run by hand as mailpipe.stage.run runs it (connect, declare, start,
    consume; then poll, _handle, tick), so that a test decides what one poll holds."""

    def __init__(self, settings: Settings) -> None:
        self.stage = EnqueueStage(settings)
        self.broker = Broker(settings.amqp_url, client_name="test-producer")

    def connect(self) -> None:
        self.broker.connect()
        self.stage.topology.declare(self.broker.channel())
        self.stage.start(self.broker)
        for queue, prefetch in self.stage.inputs:
            self.broker.consume(queue, prefetch)

    def poll_until(self, count: int, timeout_s: float = 15.0) -> list[Delivery]:
        got: list[Delivery] = []
        wait_for(lambda: len(got) >= count, f"{count} deliveries (got {len(got)})", timeout_s,
                 step=lambda: got.extend(self.broker.poll(0.05)))
        return got

    def step(self) -> None:
        deliveries = self.broker.poll(0.05)
        if deliveries:
            _handle(self.stage, self.broker, deliveries)
        self.stage.tick(self.broker)

    def disconnect(self) -> None:
        self.broker.close()

    def close(self) -> None:
        self.broker.close()
        self.stage.close()


@pytest.fixture
def driven(settings: Settings, topology: Topology) -> Iterator[Callable[[Settings], DrivenStage]]:
    made: list[DrivenStage] = []

    def make(stage_settings: Settings = settings) -> DrivenStage:
        made.append(DrivenStage(stage_settings))
        return made[-1]

    yield make
    for stage in made:
        stage.close()


# -- finding 1: exact acks ---------------------------------------------------------------------


def test_redelivered_and_fresh_requests_in_one_poll_each_end_once(
        settings: Settings, topology: Topology, driven: Callable[[Settings], DrivenStage]) -> None:
    n = 60
    # Every tenth request is invalid: it must end as a dead letter, the rest as jobs.
    first = [request(i, **({"to": ("not-an-address",)} if i % 10 == 0 else {})) for i in range(n)]
    publish(settings, topology.intake, first)
    # Take the first n without acking, then drop the connection: RabbitMQ redelivers them.
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    for _ in range(n):
        method, _props, _body = channel.basic_get(topology.intake, auto_ack=False)
        assert method is not None
    conn.close()
    second = [request(n + i, **({"to": ("not-an-address",)} if i % 10 == 0 else {})) for i in range(n)]
    publish(settings, topology.intake, second)

    stage = driven(settings)
    stage.connect()
    deliveries = stage.poll_until(2 * n)
    redelivered = [d.tag for d in deliveries if d.redelivered]
    fresh = [d.tag for d in deliveries if not d.redelivered]
    assert len(redelivered) == len(fresh) == n
    assert min(redelivered) < max(fresh)  # a multiple ack over the fresh ones reaches redelivered ones
    error: BrokerUnavailable | None = None
    try:
        _handle(stage.stage, stage.broker, deliveries)
        stage.broker.poll(0.1)  # take in a channel.close the broker may have sent
    except BrokerUnavailable as exc:
        error = exc
    channel_open = stage.broker.is_open and stage.broker.channel().is_open
    stage.close()
    # Whatever is still in the intake (after a closed channel: everything unacked) is handled to
    # the end, as the runner would after reconnecting: then every request must be accounted for.
    assert run(EnqueueStage(settings), burst=True) == 0

    jobs = Counter(decode_job(job).id for body in consume_all(settings, topology.jobs) for job in items_of(body, "job"))
    dead = Counter(decode_intake(body, settings.max_message_bytes).id
                   for body in consume_all(settings, topology.dead))
    invalid = {r.id for i, r in enumerate(first + second) if i % 10 == 0}
    lost = [r.id for r in first + second if jobs[r.id] + dead[r.id] == 0]
    assert not lost, f"{len(lost)} of {2 * n} confirmed requests lost"
    assert set(dead) == invalid and set(dead.values()) == {1}
    assert set(jobs) == {r.id for r in first + second} - invalid and set(jobs.values()) == {1}
    assert error is None and channel_open, f"the stage's channel closed: {error}"


# -- finding 5: idempotency keys, claimed atomically, per tenant ---------------------------------


def test_copies_of_one_key_claimed_at_once_have_one_holder(settings: Settings, client: redis.Redis) -> None:
    copies = 8
    keyed = job("reset-42")
    ready = threading.Barrier(copies)

    def claim(_i: int) -> Verdict:
        own = redis.Redis.from_url(settings.redis_url)
        try:
            idem = Idempotency(own, settings.namespace, lease_s=30, ttl_s=60)
            own.ping()  # connected before the barrier, so the claims race
            ready.wait()
            return idem.claim([keyed]).verdicts[0]
        finally:
            own.close()

    with ThreadPoolExecutor(copies) as pool:
        verdicts = list(pool.map(claim, range(copies)))
    assert verdicts.count(Verdict.MINE) == 1
    assert verdicts.count(Verdict.PENDING) == copies - 1
    idem = Idempotency(client, settings.namespace, lease_s=30, ttl_s=60)
    idem.confirm([keyed])
    assert idem.claim([keyed, keyed]).verdicts == (Verdict.DUPLICATE, Verdict.DUPLICATE)


def test_two_stages_handling_copies_at_once_queue_each_key_once(
        settings: Settings, topology: Topology, driven: Callable[[Settings], DrivenStage]) -> None:
    keys, copies = 30, 3
    settings = settings.replace(prefetch=10)  # both stages get a share, copies of a key in both
    requests = [request(k, idempotency_key=f"order-{k}") for k in range(keys) for _ in range(copies)]
    publish(settings, topology.intake, requests)
    before = duplicates()
    stages = [driven(settings), driven(settings)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def drive(stage: DrivenStage) -> None:
        try:
            stage.connect()
            while not stop.is_set():
                stage.step()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(s,)) for s in stages]
    for thread in threads:
        thread.start()
    try:
        # Every copy handled: one per key published as a job (before any other copy of the key
        # can be a duplicate), the others dropped as duplicates (and so acked).
        wait_for(lambda: bool(errors) or duplicates() - before >= keys * (copies - 1),
                 "every copy handled", timeout_s=30)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert not errors, errors
    assert not any(s.stage.busy() for s in stages)
    for stage in stages:
        stage.disconnect()
    assert depth(settings, topology.intake) == 0  # nothing left unacked
    jobs = [decode_job(job) for body in consume_all(settings, topology.jobs) for job in items_of(body, "job")]
    assert sorted(j.idempotency_key or "" for j in jobs) == sorted(f"order-{k}" for k in range(keys))
    assert duplicates() - before == keys * (copies - 1)


def test_tenants_with_one_key_and_one_wire_id_both_queue(
        settings: Settings, topology: Topology, client: redis.Redis) -> None:
    # The same wire id and key from two tenants: globex must not be dropped because of acme,
    # whatever id it puts on the wire. A copy from acme with another id is a duplicate.
    shared_id = new_id()
    requests = [request(1, id=shared_id, idempotency_key="invoice-1"),
                request(2, id=shared_id, tenant="globex", sender="hr@globex.example", idempotency_key="invoice-1"),
                request(3, idempotency_key="invoice-1")]
    publish(settings, topology.intake, requests)
    assert run(EnqueueStage(settings), burst=True) == 0

    jobs = [decode_job(job) for body in consume_all(settings, topology.jobs) for job in items_of(body, "job")]
    assert sorted(j.tenant for j in jobs) == ["acme", "globex"]
    assert depth(settings, topology.intake) == 0
    idem = Idempotency(client, settings.namespace, lease_s=30, ttl_s=60)
    keys = sorted(k.decode() for k in client.scan_iter(match=f"{settings.namespace}:idem:*"))
    assert keys == sorted({idem.key(job("invoice-1", "acme")), idem.key(job("invoice-1", "globex"))})
    assert all(shared_id not in key for key in keys)


def test_a_dead_holders_claim_lets_the_request_through_after_its_lease(
        settings: Settings, topology: Topology, client: redis.Redis,
        driven: Callable[[Settings], DrivenStage]) -> None:
    settings = settings.replace(idempotency_lease_s=1.0)
    req = request(1, idempotency_key="welcome-7")
    dead_holder = Idempotency(client, settings.namespace, lease_s=1.0, ttl_s=60)
    assert dead_holder.claim([job("welcome-7")]).verdicts == (Verdict.MINE,)  # and it never confirms
    publish(settings, topology.intake, [req])

    stage = driven(settings)
    stage.connect()
    _handle(stage.stage, stage.broker, stage.poll_until(1))
    assert stage.stage.busy()  # held: another holder's claim
    assert depth(settings, topology.jobs) == 0
    wait_for(lambda: depth(settings, topology.jobs) == 1, "the job queued once the lease ran out", step=stage.step)
    assert not stage.stage.busy()
    assert client.get(dead_holder.key(job("welcome-7"))) == b"queued"
    stage.disconnect()
    assert depth(settings, topology.intake) == 0  # acked
    assert [decode_job(body).id for body in consume_all(settings, topology.jobs)] == [req.id]


def test_a_request_held_by_another_holders_claim_is_not_acked_until_it_resolves(
        settings: Settings, topology: Topology, client: redis.Redis,
        driven: Callable[[Settings], DrivenStage]) -> None:
    req = request(1, idempotency_key="reset-9")
    holder_job = job("reset-9")
    holder = Idempotency(client, settings.namespace, lease_s=30, ttl_s=60)
    assert holder.claim([holder_job]).verdicts == (Verdict.MINE,)  # a copy in flight elsewhere
    publish(settings, topology.intake, [req])
    before = duplicates()

    stage = driven(settings)
    stage.connect()
    _handle(stage.stage, stage.broker, stage.poll_until(1))
    assert stage.stage.busy()
    for _ in range(30):  # 1.5 s of ticks: more than one re-check, and still held
        stage.step()
    assert stage.stage.busy()
    assert depth(settings, topology.jobs) == 0
    # Not acked: when the connection drops, the request is back in the intake.
    stage.disconnect()
    wait_for(lambda: depth(settings, topology.intake) == 1, "the held request back in the intake")
    stage.connect()  # start() forgets what the old connection held
    assert not stage.stage.busy()
    redelivered = stage.poll_until(1)
    assert redelivered[0].redelivered
    _handle(stage.stage, stage.broker, redelivered)
    assert stage.stage.busy()

    # The holder publishes its copy and marks the key queued: the held request is a duplicate.
    broker = Broker(settings.amqp_url, client_name="test").connect()
    broker.publish([Outgoing(topology.jobs, encode_job(holder_job), message_id=holder_job.id)])
    broker.close()
    holder.confirm([holder_job])
    wait_for(lambda: not stage.stage.busy(), "the held request dropped as a duplicate", step=stage.step)
    stage.disconnect()
    assert depth(settings, topology.intake) == 0  # acked
    assert [decode_job(body).id for body in consume_all(settings, topology.jobs)] == [holder_job.id]
    assert duplicates() - before == 1


def test_a_failed_publish_releases_its_claim(
        settings: Settings, topology: Topology, client: redis.Redis,
        driven: Callable[[Settings], DrivenStage]) -> None:
    stage = driven(settings)
    stage.connect()
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    conn.channel().queue_delete(topology.jobs)  # the job's publish is returned: Unroutable
    conn.close()
    publish(settings, topology.intake, [request(1, idempotency_key="report-3")])
    with pytest.raises(Unroutable):
        _handle(stage.stage, stage.broker, stage.poll_until(1))
    key = Idempotency(client, settings.namespace, lease_s=30, ttl_s=60).key(job("report-3"))
    assert client.exists(key) == 0  # a retry need not wait out the lease
