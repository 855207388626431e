"""A deferral is recorded in its claim before its retry copy is published (issue 21, item 1),
against a real Redis, RabbitMQ and SMTP peer.

``D <owner> <until_us> <grant>``: deferred by owner, its retry copy (attempt + 1) perhaps not
published yet. While the lease lives, others wait; after it, the next holder takes it over and
publishes the retry copy again (a second copy of attempt + 1 is sent once: its own claims), and
never sends this attempt. The end-to-end scenario (a sender killed while Redis holds the
deferral) is tests/faults/test_third_duplicate.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from mailpipe import codec
from mailpipe.errors import RedisUnavailable
from mailpipe.settings import Settings
from mailpipe.stage import run
from sender.claims import Claim, Claims, claim_key
from sender.stage import SenderStage
from tests.integration.test_sender import Bus, by_outcome, granted, make_job, run_sender, write_servers
from tests.integration.test_sender_truth import DrivenSender
from tests.smtp_peer import SmtpPeer

pytestmark = pytest.mark.integration


@pytest.fixture
def bus(settings: Settings) -> Iterator[Bus]:
    b = Bus(settings)
    yield b
    b.conn.close()


def test_the_states_of_a_recorded_deferral(settings: Settings) -> None:
    job = make_job("deferred@x", "lapsed@x")

    async def go() -> dict[str, Any]:
        client: Any = redis.asyncio.Redis.from_url(settings.redis_url)
        claims = Claims(client, settings.namespace, ttl_s=60)
        seconds, micros = await client.time()
        now = seconds * 1_000_000 + micros
        far, soon = now + 60_000_000, now + 300_000
        key = claim_key(settings.namespace, job)
        out: dict[str, Any] = {}
        try:
            await claims.claim("one", "G", [job], [job.recipients], soon, far)
            out["defer"] = await claims.defer("one", "G", soon, [(job, "deferred@x")])
            out["stranger"] = await claims.defer("two", "H", far, [(job, "lapsed@x")])
            out["live"] = (await claims.claim("two", "H", [job], [["deferred@x"]], far, far)).codes[0]
            while (await client.time())[0] * 1_000_000 < soon + 1_000_000:  # the lease (0.3 s) ends
                await asyncio.sleep(0.05)
            out["lapsed"] = (await claims.claim("two", "H", [job], [["deferred@x"]], far, far)).codes[0]
            out["taken"] = (await client.hget(key, "deferred@x")).decode()
            out["third"] = (await claims.claim("three", "H", [job], [["deferred@x"]], far, far)).codes[0]
            # "one" comes back late: the deferral is not its any more; "two" may not erase it.
            out["late release"] = await claims.release("one", [(job, "deferred@x", "d G")])
            out["erase"] = await claims.release("two", [(job, "deferred@x", "a H"), (job, "deferred@x", "r H")])
            out["final"] = await claims.release("two", [(job, "deferred@x", "d H")])
            out["after"] = (await claims.claim("four", "K", [job], [["deferred@x"]], far, far)).codes[0]
            return out
        finally:
            await client.aclose()

    got = asyncio.run(go())
    assert got["defer"] == [True]
    assert got["stranger"] == [False]  # a holder records only what it holds
    assert got["live"] == {"deferred@x": Claim.HELD}  # its holder is finishing: wait
    assert got["lapsed"] == {"deferred@x": Claim.RETRY}  # over: republish the retry copy, take it over
    assert got["taken"].startswith("D two ") and got["taken"].endswith(" H")
    assert got["third"] == {"deferred@x": Claim.HELD}
    assert got["late release"] == [False]
    assert got["erase"] == [False, False]  # a fence's "a", a give-back's "r": not over a deferral
    assert got["final"] == [True]
    assert got["after"] == {"deferred@x": Claim.DONE}


def test_a_deferral_left_unfinished_is_republished_not_sent(settings: Settings, bus: Bus) -> None:
    """The holder that recorded the deferral died before publishing (or before releasing it):
    the next holder, under another grant, publishes the retry copy, with the message id a copy
    of it would have had, and sends nothing under this attempt."""
    job = make_job("deferred@x", "fresh@x")
    client = redis.Redis.from_url(settings.redis_url)
    try:
        seconds, _ = client.time()  # type: ignore[misc]
        client.hset(claim_key(settings.namespace, job), "deferred@x", f"D gone {(seconds - 1) * 1_000_000} G")
        with SmtpPeer() as peer:
            write_servers(settings, peer.port)
            batch = granted([job])
            bus.send(batch)
            run_sender(settings)
            assert peer.recipients() == ["fresh@x"]
        state = client.hget(claim_key(settings.namespace, job), "deferred@x")
    finally:
        client.close()
    [retry] = bus.retries()
    assert (retry.id, retry.recipients, retry.attempt, retry.created_ms) == (job.id, ("deferred@x",), 1, job.created_ms)
    assert state == f"d {batch.grant_id}".encode()
    events = by_outcome(bus.events())
    assert events == {"sent": ["fresh@x"], "deferred": ["deferred@x"]}


def test_without_redis_a_deferral_goes_back_to_the_limiter_not_to_a_retry_queue(settings: Settings, bus: Bus) -> None:
    """Redis refuses to record the deferral: no retry copy may go out (a later holder could send
    this attempt beside it), so the recipient goes back as touched, to be sent under a new grant."""

    class NoDeferrals(Claims):
        async def defer(self, *args: Any, **kwargs: Any) -> list[bool]:
            raise RedisUnavailable("Redis: recording deferrals failed: paused")

    job = make_job("busy@x")
    with SmtpPeer() as peer:
        peer.refuse("busy@x", 451, "4.7.1 Try again later", times=1)
        write_servers(settings, peer.port)
        bus.send(granted([job]))
        stage = SenderStage(settings)
        stage.smtp.start()
        stage.smtp._claims = NoDeferrals(stage.smtp._redis, settings.namespace, settings.sent_mark_ttl_s)  # type: ignore[arg-type]
        assert run(stage, burst=True, idle_exit_s=0.3) == 0
    assert bus.retries() == []
    [back] = bus.returned()
    assert [codec.decode_job(raw).recipients for raw in back.jobs] == [("busy@x",)] and back.refund == 0


def test_a_release_redis_refuses_is_tried_again(settings: Settings, bus: Bus) -> None:
    """Before, a failed release was logged as harmless and forgotten: the claims stayed held
    until their lease ended, and a given-back recipient waited for it."""
    job = make_job("given@x")
    failures = [2]

    class Flaky(Claims):
        async def release(self, owner: str, released: Any) -> list[bool]:
            if failures[0] > 0:
                failures[0] -= 1
                raise RedisUnavailable("Redis: releasing claims failed: refused")
            return await super().release(owner, released)

    with SmtpPeer() as peer:
        peer.refuse("given@x", 550, "5.1.1 no such user")
        write_servers(settings, peer.port)
        sender = DrivenSender(settings)
        sender.stage.smtp._claims = Flaky(sender.stage.smtp._redis, settings.namespace,  # type: ignore[arg-type]
                                          settings.sent_mark_ttl_s)
        client = redis.Redis.from_url(settings.redis_url)
        try:
            batch = granted([job])
            bus.send(batch)
            deadline = time.monotonic() + 15
            state = None
            while time.monotonic() < deadline:
                sender.poll()
                state = client.hget(claim_key(settings.namespace, job), "given@x")
                if state == f"x {batch.grant_id}".encode():
                    break
            assert state == f"x {batch.grant_id}".encode(), state
            assert failures == [0]
        finally:
            client.close()
            sender.close()


def test_a_batch_whose_outcomes_could_not_be_published_is_fenced(settings: Settings, bus: Bus) -> None:
    """RabbitMQ drops while a finished batch's outcomes are being published. Before, the batch
    had already left the in-flight list, so the fence after the reconnect never settled its
    claims: they stayed held by a holder that was gone. Now it is fenced like a running one: the
    refused recipient is "attempted under G" (a redelivered copy under G hands it back), and
    the deferred one stays recorded as deferred (never sent under this attempt again)."""
    job = make_job("busy@x", "bad@x")
    with SmtpPeer() as peer:
        peer.refuse("busy@x", 451, "4.7.1 Try again later")
        peer.refuse("bad@x", 550, "5.1.1 no such user")
        write_servers(settings, peer.port)
        sender = DrivenSender(settings)
        client = redis.Redis.from_url(settings.redis_url)
        try:
            batch = granted([job])
            bus.send(batch)
            deadline = time.monotonic() + 10
            while not (sender.stage._in_flight and sender.stage._in_flight[0].future.done()):
                assert time.monotonic() < deadline, "the delivery did not finish"
                deliveries = sender.broker.poll(0.05)
                if deliveries:
                    sender.stage.handle(sender.broker, deliveries)
            sender.broker.close()  # the connection is gone when the outcomes are published
            with pytest.raises(Exception):  # noqa: B017 (whatever pika raises on a closed connection)
                sender.stage.tick(sender.broker)
            sender.broker = sender.connect()  # start(): the fence
            states = {r: client.hget(claim_key(settings.namespace, job), r) for r in job.recipients}
        finally:
            client.close()
            sender.close()
    assert states["bad@x"] == f"a {batch.grant_id}".encode()
    assert (states["busy@x"] or b"").startswith(b"D ")
