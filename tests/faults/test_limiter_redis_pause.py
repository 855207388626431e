"""A batch the limiter routes while Redis takes no writes waits, then goes on (found by the fault
campaign's release_fails: Redis writes paused past a call's timeout).

The limiter routes each batch from ``batches`` into its lane: ``lane_enter`` in Redis, publish,
``lane_exit``, ack. When ``lane_enter`` failed, the batch was dropped from the limiter's list but
never acked: it stayed unacked in ``batches`` for as long as the limiter lived, its mail with it.
Now it is routed again once Redis answers; a ``lane_exit`` Redis refuses after the publish is
made later, without publishing twice. On a private Redis (the shared one is never paused).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from mailpipe import codec
from mailpipe.amqp import Broker, Outgoing
from mailpipe.model import Batch, Job, new_id, now_ms
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from tests.faults.harness import Pipeline, PrivateRedis, queue_depths, wait_until, write_servers

pytestmark = [pytest.mark.faults, pytest.mark.integration]

PAUSE_MS = 8000


def batch_of(n: int) -> Batch:
    jobs = [Job(id=new_id(), tenant="acme", server="tenant-smtp", sender="hr@acme.example",
                recipients=(f"user{i}@example.com",), message=b"Subject: t\r\n\r\nhello\r\n", created_ms=now_ms(),
                enqueued_ms=now_ms()) for i in range(n)]
    return Batch(id=new_id(), server="tenant-smtp", jobs=tuple(codec.encode_job(j) for j in jobs), mails=n,
                 bytes=sum(j.size for j in jobs), created_ms=now_ms(), tenants={"acme": n})


def test_a_batch_routed_while_redis_takes_no_writes_goes_on_once_it_does(settings: Settings, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    topology = Topology.from_settings(settings)
    with PrivateRedis(tmp_path) as private_redis:
        settings = settings.replace(redis_url=private_redis.url)
        client = redis.Redis.from_url(private_redis.url, socket_timeout=5)
        write_servers(settings, 2525)  # unlimited: granted at once, into ``send`` (no sender runs)

        def depth(queue: str) -> tuple[int, int]:
            return (queue_depths(settings.namespace) or {}).get(queue, (-1, -1))

        def publish(batch: Batch) -> None:
            broker = Broker(settings.amqp_url, client_name="limiter-pause").connect()
            try:
                broker.publish([Outgoing(topology.batches, codec.encode_batch(batch), message_id=batch.id)])
            finally:
                broker.close()

        with Pipeline(settings, logs, stages=("limiter",)) as pipeline:
            publish(batch_of(3))
            wait_until(lambda: depth(topology.send) == (1, 0), 30, "the first batch granted", pipeline)
            client.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
            paused_at = time.monotonic()
            publish(batch_of(4))
            wait_until(lambda: depth(topology.batches) == (0, 1), 5, "the limiter holding the second batch", pipeline)
            assert time.monotonic() - paused_at < PAUSE_MS / 1000, "the pause ended before the test saw the hold"
            wait_until(lambda: depth(topology.send) == (2, 0) and depth(topology.batches) == (0, 0),
                       PAUSE_MS / 1000 + 30, "the second batch granted once Redis took writes again", pipeline)
        client.close()
        assert all(codes == [0] for codes in pipeline.exits.values()), pipeline.exits
