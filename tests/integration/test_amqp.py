"""The AMQP layer against a real RabbitMQ: confirms, returns, nacks, dead-lettering, retries,
and a connection lost under it. Each test works in its own namespace and deletes its queues.

The last tests call ``Broker._on_confirm`` with pika's own frames: pure bookkeeping, no server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions
import pika.frame
import pika.spec
import pytest
from pika.adapters.utils.connection_workflow import AMQPConnectorException

import mailpipe.amqp
from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.errors import BrokerUnavailable, PublishRejected, Unroutable
from mailpipe.topology import Topology

AMQP_URL = os.environ.get("MAILPIPE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture(scope="module")
def rabbitmq() -> str | None:
    """Asked once per module: why RabbitMQ cannot be used, or None when it answers."""
    params = pika.URLParameters(AMQP_URL)
    params.socket_timeout = params.stack_timeout = 5  # a hung broker: say so in seconds, not minutes
    try:
        pika.BlockingConnection(params).close()
    except (pika.exceptions.AMQPError, AMQPConnectorException, OSError) as exc:
        return f"RabbitMQ is not reachable at MAILPIPE_AMQP_URL ({type(exc).__name__})"
    return None


@pytest.fixture(scope="module")
def topology(rabbitmq: str | None) -> Iterator[Topology]:
    """One namespace for the module, declared once and deleted at the end: every quorum queue
    is a Raft group, and declaring a dozen per test is slow and loads the shared broker.
    A delivery limit of 2 and a 1 s retry queue keep the tests fast."""
    if rabbitmq is not None:  # skip when RabbitMQ is down locally; fail in CI, where it must be up
        if os.environ.get("CI"):
            pytest.fail(rabbitmq)
        pytest.skip(rabbitmq)
    topo = Topology(namespace=f"test-{uuid.uuid4().hex[:12]}", delivery_limit=2, retry_delays_s=(1,))
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    topo.declare(conn.channel())
    conn.close()
    yield topo
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = conn.channel()
    for queue in topo.all_queues:
        channel.queue_delete(queue)
    channel.exchange_delete(topo.events)
    conn.close()


@pytest.fixture
def broker(topology: Topology) -> Iterator[Broker]:
    """A connected broker, with every queue of the namespace emptied of earlier tests' messages."""
    b = Broker(AMQP_URL, client_name=f"mailpipe-test-{uuid.uuid4().hex}").connect()
    for queue in topology.all_queues:
        b.channel().queue_purge(queue)
    yield b
    b.close()


@pytest.fixture
def scratch_queue(topology: Topology) -> Iterator[str]:
    """A name in the test's namespace for a queue the test declares itself; deleted after."""
    name = f"{topology.namespace}.scratch"
    yield name
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    conn.channel().queue_delete(name)
    conn.close()


def drain(broker: Broker, expected: int, timeout_s: float = 10.0) -> list[Delivery]:
    """Poll until ``expected`` deliveries have arrived (or the time is up)."""
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < expected and time.monotonic() < deadline:
        got.extend(broker.poll(0.2))
    return got


def ready_count(broker: Broker, queue: str) -> int:
    return int(broker.channel().queue_declare(queue, passive=True).method.message_count)


def get_one(broker: Broker, queue: str, timeout_s: float = 10.0) -> tuple[Any, bytes]:
    """basic_get until a message shows up in ``queue``; returns (properties, body) and acks it."""
    channel = broker.channel()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            return properties, body
        broker.sleep(0.05)
    raise AssertionError(f"nothing arrived in {queue} within {timeout_s} s")


# -- publishing and consuming -------------------------------------------------------------------

@pytest.mark.integration
def test_publish_many_and_consume_them_all(broker: Broker, topology: Topology) -> None:
    bodies = [f"job-{i}".encode() for i in range(3000)]
    broker.publish([Outgoing(topology.jobs, body, message_id=str(i)) for i, body in enumerate(bodies)])
    assert ready_count(broker, topology.jobs) == len(bodies)

    broker.consume(topology.jobs, prefetch=500)
    got: list[Delivery] = []
    deadline = time.monotonic() + 20
    while len(got) < len(bodies) and time.monotonic() < deadline:
        batch = broker.poll(0.2)
        broker.ack_all(d.tag for d in batch)  # acked as they come: the prefetch window is smaller than the total
        got.extend(batch)
    assert sorted(d.body for d in got) == sorted(bodies)
    assert all(d.routing_key == topology.jobs and not d.redelivered for d in got)
    assert {d.message_id for d in got} == {str(i) for i in range(len(bodies))}
    broker.stop_consuming()
    broker.sleep(0.2)
    assert ready_count(broker, topology.jobs) == 0


@pytest.mark.integration
def test_published_messages_are_persistent_with_headers(broker: Broker, topology: Topology) -> None:
    broker.publish([Outgoing(topology.jobs, b"x", headers={"x-mailpipe-reason": "why"}, message_id="m1")])
    properties, body = get_one(broker, topology.jobs)
    assert body == b"x"
    assert properties.delivery_mode == 2
    assert properties.content_type == "application/msgpack"
    assert properties.headers["x-mailpipe-reason"] == "why"
    assert properties.message_id == "m1"


@pytest.mark.integration
def test_publish_nothing_is_a_no_op(broker: Broker) -> None:
    broker.publish([])


@pytest.mark.integration
def test_unroutable_mandatory_publish_raises(broker: Broker, topology: Topology) -> None:
    missing = f"{topology.namespace}.no-such-queue"
    with pytest.raises(Unroutable, match="no-such-queue"):
        broker.publish([Outgoing(topology.jobs, b"routed"), Outgoing(missing, b"lost?", message_id="m2")])
    # The routable one of the same call was delivered; the caller knows the other was not.
    assert get_one(broker, topology.jobs)[1] == b"routed"
    # The broker is still usable after a return.
    broker.publish([Outgoing(topology.jobs, b"after")])
    assert get_one(broker, topology.jobs)[1] == b"after"


@pytest.mark.integration
def test_non_mandatory_publish_to_nowhere_is_accepted(broker: Broker, topology: Topology) -> None:
    """Events go to an exchange nobody may be bound to yet: that is not an error."""
    broker.publish([Outgoing("sent.acme", b"event", exchange=topology.events, mandatory=False)])


@pytest.mark.integration
def test_declare_is_idempotent(broker: Broker, topology: Topology) -> None:
    topology.declare(broker.channel())
    topology.declare(broker.channel())
    other = Broker(AMQP_URL, client_name="mailpipe-test-declare").connect()
    try:
        topology.declare(other.channel())
    finally:
        other.close()
    for queue in (*topology.work_queues, topology.dead, topology.retry_queue(1)):
        assert ready_count(broker, queue) == 0


WORK_ARGS = {"x-queue-type": "quorum", "x-dead-letter-exchange": "",
             "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


@pytest.mark.integration
def test_declared_queues_are_quorum_queues_with_a_delivery_limit(broker: Broker, topology: Topology) -> None:
    """Re-declaring with the documented arguments succeeds and with one changed fails: that
    proves what the arguments of the declared queue are."""
    channel = broker.channel()
    args = {**WORK_ARGS, "x-dead-letter-routing-key": topology.dead, "x-delivery-limit": 2}
    channel.queue_declare(topology.jobs, durable=True, arguments=args)
    for changed in ({"x-delivery-limit": 3}, {"x-queue-type": "classic"},
                    {"x-dead-letter-routing-key": "elsewhere"}):
        key = next(iter(changed))
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match=f"inequivalent arg '{key}'"):
            channel.queue_declare(topology.jobs, durable=True, arguments={**args, **changed})
        broker.connect()  # the broker closed the channel
        channel = broker.channel()
    retry_args = {"x-queue-type": "quorum", "x-message-ttl": 1000, "x-dead-letter-exchange": "",
                  "x-dead-letter-routing-key": topology.jobs, "x-dead-letter-strategy": "at-least-once",
                  "x-overflow": "reject-publish"}
    channel.queue_declare(topology.retry_queue(1), durable=True, arguments=retry_args)
    channel.queue_declare(topology.dead, durable=True, arguments={"x-queue-type": "quorum"})


@pytest.mark.integration
def test_large_queues_are_declared_like_their_siblings(broker: Broker, topology: Topology) -> None:
    """The .large queues: quorum, the same dead-lettering and delivery limit; their delay
    queues dead-letter back to jobs.large."""
    channel = broker.channel()
    args = {**WORK_ARGS, "x-dead-letter-routing-key": topology.dead, "x-delivery-limit": 2}
    for queue in (topology.intake_large, topology.jobs_large):
        channel.queue_declare(queue, durable=True, arguments=args)
    large = topology.large_message_bytes + 1
    for queue in (topology.retry_queue(1, large), topology.schedule_queue(1000, large)):
        assert queue.endswith(".large")
        channel.queue_declare(queue, durable=True, arguments={
            "x-queue-type": "quorum", "x-message-ttl": 1000, "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": topology.jobs_large, "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish"})


@pytest.mark.integration
def test_each_consumer_gets_its_own_prefetch(broker: Broker, topology: Topology) -> None:
    """basic_qos before each basic_consume (global_qos off): RabbitMQ holds each consumer to
    its own prefetch, so a stage consuming a small and a large queue holds at most
    small prefetch + large prefetch messages, and the broker counts their bytes."""
    small, large = b"s" * 1000, b"L" * 100_000
    broker.publish([Outgoing(topology.jobs, small) for _ in range(30)]
                   + [Outgoing(topology.jobs_large, large) for _ in range(30)])
    broker.consume(topology.jobs, 10)
    broker.consume(topology.jobs_large, 2)
    got = drain(broker, 12)
    broker.sleep(0.5)  # anything beyond the prefetches would arrive now
    got += broker.poll(0.2)
    by_queue = {q: [d for d in got if d.routing_key == q] for q in (topology.jobs, topology.jobs_large)}
    assert len(by_queue[topology.jobs]) == 10
    assert len(by_queue[topology.jobs_large]) == 2
    assert broker.unacked_bytes == broker.peak_unacked_bytes == 10 * len(small) + 2 * len(large)
    broker.ack_all(d.tag for d in by_queue[topology.jobs_large])
    assert broker.unacked_bytes == 10 * len(small)
    more = drain(broker, 2)  # the large consumer's window opened again, and only by its two
    broker.sleep(0.3)
    more += broker.poll(0.2)
    assert [d.routing_key for d in more] == [topology.jobs_large] * 2
    broker.ack_all(d.tag for d in [*by_queue[topology.jobs], *more])
    assert broker.unacked_bytes == 0
    broker.stop_consuming()


# -- dead-lettering and retries -----------------------------------------------------------------

@pytest.mark.integration
def test_requeued_past_the_delivery_limit_goes_to_the_dead_queue(broker: Broker, topology: Topology) -> None:
    broker.publish([Outgoing(topology.jobs, b"poison", message_id="p1")])
    broker.consume(topology.jobs, prefetch=1)
    deliveries = 0
    deadline = time.monotonic() + 15
    # Each requeue counts one delivery; past the limit (2) the broker dead-letters it.
    while time.monotonic() < deadline and deliveries <= topology.delivery_limit + 1:
        got = broker.poll(0.2)
        for d in got:
            assert d.body == b"poison"
            deliveries += 1
            broker.requeue(d.tag)
        if not got and deliveries > topology.delivery_limit:
            break
    assert deliveries == topology.delivery_limit + 1

    properties, body = get_one(broker, topology.dead)
    assert body == b"poison"
    headers = properties.headers
    assert headers["x-first-death-reason"] == "delivery_limit"
    assert headers["x-first-death-queue"] == topology.jobs
    assert properties.message_id == "p1"
    assert ready_count(broker, topology.jobs) == 0


@pytest.mark.integration
def test_delivery_count_header_grows_on_redelivery(broker: Broker, topology: Topology) -> None:
    broker.publish([Outgoing(topology.jobs, b"again")])
    broker.consume(topology.jobs, prefetch=1)
    first = drain(broker, 1)[0]
    assert first.delivery_count == 0
    broker.requeue(first.tag)
    second = drain(broker, 1)[0]
    assert second.redelivered and second.delivery_count == 1
    broker.ack(second.tag)


@pytest.mark.integration
def test_retry_queue_returns_its_message_to_jobs_after_the_ttl(broker: Broker, topology: Topology) -> None:
    retry = topology.retry_queue(1)
    assert retry.endswith(".retry.1s")
    started = time.monotonic()
    broker.publish([Outgoing(retry, b"deferred", message_id="r1", headers={"attempt": 1})])
    broker.consume(topology.jobs, prefetch=10)
    got = drain(broker, 1, timeout_s=10)
    elapsed = time.monotonic() - started
    assert [d.body for d in got] == [b"deferred"]
    assert elapsed >= 0.9, "it waited out the TTL"
    assert got[0].message_id == "r1"
    assert got[0].headers["attempt"] == 1
    assert got[0].headers["x-first-death-reason"] == "expired"
    assert got[0].headers["x-first-death-queue"] == retry
    broker.ack(got[0].tag)


@pytest.mark.integration
def test_large_retry_and_scheduled_queues_return_to_jobs_large(broker: Broker, topology: Topology) -> None:
    large = topology.large_message_bytes + 1
    broker.publish([Outgoing(topology.retry_queue(1, large), b"retried", message_id="r2"),
                    Outgoing(topology.schedule_queue(1000, large), b"scheduled", message_id="s2")])
    broker.consume(topology.jobs_large, prefetch=10)
    got = drain(broker, 2, timeout_s=10)
    assert sorted(d.body for d in got) == [b"retried", b"scheduled"]
    assert ready_count(broker, topology.jobs) == 0
    broker.ack_all(d.tag for d in got)


# -- a lost connection --------------------------------------------------------------------------

def _close_from_the_server(broker: Broker) -> None:
    """Close the broker's connection from RabbitMQ's side (rabbitmqctl), only this one connection;
    without rabbitmqctl (a remote broker), cut the client's socket instead."""
    name = broker.client_name
    if shutil.which("rabbitmqctl"):
        try:
            # Tab-separated rows "<rabbit@host.N.N.N>\t[{...},{"connection_name","NAME"}]": the
            # JSON formatter prints pids in a form close_connection does not accept.
            out = subprocess.run(["rabbitmqctl", "list_connections", "pid", "client_properties", "-q"],
                                 capture_output=True, text=True, timeout=15, check=True).stdout
            pids = [line.split("\t", 1)[0] for line in out.splitlines()
                    if f'{{"connection_name","{name}"}}' in line]
            if len(pids) == 1:
                subprocess.run(["rabbitmqctl", "close_connection", pids[0], "closed by test_amqp"],
                               capture_output=True, timeout=15, check=True)
                time.sleep(0.2)
                return
        except (subprocess.SubprocessError, OSError):
            pass  # another node answering, or none: cut the socket below instead
    sock = broker._connection()._impl._transport._sock  # the client's own socket
    sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.integration
def test_publish_after_a_forced_close_raises_and_reconnect_works(broker: Broker, topology: Topology) -> None:
    broker.publish([Outgoing(topology.jobs, b"before")])
    _close_from_the_server(broker)
    with pytest.raises(BrokerUnavailable):
        broker.publish([Outgoing(topology.jobs, b"lost-with-the-connection")])
    assert not broker.is_open

    broker.connect()
    assert broker.is_open
    broker.publish([Outgoing(topology.jobs, b"after")])
    broker.consume(topology.jobs, prefetch=10)
    bodies = {d.body for d in drain(broker, 2, timeout_s=3)}
    # The publish that raised may or may not have reached the queue: the caller retries it.
    assert {b"before", b"after"} <= bodies
    assert bodies <= {b"before", b"after", b"lost-with-the-connection"}


@pytest.mark.integration
def test_poll_after_a_forced_close_raises(broker: Broker, topology: Topology) -> None:
    broker.consume(topology.jobs, prefetch=10)
    _close_from_the_server(broker)
    with pytest.raises(BrokerUnavailable):
        for _ in range(20):
            broker.poll(0.1)


def test_connect_to_nothing_raises_broker_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # a port nobody listens on once closed
    broker = Broker(f"amqp://guest:secret-pw@127.0.0.1:{port}/", client_name="t")
    with pytest.raises(BrokerUnavailable) as info:
        broker.connect()
    assert "secret-pw" not in info.value.reason
    with pytest.raises(BrokerUnavailable, match="not connected"):
        broker.publish([Outgoing("q", b"x")])


def test_a_broker_that_never_answers_raises_broker_unavailable() -> None:
    """A hung node accepts TCP but never speaks AMQP: pika raises its own connector error,
    which is not an AMQPError; it must still come out as BrokerUnavailable."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # the kernel completes the TCP handshake; nobody ever answers
        port = listener.getsockname()[1]
        broker = Broker(f"amqp://guest:secret-pw@127.0.0.1:{port}/?stack_timeout=1&socket_timeout=1",
                        client_name="t")
        with pytest.raises(BrokerUnavailable) as info:
            broker.connect()
    assert "secret-pw" not in info.value.reason


def test_several_endpoints_are_tried_in_turn_and_the_one_that_answers_is_kept(
        rabbitmq: str | None, topology: Topology) -> None:
    """A cluster's nodes: a dead one and a hung one are passed over (each failure named, no
    password), the live one is used, and a reconnect starts from it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        hung = listener.getsockname()[1]
        urls = [f"amqp://guest:secret-pw@127.0.0.1:{dead}/",
                f"amqp://guest:secret-pw@127.0.0.1:{hung}/?socket_timeout=1&stack_timeout=1", AMQP_URL]
        broker = Broker(urls, client_name="t-endpoints").connect()
        try:
            assert broker.url == AMQP_URL
            broker.publish([Outgoing(topology.intake, b"x")])
            broker.connect()  # again: straight to the node that answered
            assert broker.url == AMQP_URL
        finally:
            broker.close()
        with pytest.raises(BrokerUnavailable) as info:
            Broker(urls[:2], client_name="t").connect()
    assert str(dead) in info.value.reason and str(hung) in info.value.reason
    assert "secret-pw" not in info.value.reason


# -- nacks: re-sent, and never lost silently ----------------------------------------------------

class CountingBroker(Broker):
    """Counts basic.publish calls, so a test can see the re-sends."""

    sends = 0

    def _send(self, message: Outgoing) -> None:
        self.sends += 1
        super()._send(message)


def _declare_full_queue(broker: Broker, queue: str) -> None:
    """A queue that holds one message and nacks every publish beyond it."""
    broker.channel().queue_declare(queue, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    broker.publish([Outgoing(queue, b"first")])


@pytest.mark.integration
def test_nacked_publish_is_retried_then_raises(topology: Topology, scratch_queue: str) -> None:
    broker = CountingBroker(AMQP_URL, client_name=f"mailpipe-test-{uuid.uuid4().hex}")
    broker.connect()
    try:
        _declare_full_queue(broker, scratch_queue)
        broker.sends = 0
        with pytest.raises(PublishRejected, match="nacked 1 message"):
            broker.publish([Outgoing(scratch_queue, b"second")])
        assert broker.sends == 1 + mailpipe.amqp.MAX_NACK_RETRIES
        assert ready_count(broker, scratch_queue) == 1
    finally:
        broker.close()


@pytest.mark.integration
def test_nacked_publish_is_resent_until_accepted(
        topology: Topology, scratch_queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue is full, so the broker nacks; a consumer starts draining it a little later,
    and every message gets through, each exactly once, because publish() kept the payloads."""
    monkeypatch.setattr(mailpipe.amqp, "MAX_NACK_RETRIES", 1_000_000)  # rely on the timeout instead
    broker = CountingBroker(AMQP_URL, client_name=f"mailpipe-test-{uuid.uuid4().hex}")
    broker.connect()
    consumed: list[bytes] = []
    stop = threading.Event()

    def consume_later() -> None:
        time.sleep(0.3)  # let the publisher collect nacks first
        conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = conn.channel()
        while not stop.is_set():
            method, _props, body = channel.basic_get(scratch_queue, auto_ack=True)
            if method is None:
                conn.sleep(0.001)
            else:
                consumed.append(body)
        conn.close()

    consumer = threading.Thread(target=consume_later, daemon=True)
    try:
        _declare_full_queue(broker, scratch_queue)
        broker.sends = 0
        bodies = [f"m{i}".encode() for i in range(20)]
        consumer.start()
        broker.publish([Outgoing(scratch_queue, body) for body in bodies], timeout_s=30)
        assert broker.sends > len(bodies), "some publishes were nacked and sent again"
        deadline = time.monotonic() + 5
        while len(consumed) < len(bodies) + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        consumer.join(timeout=5)
        broker.close()
    assert sorted(consumed) == sorted([b"first", *bodies])


# -- confirm bookkeeping, with pika's frames and no server --------------------------------------

def _frame(method: Any) -> pika.frame.Method:
    return pika.frame.Method(1, method)


def _broker_with_unconfirmed(count: int) -> tuple[Broker, list[Outgoing]]:
    broker = Broker("amqp://guest:guest@127.0.0.1:1/", client_name="t")
    messages = [Outgoing("q", f"m{i}".encode()) for i in range(1, count + 1)]
    broker._unconfirmed = dict(enumerate(messages, start=1))
    return broker, messages


def test_single_ack_confirms_one() -> None:
    broker, _ = _broker_with_unconfirmed(3)
    broker._on_confirm(_frame(pika.spec.Basic.Ack(delivery_tag=2)))
    assert sorted(broker._unconfirmed) == [1, 3]
    assert broker._nacked == []


def test_multiple_ack_confirms_every_tag_up_to_it() -> None:
    broker, _ = _broker_with_unconfirmed(5)
    broker._on_confirm(_frame(pika.spec.Basic.Ack(delivery_tag=3, multiple=True)))
    assert sorted(broker._unconfirmed) == [4, 5]
    broker._on_confirm(_frame(pika.spec.Basic.Ack(delivery_tag=5, multiple=True)))
    assert broker._unconfirmed == {} and broker._nacked == []


def test_single_nack_keeps_the_payload_for_resending() -> None:
    broker, messages = _broker_with_unconfirmed(3)
    broker._on_confirm(_frame(pika.spec.Basic.Nack(delivery_tag=2)))
    assert sorted(broker._unconfirmed) == [1, 3]
    assert broker._nacked == [messages[1]]


def test_multiple_nack_is_not_an_ack() -> None:
    """The pika example's mistake, avoided: a multiple nack nacks every tag up to it."""
    broker, messages = _broker_with_unconfirmed(5)
    broker._on_confirm(_frame(pika.spec.Basic.Ack(delivery_tag=1)))
    broker._on_confirm(_frame(pika.spec.Basic.Nack(delivery_tag=4, multiple=True)))
    assert sorted(broker._unconfirmed) == [5]
    assert broker._nacked == messages[1:4]


def test_confirm_for_an_unknown_tag_changes_nothing() -> None:
    broker, _ = _broker_with_unconfirmed(2)
    broker._on_confirm(_frame(pika.spec.Basic.Nack(delivery_tag=9)))
    broker._on_confirm(_frame(pika.spec.Basic.Ack(delivery_tag=7)))
    assert sorted(broker._unconfirmed) == [1, 2] and broker._nacked == []


@pytest.mark.integration
def test_reconnect_forgets_the_old_connections_confirms(broker: Broker, topology: Topology) -> None:
    """Nacks of a dead connection must not be re-sent on the next publish after connect():
    the caller redoes that work from its redelivered inputs."""
    broker._nacked.append(Outgoing(topology.jobs, b"stale"))
    broker._unconfirmed[99] = Outgoing(topology.jobs, b"stale too")
    broker.connect()
    broker.publish([Outgoing(topology.jobs, b"fresh")])
    broker.consume(topology.jobs, prefetch=10)
    assert [d.body for d in drain(broker, 2, timeout_s=1)] == [b"fresh"]
