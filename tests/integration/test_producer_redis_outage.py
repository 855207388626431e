"""A Redis outage of minutes does not dead-letter the intake (issue 21, found by the fault
campaign): the producer holds what it consumed, unacked, and goes on once Redis is back.

Before, the producer dropped its AMQP session on every Redis failure (suppression check,
idempotency claim): its unacked intake was redelivered about once a second, each time counted,
and the quorum queue dead-lettered it at the delivery limit (reason ``delivery_limit``): in a
four-minute outage, 1,665 of 1,800 mails. Now: one warning per outage, not ready on /readyz,
``mailpipe_failing_closed{stage="producer"}`` on /metrics, Redis asked again with a backoff;
a malformed request is still dead-lettered at once with its reason; SIGTERM leaves the held
requests unacked for another replica (returned once); Redis back, every request becomes one
job, its idempotency key honoured, none dead-lettered.

Frozen rather than refusing (SIGSTOP: every call waits for its timeout), Redis must not stall
the producer's loop past its AMQP heartbeat either: the broker would close the connection and
redeliver, and count, everything unacked.

On a private Redis (the machine's is never stopped); the producer as a process.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pika
import pytest

from mailpipe.amqp import Broker, Outgoing
from mailpipe.codec import decode_job, items_of
from mailpipe.model import IntakeRequest, job_id_for, now_ms
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from producer.client import intake_messages
from tests.faults.harness import PrivateRedis, free_port, http_get, publish, queue_depths, stage_gauge
from tests.faults.ledger import read_dead
from tests.stages import StageProcesses

pytestmark = pytest.mark.integration

SERVERS = '[servers.own]\naddress = "[127.0.0.1]:2525"\n[tenants.acme]\nserver = "own"\n'
MAILS = 300
COPIES = 20  # requests publishing a key again (a retrying upstream): queued once
# With the reconnect backoff capped at 0.5 s, a producer that loses its session on each Redis
# failure has its intake redelivered 20 times (the delivery limit) in about 15 s here.
OUTAGE_S = 25.0
FROZEN_S = 10.0  # several of the producer's tries, each waiting out its Redis timeout
DROPPED = "reconnected to RabbitMQ"  # the runner's line after a lost session
WAITING = "waiting for Redis"  # the producer's one warning per outage
BACK = "Redis answers again"


def requests(n: int, copies: int, prefix: str) -> list[IntakeRequest]:
    keyed = [IntakeRequest(id=job_id_for("acme", f"{prefix}-{i}"), tenant="acme", sender="hr@acme.example",
                           created_ms=now_ms(), to=(f"user{i}@example.com",), subject=f"Mail {i}",
                           text="Hello.\n", idempotency_key=f"{prefix}-{i}") for i in range(n - copies)]
    return keyed + keyed[:copies]


def messages(topology: Topology, requests: list[IntakeRequest]) -> int:
    """How many intake messages the client sends for ``requests`` (published in one call): they
    travel in bundles of up to 100, and the queue counts messages."""
    return len(intake_messages(topology, requests))


def job_ids(settings: Settings, topology: Topology) -> Counter[str]:
    """The ids of the jobs on ``jobs`` (taken), each job of a bundle counted."""
    return Counter(decode_job(job).id for body in consume_all(settings, topology.jobs) for job in items_of(body, "job"))


def depth(settings: Settings, queue: str) -> tuple[int, int]:
    """(ready, unacked) of ``queue``; (-1, -1) while the node does not say."""
    return (queue_depths(settings.namespace) or {}).get(queue, (-1, -1))


def gauge(port: int, name: str) -> float | None:
    return stage_gauge(port, "producer", name)


def delivery_counts(settings: Settings, queue: str) -> Counter[int]:
    """How often each message of ``queue`` was delivered before (x-delivery-count): a look that
    returns them, so each counts once more afterwards."""
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    counts: Counter[int] = Counter()
    while True:
        method, props, _body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            break
        counts[int((props.headers or {}).get("x-delivery-count", 0))] += 1
    conn.close()
    return counts


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


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, stages: StageProcesses,
               running: bool = True) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if DROPPED in stages.logs():
            pytest.fail(f"the producer dropped its AMQP session, its unacked intake redelivered\n{stages.logs()}")
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s} s: {what}\n{queue_depths(stages.settings.namespace)}\n"
                        f"{stages.logs()}")
        if running and not stages.alive():
            pytest.fail(f"the producer died while waiting for {what}\n{stages.logs()}")
        time.sleep(0.2)


def test_a_redis_outage_holds_the_intake_and_every_mail_goes_once_redis_is_back(
        settings: Settings, tmp_path: Path) -> None:
    Path(settings.servers_file).write_text(SERVERS, encoding="utf-8")
    topology = Topology.from_settings(settings)
    with PrivateRedis(tmp_path) as private_redis:
        settings = settings.replace(redis_url=private_redis.url, reconnect_max_s=0.5)
        first_logs, second_logs = tmp_path / "first", tmp_path / "second"
        first_logs.mkdir()
        second_logs.mkdir()
        port = free_port()
        stages = StageProcesses(settings, first_logs, "producer", metrics_ports={"producer": port})
        with stages:
            before = publish(settings, requests(5, 0, "before"))
            wait_until(lambda: depth(settings, topology.intake) == (0, 0), 30, "the first mails queued", stages)

            private_redis.stop()
            outage_started = time.monotonic()
            held = requests(MAILS, COPIES, "during")
            published = publish(settings, held, chunk=MAILS)
            sent = messages(topology, held)  # 3 bundles
            broker = Broker(settings.amqp_url, client_name="test").connect()
            broker.publish([Outgoing(topology.intake, b"\xc1 not msgpack", message_id="malformed")])
            broker.close()

            wait_until(lambda: depth(settings, topology.intake) == (0, sent), 20,
                       "the producer holding every request unacked", stages)
            wait_until(lambda: len(read_dead(settings.amqp_url, settings.namespace)) == 1, 10,
                       "the malformed request dead-lettered while Redis is down", stages)
            (dead_letter,) = read_dead(settings.amqp_url, settings.namespace)
            reason = dead_letter.reason
            assert "msgpack" in reason or "decode" in reason, reason
            status, _ = http_get(port, "/readyz")
            assert status == 503, "ready while Redis is down"
            assert gauge(port, "mailpipe_failing_closed") == 1.0
            assert gauge(port, "mailpipe_waiting_for_redis_messages") == MAILS

            log = first_logs / "producer-0.log"
            while time.monotonic() - outage_started < OUTAGE_S:  # past the delivery limit, before
                dead = read_dead(settings.amqp_url, settings.namespace)
                assert len(dead) == 1, f"dead-lettered during the outage: {dead}\n{stages.logs()}"
                assert DROPPED not in log.read_text(), \
                    f"the producer dropped its session (its intake redelivered)\n{stages.logs()}"
                assert stages.alive(), stages.logs()
                time.sleep(1.0)
            assert depth(settings, topology.intake) == (0, sent)

            # SIGTERM during the outage: a clean exit, the held requests back in intake (once).
            asked = time.monotonic()
            codes = stages.stop(timeout_s=settings.shutdown_timeout_s + 5)
            assert codes == {"producer-0": 0}, stages.logs()
            assert time.monotonic() - asked < settings.shutdown_timeout_s
        wait_until(lambda: depth(settings, topology.intake) == (sent, 0), 10, "the held requests given back",
                   stages, running=False)
        assert delivery_counts(settings, topology.intake) == {1: sent}, "given back more than once"
        text = log.read_text()
        assert text.count(WAITING) == 1, text[-5000:]

        # Another replica takes them over while Redis is still down, then Redis comes back.
        stages = StageProcesses(settings, second_logs, "producer", metrics_ports={"producer": port})
        with stages:
            wait_until(lambda: depth(settings, topology.intake) == (0, sent), 30,
                       "the second producer holding every request", stages)
            wait_until(lambda: gauge(port, "mailpipe_waiting_for_redis_messages") == MAILS, 10,
                       "every request of the bundles counted as held", stages)
            private_redis.start()
            wait_until(lambda: depth(settings, topology.intake) == (0, 0), 30,
                       "every request handled once Redis is back", stages)
            wait_until(lambda: gauge(port, "mailpipe_failing_closed") == 0.0 and http_get(port, "/readyz")[0] == 200,
                       10, "ready again", stages)
            assert gauge(port, "mailpipe_waiting_for_redis_messages") == 0
        text = (second_logs / "producer-0.log").read_text()
        assert text.count(WAITING) == 1 and text.count(BACK) == 1, text[-5000:]

    ids = job_ids(settings, topology)
    assert set(ids) == set(before) | set(published)
    assert len(set(published)) == MAILS - COPIES
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1]
    dead = read_dead(settings.amqp_url, settings.namespace)
    assert len(dead) == 1 and not any(d.first_death_reason == "delivery_limit" for d in dead), dead


def test_a_frozen_redis_stalls_neither_the_session_nor_the_intake(settings: Settings, tmp_path: Path) -> None:
    Path(settings.servers_file).write_text(SERVERS, encoding="utf-8")
    topology = Topology.from_settings(settings)
    with PrivateRedis(tmp_path) as private_redis:
        # RabbitMQ closes a connection silent for about two heartbeats: here about 4 s, less than
        # MAILPIPE_REDIS_TIMEOUT_S (5 s).
        settings = settings.replace(redis_url=private_redis.url, heartbeat_s=2)
        logs = tmp_path / "logs"
        logs.mkdir()
        stages = StageProcesses(settings, logs, "producer")
        with stages:
            before = publish(settings, requests(3, 0, "before"))
            wait_until(lambda: depth(settings, topology.intake) == (0, 0), 30, "the first mails queued", stages)
            assert private_redis.proc is not None
            private_redis.proc.send_signal(signal.SIGSTOP)
            frozen_at = time.monotonic()
            try:
                frozen = requests(100, 0, "frozen")
                published = publish(settings, frozen, chunk=100)
                wait_until(lambda: depth(settings, topology.intake) == (0, messages(topology, frozen)), 20,
                           "the producer holding every request unacked", stages)
                while time.monotonic() - frozen_at < FROZEN_S:
                    assert DROPPED not in stages.logs(), \
                        f"the producer lost its session while Redis was frozen\n{stages.logs()}"
                    assert depth(settings, topology.dead) == (0, 0), stages.logs()
                    time.sleep(1.0)
            finally:
                private_redis.proc.send_signal(signal.SIGCONT)
            wait_until(lambda: depth(settings, topology.intake) == (0, 0), 30,
                       "every request handled once Redis is back", stages)
        text = (logs / "producer-0.log").read_text()
        assert text.count(WAITING) == 1 and text.count(BACK) == 1, text[-5000:]
    assert job_ids(settings, topology) == Counter(before + published)
    assert read_dead(settings.amqp_url, settings.namespace) == []
