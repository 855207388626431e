"""No DATA past the deadline (issue 21, item 3). The cutoff (deadline - margin) was checked
before MAIL FROM only: a server that delays its 354 (a tarpit), or a previous mail's "sent"
mark slow to reach Redis, let the body go after the deadline, and the server received mail above
rate x window + burst. Now the wait for the 354 is bounded by the cutoff and the cutoff is
checked again just before the body; past it, the connection is dropped (a transaction cannot
be un-DATAed: a server discards a mail whose connection closes before its final dot) and the
recipients go back to the limiter as touched. Times are measured where they count: at the peer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis

from mailpipe import codec
from mailpipe.model import now_ms
from mailpipe.servers import parse_config
from mailpipe.settings import Settings
from sender.claims import Claims
from sender.delivery import Hold, deliver
from sender.pool import Pools
from tests.integration.test_sender import Bus, granted, make_job, run_sender, write_servers
from tests.smtp_peer import SmtpPeer

pytestmark = pytest.mark.integration


class TarpitPeer(SmtpPeer):
    """Holds every 354 (the go-ahead for the body) ``tarpit_s`` before it answers."""

    tarpit_s = 0.0

    def _make_smtp(self, authenticator: Any) -> Any:
        smtp = super()._make_smtp(authenticator)
        push: Callable[[str], Awaitable[None]] = smtp.push

        async def slow_go_ahead(status: str) -> None:
            if status.startswith("354") and self.tarpit_s > 0:
                await asyncio.sleep(self.tarpit_s)
            await push(status)

        smtp.push = slow_go_ahead  # aiosmtpd's DATA calls self.push("354 ...")
        return smtp


@pytest.fixture
def bus(settings: Settings) -> Iterator[Bus]:
    b = Bus(settings)
    yield b
    b.conn.close()


def test_a_tarpit_that_holds_the_354_past_the_window_gets_no_body(settings: Settings, bus: Bus) -> None:
    jobs = [make_job(f"r{i}@example.com") for i in range(2)]
    batch = granted(jobs, window_s=2.0)
    assert batch.deadline_ms is not None
    with TarpitPeer() as peer:
        peer.tarpit_s = 4.0  # more than the window: before, the body went at +4 s
        write_servers(settings, peer.port)
        bus.send(batch)
        run_sender(settings, smtp_timeout_s=10.0, send_margin_s=0.2, send_concurrency=2)
        late = [round((m.time * 1000 - batch.deadline_ms) / 1000, 2) for m in peer.messages
                if m.time * 1000 > batch.deadline_ms]
    assert late == [], f"mail arrived {late} s after its batch's deadline"
    [back] = bus.returned()
    assert sorted(r for raw in back.jobs for r in codec.decode_job(raw).recipients) == ["r0@example.com",
                                                                                   "r1@example.com"]
    # r0 was touched under this grant (the server saw its envelope): no refund for it; r1 waited
    # for the first connection's verdict on a server that had not yet taken a mail, untouched.
    assert (back.refund, back.refund_tenants) == (1, {"acme": 1})
    assert bus.retries() == [] and bus.dead() == []


def test_a_body_waiting_for_the_previous_mark_past_the_cutoff_is_not_sent(settings: Settings) -> None:
    """The 354 comes at once, but the body waits for the previous mail's "sent" mark (one mail
    unmarked per connection at most), which Redis takes 1.5 s to write: the cutoff passes."""
    jobs = [make_job("first@example.com"), make_job("second@example.com")]

    class SlowMarks(Claims):
        async def _write(self) -> None:
            await asyncio.sleep(1.5)
            await super()._write()

    async def go(port: int) -> tuple[Any, int]:
        client: Any = redis.asyncio.Redis.from_url(settings.redis_url)
        claims = SlowMarks(client, settings.namespace, ttl_s=60)
        pools = Pools(default_size=1, timeout_s=5.0, idle_timeout_s=60)
        server = parse_config({"servers": {"smtp": {"address": f"[127.0.0.1]:{port}", "tls": "none"}}},
                              "test", {}).servers["smtp"]
        seconds, micros = await client.time()
        deadline_us = (seconds + 1) * 1_000_000 + micros  # a window of 1 s from now
        hold = Hold(claims, "holder", "grant", deadline_us, 5_000_000)
        try:
            return await deliver(jobs, server, pools.get(server), 0.0, hold=hold, margin_s=0.2), deadline_us
        finally:
            await pools.close()
            await client.aclose()

    with SmtpPeer() as peer:
        started_ms = now_ms()
        result, _ = asyncio.run(go(peer.port))
        arrived = [(m.recipients, round((m.time * 1000 - started_ms) / 1000, 2)) for m in peer.messages]
    assert arrived and arrived[0][0] == ("first@example.com",)
    assert len(arrived) == 1, f"the second body went after the cutoff: {arrived}"
    assert result.outcomes[1].back == ["second@example.com"] and result.stopped_by == "deadline"
