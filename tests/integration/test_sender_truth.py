"""One holder per recipient, against a real RabbitMQ, Redis and SMTP peer: each test walks one
path where two deliveries met the same mail (issue 12, findings 3, 4 and 7), and counts what
the peer received per recipient.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from mailpipe import codec
from mailpipe.amqp import Broker
from mailpipe.model import Batch, Job, now_ms
from mailpipe.settings import Settings
from mailpipe.stage import _handle
from sender.claims import Claim, Claims, claim_key
from sender.delivery import Hold, deliver
from sender.pool import Pools
from sender.stage import SenderStage
from tests.integration.test_sender import Bus, by_outcome, granted, make_job, run_sender, write_servers
from tests.smtp_peer import Received, SmtpPeer

pytestmark = pytest.mark.integration


@pytest.fixture
def bus(settings: Settings) -> Iterator[Bus]:
    b = Bus(settings)
    yield b
    b.conn.close()


def three_recipient_jobs(n: int) -> list[Job]:
    return [make_job(f"a{i}@example.com", f"b{i}@example.com", f"c{i}@example.com") for i in range(n)]


def each_once(peer: SmtpPeer, jobs: list[Job]) -> Counter[str]:
    """Recipients the peer got other than exactly once (empty: each exactly once)."""
    got = Counter(peer.recipients())
    want = {r for job in jobs for r in job.recipients}
    return Counter({r: got[r] for r in want | set(got) if got[r] != 1})


def test_two_copies_of_one_granted_batch_send_each_recipient_once(settings: Settings, bus: Bus) -> None:
    """A limiter that dies between its confirm and its ack publishes the granted batch twice,
    with the same grant: two deliveries hold it at once. Before, both read the marks at their
    start and both sent everything."""
    jobs = three_recipient_jobs(12)
    batch = granted(jobs)
    with SmtpPeer(reply_delay_s=0.02) as peer:
        write_servers(settings, peer.port)
        bus.send(batch, batch)
        run_sender(settings, send_prefetch=4)
        assert each_once(peer, jobs) == Counter()
    assert bus.retries() == [] and bus.dead() == []
    assert set(by_outcome(bus.events())["sent"]) == {r for j in jobs for r in j.recipients}


def test_a_repacked_batch_and_copies_inside_one_batch_send_once(settings: Settings, bus: Bus) -> None:
    """A packer that dies after its confirm packs the same jobs again under a new batch id and
    grant; a job can also be in one batch twice. The claims cover both."""
    jobs = three_recipient_jobs(10)
    first = granted(jobs)
    repacked = granted([*jobs[5:], *jobs[:5]])
    doubled = granted([jobs[0], jobs[0], jobs[1]])
    with SmtpPeer(reply_delay_s=0.01) as peer:
        write_servers(settings, peer.port)
        bus.send(first, repacked, doubled)
        run_sender(settings, send_prefetch=4)
        assert each_once(peer, jobs) == Counter()
    assert bus.retries() == [] and bus.dead() == []


class DrivenSender:
    """The sender stage driven by hand, as ``mailpipe.stage.run`` drives it, so a test can cut
    its broker connection in the middle of a delivery and connect it again."""

    def __init__(self, settings: Settings) -> None:
        self.stage = SenderStage(settings)
        self.broker = self.connect()

    def connect(self) -> Broker:
        broker = Broker(self.stage.settings.amqp_url, client_name="test-sender-driven").connect()
        self.stage.topology.declare(broker.channel())
        self.stage.start(broker)
        broker.consume(self.stage.input_queue, self.stage.prefetch)
        return broker

    def poll(self) -> None:
        deliveries = self.broker.poll(0.05)
        if deliveries:
            _handle(self.stage, self.broker, deliveries)
        self.stage.tick(self.broker)

    def close(self) -> None:
        self.broker.close()
        self.stage.close()


def test_a_reconnect_fences_the_deliveries_of_the_lost_connection(settings: Settings, bus: Bus) -> None:
    """The connection drops while a batch is being sent; the batch comes back redelivered.
    Before, the stage forgot the running delivery and sent the unsent rest a second time."""
    jobs = three_recipient_jobs(20)
    with SmtpPeer(reply_delay_s=0.03) as peer:
        write_servers(settings, peer.port)
        sender = DrivenSender(settings.replace(send_concurrency=1))
        try:
            bus.send(granted(jobs))
            deadline = time.monotonic() + 10
            while len(peer.messages) < 3 and time.monotonic() < deadline:
                sender.poll()
            assert 3 <= len(peer.messages) < 20, "the cut must come in the middle of the batch"
            sender.broker.close()  # the batch is redelivered; its delivery is still running
            sender.broker = sender.connect()
            everyone = {r for j in jobs for r in j.recipients}
            returned: list[Batch] = []
            end = time.monotonic() + 20
            while time.monotonic() < end:
                sender.poll()
                returned += bus.returned()
                back = {r for b in returned for raw in b.jobs for r in codec.decode_job(raw).recipients}
                if set(peer.recipients()) | back >= everyone and not sender.stage.busy():
                    break
        finally:
            sender.close()
        assert max(Counter(peer.recipients()).values()) == 1
        received = set(peer.recipients())
    # What the fenced delivery did not send comes back to the limiter, never sent twice.
    assert received | back == everyone
    assert not received & back
    assert bus.left_in_send() == 0


def test_a_mark_is_in_redis_before_the_next_mail_on_its_connection(settings: Settings) -> None:
    """A holder that dies leaves at most the last mail of each connection accepted and unmarked.
    Before, marks were awaited at the end of the batch: Redis slow to write (each write delayed
    50 ms here) let several mails go out unmarked on one connection."""
    jobs = three_recipient_jobs(8)
    client: Any = redis.Redis.from_url(settings.redis_url)
    marked_at_data: list[int] = []

    class Peer(SmtpPeer):
        def _record(self, received: Received) -> None:
            marked = sum(1 for job in jobs if client.hget(claims_key(job), job.recipients[0]) == b"s")
            marked_at_data.append(marked)
            super()._record(received)

    def claims_key(job: Job) -> str:
        return claim_key(settings.namespace, job)

    class SlowMarks(Claims):
        async def _write(self) -> None:
            await asyncio.sleep(0.05)
            await super()._write()

    async def go(port: int) -> None:
        aclient: Any = redis.asyncio.Redis.from_url(settings.redis_url)
        claims = SlowMarks(aclient, settings.namespace, ttl_s=60)
        pools = Pools(default_size=1, timeout_s=5.0, idle_timeout_s=60)
        srv = write_servers_config(port)
        seconds, micros = await aclient.time()
        hold = Hold(claims, "holder", "grant", (seconds + 30) * 1_000_000 + micros, 5_000_000)
        try:
            result = await deliver(jobs, srv, pools.get(srv), 0.0, hold=hold, margin_s=0.2)
            assert all(len(o.sent) == 3 for o in result.outcomes), (result.stopped_by, result.outcomes[:2])
        finally:
            await pools.close()
            await aclient.aclose()

    def write_servers_config(port: int) -> Any:
        from mailpipe.servers import parse_config
        return parse_config({"servers": {"smtp": {"address": f"[127.0.0.1]:{port}", "tls": "none"}}},
                            "test", {}).servers["smtp"]

    try:
        with Peer() as peer:
            asyncio.run(go(peer.port))
    finally:
        client.close()
    # The k-th mail reached DATA only once the k-1 before it were marked.
    assert marked_at_data == list(range(len(jobs)))


@pytest.mark.parametrize("skew_s", [30.0, -30.0])
def test_a_sender_clock_off_by_30_s_changes_nothing(settings: Settings, bus: Bus,
                                                    monkeypatch: pytest.MonkeyPatch, skew_s: float) -> None:
    """Deadlines are judged in Redis time. A batch with 10 s of its window left is sent by a
    sender 30 s ahead (before, it gave it all back as late); one 5 s past its deadline is given
    back by a sender 30 s behind (before, it sent it with 25 s to spare)."""
    jobs = three_recipient_jobs(3)
    late = granted(three_recipient_jobs(3), window_s=60, granted_ms=now_ms() - 65_000)
    fresh = granted(jobs, window_s=10)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + skew_s)
    with SmtpPeer() as peer:
        write_servers(settings, peer.port)
        bus.send(fresh, late)
        run_sender(settings)
        assert sorted(peer.recipients()) == sorted(r for j in jobs for r in j.recipients)
    back = bus.returned()
    assert [b.mails for b in back] == [3] and back[0].refund_of == late.id


def test_a_late_batch_gives_back_what_nobody_touched_with_its_refund(settings: Settings, bus: Bus) -> None:
    """Picked up after its deadline: nothing sent; the jobs nobody claimed refund their tokens,
    a job another holder still holds does not."""
    jobs = three_recipient_jobs(3)
    batch = granted(jobs, window_s=60, granted_ms=now_ms() - 61_000)
    assert batch.grant_id is not None
    client = redis.Redis.from_url(settings.redis_url)
    try:
        held = jobs[0]
        key = claim_key(settings.namespace, held)
        seconds, _ = client.time()  # type: ignore[misc]
        client.hset(key, held.recipients[1], f"h other {(seconds + 60) * 1_000_000} {batch.grant_id}")
        with SmtpPeer() as peer:
            write_servers(settings, peer.port)
            bus.send(batch)
            run_sender(settings)
            assert peer.messages == []
    finally:
        client.close()
    [back] = bus.returned()
    assert (back.mails, back.refund, back.refund_of, back.refund_tenants) == (3, 2, batch.id, {"acme": 2})


def test_claims_keep_one_grant_from_sending_twice_what_it_gave_back(settings: Settings) -> None:
    """The states a second holder meets, straight from the script: what a holder of grant G
    released (given back or refused, its outcome published) is done for every other holder
    of G, and free for a holder of another grant, but for a deferred one, whose retry copy
    (attempt + 1) sends it: done for every holder of this attempt; what a holder of G left unknown (fenced, or
    its lease ran out) is not sent under G again, but is free under another grant."""
    job = make_job("given@x", "refused@x", "fenced@x", "sent@x", "deferred@x", "held@x")

    async def go() -> dict[str, dict[str, Claim]]:
        client: Any = redis.asyncio.Redis.from_url(settings.redis_url)
        claims = Claims(client, settings.namespace, ttl_s=60)
        seconds, micros = await client.time()
        now = seconds * 1_000_000 + micros
        far = now + 60_000_000
        try:
            first = await claims.claim("one", "G", [job], [job.recipients], far, far)
            assert set(first.codes[0].values()) == {Claim.MINE}
            await claims.release("one", [(job, "given@x", "r G"), (job, "refused@x", "x G"),
                                         (job, "fenced@x", "a G"), (job, "deferred@x", "d G")])
            await claims.mark_sent(job, ["sent@x"])
            out = {}
            for holder, grant in (("two", "G"), ("three", "H")):
                snap = await claims.claim(holder, grant, [job], [job.recipients[:5]], far, far)
                out[holder] = snap.codes[0]
            out["held"] = (await claims.claim("four", "H", [job], [["held@x"]], far, far)).codes[0]
            return out
        finally:
            await client.aclose()

    got = asyncio.run(go())
    assert got["two"] == {"given@x": Claim.DONE, "refused@x": Claim.DONE, "fenced@x": Claim.TOUCHED,
                          "sent@x": Claim.SENT, "deferred@x": Claim.DONE}
    # Deferred: its retry copy (attempt + 1) sends it, so no holder of this attempt does, whatever its grant.
    assert got["three"] == {"given@x": Claim.MINE, "refused@x": Claim.MINE, "fenced@x": Claim.MINE,
                            "sent@x": Claim.SENT, "deferred@x": Claim.DONE}
    assert got["held"] == {"held@x": Claim.HELD}  # "one" still holds it, under its lease
