"""MAILPIPE_REDIS_WAIT_REPLICAS against a real Redis that has no replica: a grant, a claim or a
mark that no replica holds is never used (the limiter releases nothing, the sender sends
nothing). tests/faults/test_cluster.py shows the other side, with a replica and a failover."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from limiter.decide import TenantAsk
from limiter.gcra import Limits, local_midnights
from limiter.redis_limiter import Ask, RedisLimiter, connect
from mailpipe import redis_client
from mailpipe.errors import RedisUnavailable
from mailpipe.model import Job
from mailpipe.settings import Settings
from sender.claims import Claims

pytestmark = pytest.mark.integration


def test_a_grant_no_replica_holds_is_not_used_and_comes_back_the_same(redis_url: str) -> None:
    namespace = f"test-{uuid.uuid4().hex}"
    client = connect(redis_url)
    tenants = [TenantAsk("a", 2, 100, local_midnights("UTC", time.time()))]
    try:
        waiting = RedisLimiter(client, namespace, wait_replicas=1)
        with pytest.raises(RedisUnavailable, match="0 of the 1 replica"):
            waiting.decide(Ask("s", "b1", 2, Limits.for_server(3600, 10), tenants))
        # The grant was made on the primary and is remembered: asked again, it comes back the
        # same, not a second time (here without waiting, as after a replica caught up).
        again = RedisLimiter(client, namespace).decide(Ask("s", "b1", 2, Limits.for_server(3600, 10), tenants))
        assert again.granted == 2 and again.cached
    finally:
        for key in client.scan_iter(match=f"*{namespace}*", count=1000):
            client.delete(key)
        client.close()


def test_a_claim_no_replica_holds_stops_the_sender(redis_url: str) -> None:
    namespace = f"test-{uuid.uuid4().hex}"
    job = Job(id="j1", tenant="a", server="s", sender="a@x.example", recipients=("r@y.example",), message=b"x")

    async def claim() -> None:
        client = redis_client.connect_async(Settings(redis_url=redis_url))
        try:
            claims = Claims(client, namespace, 60, wait_replicas=1)
            with pytest.raises(RedisUnavailable, match="claims reached 0 of the 1 replica"):
                await claims.claim("owner", "grant", [job], [job.recipients], 2**62, 2**62)
        finally:
            await client.aclose()

    asyncio.run(claim())
