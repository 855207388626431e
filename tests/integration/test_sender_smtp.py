"""SMTP delivery against the aiosmtpd peer, without the broker: pool, TLS modes, AUTH, the
window, and ``servers check``. Sent marks are tested in test_sender.py (with Redis)."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from mailpipe.errors import SmtpPermanent, SmtpTransient
from mailpipe.model import Job, new_id, now_ms
from mailpipe.servers import Config, ServerConfig, parse_config
from sender.check import check_servers
from sender.claims import Claims
from sender.delivery import BatchDelivery, Hold, deliver
from sender.pool import Pools, ServerPool
from sender.smtp import open_connection
from tests.smtp_peer import SmtpPeer, TestCerts, make_test_ca

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCerts:
    return make_test_ca(tmp_path_factory.mktemp("ca"))


def config(port: int, environ: dict[str, str] | None = None, **fields: Any) -> Config:
    table = {"address": f"[127.0.0.1]:{port}", "tls": "none", **fields}
    return parse_config({"servers": {"smtp": table}}, "test", environ or {})


def server(port: int, **fields: Any) -> ServerConfig:
    return config(port, **fields).servers["smtp"]


def job(*recipients: str, size: int = 200) -> Job:
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, size // len(line))
    return Job(id=new_id(), tenant="acme", server="smtp", sender="hr@acme.example", recipients=recipients,
               message=b"Subject: t\r\n\r\n" + body, created_ms=now_ms())


def run_delivery(jobs: list[Job], srv: ServerConfig, window_s: float = 30.0, **pool: Any) -> BatchDelivery:
    async def go() -> BatchDelivery:
        pools = Pools(default_size=pool.get("size", 4), timeout_s=pool.get("timeout_s", 5.0),
                      idle_timeout_s=60)
        try:
            return await deliver(jobs, srv, pools.get(srv), time.monotonic() + window_s, hold=None,
                                 margin_s=0.2)
        finally:
            await pools.close()
    return asyncio.run(go())


def test_connections_are_reused_across_mails_and_capped_per_connection() -> None:
    with SmtpPeer() as peer:
        result = run_delivery([job(f"u{i}@example.com") for i in range(40)],
                              server(peer.port, max_mails_per_connection=5), size=2)
        assert len(peer.messages) == 40
        # 40 mails, 5 per connection: 8, or 9 when the two workers did not share the mails
        # evenly (each may end on a connection it did not fill). Without reuse: 40; uncapped: 2.
        assert peer.connections in (8, 9)
    assert all(o.attempted and len(o.sent) == 1 for o in result.outcomes)


def test_pool_keeps_connections_between_batches() -> None:
    async def go(srv: ServerConfig) -> None:
        pool = ServerPool(srv, size=2, timeout_s=5, idle_timeout_s=60)
        for _ in range(3):
            await deliver([job("a@example.com"), job("b@example.com")], srv, pool, time.monotonic() + 10,
                          hold=None)
        assert pool.idle == 2
        await pool.close()

    with SmtpPeer() as peer:
        asyncio.run(go(server(peer.port)))
        assert len(peer.messages) == 6 and peer.connections == 2


def test_fresh_connection_after_a_dropped_one() -> None:
    with SmtpPeer() as peer:
        peer.drop_connections(1, at="data")
        result = run_delivery([job(f"u{i}@example.com") for i in range(5)], server(peer.port), size=1)
        assert len(peer.messages) == 4
        assert peer.connections == 2
    deferred = [o for o in result.outcomes if o.deferred]
    assert len(deferred) == 1
    [reply] = deferred[0].deferred.values()
    assert reply.category == "connection"


def test_stalled_data_times_out_and_is_deferred() -> None:
    with SmtpPeer() as peer:
        peer.stall_after_data(3.0, times=1)
        result = run_delivery([job("a@example.com"), job("b@example.com")], server(peer.port), size=1,
                              timeout_s=0.5)
    replies = [r for o in result.outcomes for r in o.deferred.values()]
    assert [r.category for r in replies] == ["connection"]
    assert "timed out" in replies[0].text
    assert sum(len(o.sent) for o in result.outcomes) == 1


def test_unreachable_server_defers_every_mail_without_knocking_per_mail() -> None:
    with SmtpPeer() as peer:
        port = peer.port
    result = run_delivery([job(f"u{i}@example.com") for i in range(20)], server(port))
    assert all(o.attempted for o in result.outcomes)
    categories = {r.category for o in result.outcomes for r in o.deferred.values()}
    assert categories == {"connection"}


def test_server_refusing_at_greeting_is_a_connection_failure() -> None:
    with SmtpPeer() as peer:
        peer.drop_connections(1, at="connect")
        with pytest.raises(SmtpTransient) as info:
            asyncio.run(open_connection(server(peer.port), timeout_s=5))
    assert info.value.category == "connection"


def test_starttls_upgrades_when_offered(certs: TestCerts) -> None:
    async def go(srv: ServerConfig) -> bool:
        conn = await open_connection(srv, timeout_s=5)
        await conn.quit()
        return conn.tls

    with SmtpPeer(starttls_context=certs.server_context()) as peer:
        assert asyncio.run(go(server(peer.port, tls="starttls", ca_file=str(certs.ca_file))))
        assert asyncio.run(go(server(peer.port, tls="opportunistic", ca_file=str(certs.ca_file))))
    with SmtpPeer() as peer:  # opportunistic without STARTTLS offered: clear text, allowed
        assert not asyncio.run(go(server(peer.port, tls="opportunistic")))


def test_tls_verify_false_accepts_an_unknown_ca(certs: TestCerts) -> None:
    with SmtpPeer(tls_context=certs.server_context()) as peer:
        with pytest.raises(SmtpTransient) as info:
            asyncio.run(open_connection(server(peer.port, tls="implicit"), timeout_s=5))
        assert info.value.category == "tls_failed"
        run_delivery([job("a@example.com")], server(peer.port, tls="implicit", tls_verify=False))
        assert len(peer.messages) == 1


def test_auth_over_starttls_and_wrong_password(certs: TestCerts) -> None:
    # AUTH only over TLS (issue 13; without STARTTLS: test_sender_tls_auth.py).
    env = {"CREDS": "mailer right"}
    tls = {"tls": "starttls", "ca_file": str(certs.ca_file)}
    with SmtpPeer(auth={"mailer": "right"}, starttls_context=certs.server_context()) as peer:
        srv = config(peer.port, env, credentials_env="CREDS", **tls).servers["smtp"]
        run_delivery([job("a@example.com")], srv)
        assert [m.auth_user for m in peer.messages] == ["mailer"]
        bad = config(peer.port, {"CREDS": "mailer wrong"}, credentials_env="CREDS", **tls).servers["smtp"]
        with pytest.raises(SmtpPermanent) as info:
            asyncio.run(open_connection(bad, timeout_s=5))
        assert (info.value.code, info.value.category) == (535, "auth_failed")


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
def test_replies_stay_with_their_commands_on_one_connection(pipelining: bool) -> None:
    """Refused recipients, a transaction with none accepted, a refused DATA, then a mail whose
    lines start with dots: every reply lands on its own command, the session survives each."""
    dotted = Job(id=new_id(), tenant="acme", server="smtp", sender="hr@acme.example",
                 recipients=("dots@example.com",), created_ms=now_ms(),
                 message=b"Subject: dots\r\n\r\n.starts with a dot\r\n..two\r\n.\r\nend\r\n")
    with SmtpPeer(pipelining=pipelining) as peer:
        peer.refuse("later@example.com", 451, "4.7.1 Try again later")
        peer.refuse("gone@example.com", 550, "5.1.1 No such user")
        peer.refuse_data("datafail@example.com", 554, "5.7.1 Rejected as spam")
        jobs = [job("ok@example.com", "later@example.com", "gone@example.com"), job("gone@example.com"),
                job("datafail@example.com"), dotted]
        result = run_delivery(jobs, server(peer.port), size=1)
        received = peer.messages
        pipelined, mails, connections = peer.pipelined_mails, peer.mails, peer.connections
    first, none_accepted, data_refused, last = result.outcomes
    assert (first.sent, sorted(first.deferred), sorted(first.failed)) == (
        ["ok@example.com"], ["later@example.com"], ["gone@example.com"])
    assert first.failed["gone@example.com"].code == 550
    assert (none_accepted.sent, list(none_accepted.failed)) == ([], ["gone@example.com"])
    assert data_refused.sent == [] and data_refused.failed["datafail@example.com"].code == 554
    assert last.sent == ["dots@example.com"]
    assert [m.recipients for m in received] == [("ok@example.com",), ("dots@example.com",)]
    assert received[1].content.endswith(b"\r\n.starts with a dot\r\n..two\r\n.\r\nend\r\n")
    assert connections == 1
    assert pipelined == (mails if pipelining else 0) and mails == 4


def test_mail_too_large_is_failed() -> None:
    with SmtpPeer(data_size_limit=10_000) as peer:
        result = run_delivery([job("a@example.com", size=50_000)], server(peer.port))
    [reply] = result.outcomes[0].failed.values()
    assert (reply.code, reply.category) == (552, "too_large")


def test_servers_check_reports_what_works(certs: TestCerts, tmp_path: Path) -> None:
    env = {"CREDS": "mailer s3cret"}
    with SmtpPeer(starttls_context=certs.server_context(), auth={"mailer": "s3cret"}) as good, \
            SmtpPeer() as clear:
        cfg = parse_config({"servers": {
            "good": {"address": f"[127.0.0.1]:{good.port}", "tls": "starttls", "ca_file": str(certs.ca_file),
                     "credentials_env": "CREDS"},
            "clear": {"address": f"[127.0.0.1]:{clear.port}", "tls": "starttls"},
        }}, "test", env)
        out = io.StringIO()
        started = time.monotonic()
        assert check_servers(cfg, ["good"], out=out) == 0
        text = out.getvalue()
        assert "TLS ok" in text and "AUTH ok as mailer" in text and "s3cret" not in text
        out = io.StringIO()
        assert check_servers(cfg, [], out=out) == 1
        text = out.getvalue()
        assert "clear: FAILED" in text and "[tls_failed]" in text and "STARTTLS" in text
        assert check_servers(cfg, ["nope"], out=io.StringIO()) == 1
        assert time.monotonic() - started < 10


def test_500_mails_of_160_kb_with_50_ms_replies_inside_one_minute() -> None:
    """The seeds' promise: a full batch (500 mails, 80 MB) delivered within its minute."""
    jobs = [job(f"u{i}@example.com", size=160 * 1024) for i in range(500)]
    with SmtpPeer(reply_delay_s=0.05) as peer:
        started = time.monotonic()
        result = run_delivery(jobs, server(peer.port), window_s=60.0)
        elapsed = time.monotonic() - started
        assert len(peer.messages) == 500
    assert not any(o.back for o in result.outcomes) and not result.stopped_by
    assert elapsed < 60, f"{elapsed:.1f} s"


def test_marks_that_redis_will_not_take_stop_the_batch(redis_url: str) -> None:
    """Redis pauses writes (CLIENT PAUSE WRITE): the first marks time out, and the batch stops
    rather than send mail it could not mark; the rest is left unattempted, to go back. Once
    Redis takes writes again, the next delivery sends it all."""
    async def go(port: int) -> tuple[BatchDelivery, BatchDelivery]:
        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=0.3)
        pools = Pools(default_size=1, timeout_s=5.0, idle_timeout_s=60)
        claims = Claims(client, f"test-{new_id()}", ttl_s=60)
        srv = server(port)
        seconds, micros = await client.time()
        deadline_us = (seconds + 30) * 1_000_000 + micros

        def hold(grant: str) -> Hold:
            return Hold(claims, f"holder-{grant}", grant, deadline_us, 5_000_000)

        try:
            # Claims are taken before the pause: the marks after the first 250s time out.
            first_task = asyncio.create_task(
                deliver(jobs, srv, pools.get(srv), 0.0, hold=hold("g1"), margin_s=0.2))
            while not peer.messages:
                await asyncio.sleep(0.005)
            await client.execute_command("CLIENT", "PAUSE", "1500", "WRITE")
            first = await first_task
            await asyncio.sleep(1.6)  # the pause is over
            await claims.release("holder-g1", first.releases("g1"))
            rest = [replace(jobs[i], recipients=tuple(o.back)) for i, o in enumerate(first.outcomes) if o.back]
            second = await deliver(rest, srv, pools.get(srv), 0.0, hold=hold("g2"), margin_s=0.2)
            return first, second
        finally:
            await pools.close()
            await client.aclose()

    jobs = [job(f"u{i}@example.com") for i in range(40)]
    with SmtpPeer(reply_delay_s=0.01) as peer:
        first, second = asyncio.run(go(peer.port))
        received = peer.recipients()
    sent_first = sum(1 for o in first.outcomes if o.sent)
    assert first.stopped_by == "redis"
    assert 0 < sent_first < 40 and sum(1 for o in first.outcomes if o.back) == 40 - sent_first
    assert not second.stopped_by and all(o.sent for o in second.outcomes)
    assert sorted(received) == sorted(f"u{i}@example.com" for i in range(40))  # each once
