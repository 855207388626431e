"""The sent marks on their own Redis connection (sender/claims.py ``_write_marks``): what they
write is what the claims read, a refused write fails every mark it carried and leaves nothing
unread behind it, and a connection Redis closed is opened again."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import redis.asyncio

from mailpipe.errors import RedisUnavailable
from mailpipe.model import Job, new_id
from sender import claims as claims_module
from sender.claims import Claim, Claims, claim_key

pytestmark = pytest.mark.integration


def job(*recipients: str, **changes: Any) -> Job:
    fields: dict[str, Any] = {"id": new_id(), "tenant": "acme", "server": "smtp", "sender": "a@x.example",
                              "recipients": recipients, "message": b"x", "created_ms": 1_700_000_000_000}
    return Job(**{**fields, **changes})


def with_claims(redis_url: str, test: Callable[[Claims, redis.asyncio.Redis], Awaitable[None]],
                **options: Any) -> None:
    namespace = f"test-{new_id()}"

    async def go() -> None:
        # Named: the test that closes the marks' connection finds it by name, not another's.
        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=2.0, client_name=namespace)
        claims = Claims(client, namespace, ttl_s=60, **options)
        try:
            await test(claims, client)
        finally:
            async for key in client.scan_iter(match=f"*{namespace}*", count=1000):
                await client.delete(key)
            await client.aclose()

    asyncio.run(go())


def test_marks_written_together_are_what_a_later_claim_reads(redis_url: str) -> None:
    jobs = [job("a@example.com", "rené@exämple.com"), job("b@example.com"), job("c@example.com")]

    async def test(claims: Claims, client: redis.asyncio.Redis) -> None:
        now, micros = await client.time()
        lease = (now + 30) * 1_000_000 + micros
        first = await claims.claim("h1", "g1", jobs, [j.recipients for j in jobs], lease, lease)
        assert all(code == Claim.MINE for codes in first.codes for code in codes.values())
        # Asked for at once: group commit joins them into one or two round trips.
        await asyncio.gather(*(claims.mark_sent(j, j.recipients) for j in jobs))
        again = await claims.claim("h2", "g2", jobs, [j.recipients for j in jobs], lease, lease)
        assert again.codes == [dict.fromkeys(j.recipients, Claim.SENT) for j in jobs]
        assert await client.hgetall(claim_key(claims.namespace, jobs[0])) == {
            b"a@example.com": b"s", "rené@exämple.com".encode(): b"s"}

    with_claims(redis_url, test)


def test_a_refused_write_fails_its_marks_and_leaves_no_reply_unread(redis_url: str) -> None:
    bad = [job("a@example.com"), job("b@example.com")]
    before = job("z@example.com")

    async def test(claims: Claims, client: redis.asyncio.Redis) -> None:
        await claims.mark_sent(before, before.recipients)  # the connection in use: not checked again
        for j in bad:  # WRONGTYPE for their HSETs, written together
            await client.set(claim_key(claims.namespace, j), "not a hash")
        outcomes = await asyncio.gather(*(claims.mark_sent(j, j.recipients) for j in bad), return_exceptions=True)
        assert all(isinstance(o, RedisUnavailable) and "WRONGTYPE" in str(o) for o in outcomes), outcomes
        # The write after it reads its own reply, not the second refusal left of the failed write.
        later = job("c@example.com")
        await claims.mark_sent(later, later.recipients)
        assert await client.hget(claim_key(claims.namespace, later), "c@example.com") == b"s"

    with_claims(redis_url, test)


def test_a_connection_redis_closed_is_opened_again(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claims_module, "MARKS_IDLE_CHECK_S", 0.0)
    first, second = job("a@example.com"), job("b@example.com")

    async def test(claims: Claims, client: redis.asyncio.Redis) -> None:
        await claims.mark_sent(first, first.recipients)
        ours = await client.client_list()
        marks = {c["id"] for c in ours if c.get("name") == claims.namespace and c.get("cmd") == "hset"}
        assert len(marks) == 1, ours  # the marks' connection, whose last command was the HSET
        await client.client_kill_filter(_id=marks.pop())
        await claims.mark_sent(second, second.recipients)
        assert await client.hget(claim_key(claims.namespace, second), "b@example.com") == b"s"

    with_claims(redis_url, test)


def test_marks_no_replica_holds_fail(redis_url: str) -> None:
    marked = job("a@example.com")

    async def test(claims: Claims, client: redis.asyncio.Redis) -> None:
        with pytest.raises(RedisUnavailable, match=r"sent marks reached 0 of the 1 replica"):
            await claims.mark_sent(marked, marked.recipients)

    with_claims(redis_url, test, wait_replicas=1)
