"""A Redis outage of minutes does not dead-letter the reports (issue 21, found by the fault
campaign): the inbound stage holds what it consumed, unacked, and records it once Redis is back.

Before, a Redis failure while recording a round (suppressions, reputation, the spent marks of
return paths) went up to the runner, which dropped the AMQP session: the round and everything
else unacked were redelivered about once a second, each time counted, until the quorum queue
dead-lettered them at the delivery limit. Now: one warning per outage, not ready on /readyz,
``mailpipe_failing_closed{stage="inbound"}``, the reports held unacked (what needs no Redis, a
malformed message or a report nothing can read, goes to dead or review at once, as ever), and
the SMTP door answers RCPT for a return path 451 (it cannot tell a replay). Redis back, every
report is recorded once: its events published, its suppression and reputation counted once
even for a report that came twice, its return path spent; none dead-lettered.

Frozen rather than refusing (SIGSTOP: every call waits for its timeout), Redis must not stall
the stage's loop past its AMQP heartbeat either: its calls wait at most 1 s.

On a private Redis (the machine's is never stopped); the inbound stage as a process.
"""

from __future__ import annotations

import signal
import smtplib
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest
import redis

from inbound.wire import SMTP, RawReport, encode_report, report_id
from mailpipe import reputation, suppression
from mailpipe.amqp import Broker, Outgoing
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from tests.faults.harness import PrivateRedis, free_port, http_get, queue_depths, stage_gauge, wait_port
from tests.faults.ledger import read_dead
from tests.integration.test_inbound import DOMAIN, JOB, KEYS, SIGNER, Listener, report, return_path
from tests.stages import StageProcesses

pytestmark = pytest.mark.integration

SERVERS = ('[servers.platform]\naddress = "[127.0.0.1]:2"\ntls = "none"\nplatform = true\n\n'
           '[tenants.acme]\ndomains = ["acme.example"]\n\n[tenants.globex]\ndomains = ["globex.example"]\n')
BOUNCES = 40  # DSNs put in the reports queue during the outage, as the SMTP door would
COPIES = 10  # of them a second time (a reporting server that retried): counted once
COMPLAINTS = 5  # ARF reports by SMTP to the feedback address (its RCPT needs no Redis)
HELD = BOUNCES + COPIES + COMPLAINTS
# With the reconnect backoff capped at 0.5 s, a stage that loses its session on each Redis
# failure has its reports redelivered 20 times (the delivery limit) in about 15 s here.
OUTAGE_S = 25.0
FROZEN_S = 8.0  # several tries, each waiting out the stage's Redis timeout
DROPPED = "reconnected to RabbitMQ"  # the runner's line after a lost session
WAITING = "waiting for Redis"  # one warning per outage
BACK = "Redis answers again"


def gauge(port: int, name: str) -> float | None:
    return stage_gauge(port, "inbound", name)


def rcpt(settings: Settings, address: str) -> tuple[int, str, float]:
    """RCPT ``address`` at the inbound SMTP door: (code, text, seconds the answer took)."""
    with smtplib.SMTP("127.0.0.1", settings.inbound_smtp_port, timeout=60) as client:
        client.ehlo()
        client.mail("")
        asked = time.monotonic()
        code, text = client.rcpt(address)
        return code, text.decode(), time.monotonic() - asked


def one_click(settings: Settings, recipient: str) -> int:
    url = f"http://127.0.0.1:{settings.inbound_http_port}/unsubscribe/{SIGNER.link_token('acme', JOB, recipient)}"
    request = urllib.request.Request(url, data=b"List-Unsubscribe=One-Click", method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def dsn(recipient: str) -> tuple[str, bytes]:
    """A hard bounce for ``recipient`` of acme (a shared server's mail): its return path and report."""
    rp = return_path("acme", recipient)
    return rp, report("dsn-postfix-00.eml", recipient, rp.partition("@")[0], "user0@example.net")


def queued(queue: str, rp: str, data: bytes) -> Outgoing:
    """What the SMTP door puts on the reports ``queue`` for ``data`` sent to ``rp``."""
    raw = RawReport(id=report_id(data), received_ms=int(time.time() * 1000), source=SMTP, data=data,
                    mail_from="", rcpts=(rp,), peer="192.0.2.1", helo="mx.example.net")
    return Outgoing(queue, encode_report(raw), message_id=raw.id)


def counted(client: redis.Redis, namespace: str, tenant: str, kind: bytes) -> int:
    """Reports the tenant's reputation has counted: hard bounces (``b``, its ``b:<bucket>``
    fields) or complaints (``c``)."""
    fields = cast(dict[bytes, bytes], client.hgetall(reputation.tenant_key(namespace, tenant)))
    return sum(int(v) for k, v in fields.items() if k.startswith(kind + b":"))


def test_a_redis_outage_holds_the_reports_and_records_each_once_redis_is_back(
        settings: Settings, tmp_path: Path) -> None:
    Path(settings.servers_file).write_text(SERVERS, encoding="utf-8")
    topology = Topology.from_settings(settings)
    with PrivateRedis(tmp_path) as private_redis:
        port = free_port()
        settings = settings.replace(
            redis_url=private_redis.url, reconnect_max_s=0.5, verp_keys=KEYS, return_path_domain=DOMAIN,
            inbound_smtp_host="127.0.0.1", inbound_smtp_port=free_port(), inbound_http_port=free_port(),
            inbound_feedback_addresses=f"fbl@{DOMAIN}", unsubscribe_url="https://mail.mailpipe.test/unsubscribe")
        ns = settings.namespace
        logs = tmp_path / "logs"
        logs.mkdir()
        events = Listener(settings)
        stages = StageProcesses(settings, logs, "inbound", metrics_ports={"inbound": port})

        def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
            deadline = time.monotonic() + timeout_s
            while not condition():
                if DROPPED in stages.logs():
                    pytest.fail(f"the inbound stage dropped its AMQP session, its reports redelivered\n"
                                f"{stages.logs()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"not within {timeout_s} s: {what}\n{stages.logs()}")
                if not stages.alive():
                    pytest.fail(f"the inbound stage died while waiting for {what}\n{stages.logs()}")
                time.sleep(0.2)

        with stages:
            wait_until(lambda: wait_port(settings.inbound_smtp_port, 0.2) and http_get(port, "/readyz")[0] == 200,
                       30, "the inbound stage ready")
            first_rp, first = dsn("first@example.net")
            with smtplib.SMTP("127.0.0.1", settings.inbound_smtp_port, timeout=30) as client:
                client.sendmail("", [first_rp], first)
            wait_until(lambda: any(f.type == "bounced" for f in events.drain()), 20, "the first report recorded")

            private_redis.stop()
            outage_started = time.monotonic()

            # The SMTP door: a return path cannot be checked for a replay: try again later.
            code, text, took = rcpt(settings, return_path("acme", "later@example.net"))
            assert 400 <= code < 500 and text.startswith("4."), (code, text)
            assert took < 5, f"RCPT answered after {took:.1f} s"
            # A one-click unsubscribe cannot be recorded: try again later.
            assert one_click(settings, "click@example.org") == 503
            # Reports to the feedback address (no token at RCPT) are taken, and held.
            complainers = [f"fbl{i}@comcast.example" for i in range(COMPLAINTS)]
            with smtplib.SMTP("127.0.0.1", settings.inbound_smtp_port, timeout=30) as client:
                for who in complainers:
                    rp = return_path("globex", who)
                    client.sendmail("feedbackloop@comcastfbl.senderscore.net", [f"fbl@{DOMAIN}"],
                                    report("arf-cloudmark-0.eml", who, rp.partition("@")[0], "fbl0@comcast.net"))
                # A mail nothing can read goes to review at once, Redis or not.
                client.sendmail("someone@example.com", [f"postmaster@{DOMAIN}"],
                                b"From: someone@example.com\r\nSubject: hello\r\n\r\nWho reads this?\r\n")
            bounced = [f"user{i}@example.net" for i in range(BOUNCES)]
            reports = [dsn(who) for who in bounced]
            broker = Broker(settings.amqp_url, client_name="test").connect()
            broker.publish([queued(topology.reports, rp, data) for rp, data in reports + reports[:COPIES]])
            broker.publish([Outgoing(topology.reports, b"\xc1 not msgpack", message_id="malformed")])
            broker.close()

            wait_until(lambda: gauge(port, "mailpipe_waiting_for_redis_messages") == HELD, 20,
                       "the inbound stage holding every report unacked")
            wait_until(lambda: events.count(topology.dead) == 1 and events.count(topology.reports_review) == 1,
                       10, "the malformed one dead-lettered, the unreadable one in review, while Redis is down")
            (dead_letter,) = read_dead(settings.amqp_url, settings.namespace)
            reason = dead_letter.reason
            assert "msgpack" in reason or "decode" in reason, reason
            assert http_get(port, "/readyz")[0] == 503, "ready while Redis is down"
            assert gauge(port, "mailpipe_failing_closed") == 1.0

            log = logs / "inbound-0.log"
            while time.monotonic() - outage_started < OUTAGE_S:  # past the delivery limit, before
                assert events.count(topology.dead) == 1, \
                    f"dead-lettered during the outage: {read_dead(settings.amqp_url, settings.namespace)}\n" \
                    f"{stages.logs()}"
                assert DROPPED not in log.read_text(), \
                    f"the inbound stage dropped its session (its reports redelivered)\n{stages.logs()}"
                assert stages.alive(), stages.logs()
                time.sleep(1.0)
            assert (queue_depths(ns) or {}).get(topology.reports) == (0, HELD)
            assert not [f for f in events.drain() if f.recipient != "first@example.net"], "recorded without Redis"

            private_redis.start()  # empty: what came before the outage is forgotten, not what was held
            wait_until(lambda: gauge(port, "mailpipe_waiting_for_redis_messages") == 0
                       and gauge(port, "mailpipe_failing_closed") == 0.0 and http_get(port, "/readyz")[0] == 200,
                       20, "every held report recorded once Redis is back")
            wait_until(lambda: (queue_depths(ns) or {}).get(topology.reports) == (0, 0), 20,
                       "the reports queue empty")
            # Their return paths are spent: a replay is refused; a fresh one is taken.
            code, text, _ = rcpt(settings, reports[-1][0])
            assert code == 550 and "brought its report already" in text, (code, text)
            assert rcpt(settings, return_path("acme", "later@example.net"))[0] == 250
        assert stages.exit_codes == {"inbound-0": 0}, stages.logs()
        text = log.read_text()
        assert text.count(WAITING) == 1 and text.count(BACK) == 1, text[-5000:]

        # Each report once: its events (a copy repeats its report's events, same ids), one
        # suppression per address, one hard bounce and one complaint each in the reputations.
        store = redis.Redis.from_url(private_redis.url)
        assert counted(store, ns, "acme", b"b") == BOUNCES
        assert counted(store, ns, "globex", b"c") == COMPLAINTS
        assert set(suppression.suppressed(store, ns, [("acme", bounced)])[0]) == set(bounced)
        assert set(suppression.suppressed(store, ns, [("globex", complainers)])[0]) == set(complainers)
        store.close()
    feedback = [f for f in events.drain() if f.recipient != "first@example.net"]
    events.close()
    ids = Counter(f.id for f in feedback)
    copied = set(bounced[:COPIES])
    for kind, whom in (("bounced", bounced), ("suppressed", bounced), ("complained", complainers),
                       ("suppressed", complainers)):
        seen = Counter(f.recipient for f in feedback if f.type == kind)
        assert set(seen) >= set(whom), f"no {kind} event for {set(whom) - set(seen)}"
        assert all(n == (2 if who in copied else 1) for who, n in seen.items() if who in whom), seen
    assert all(n <= 2 for n in ids.values())
    dead = read_dead(settings.amqp_url, settings.namespace)
    assert len(dead) == 1 and not any(d.first_death_reason == "delivery_limit" for d in dead), dead


def test_a_frozen_redis_stalls_neither_the_session_nor_the_reports(settings: Settings, tmp_path: Path) -> None:
    """SIGSTOP: every Redis call waits for its timeout. RabbitMQ closes a connection silent for
    about two heartbeats, here about 4 s: less than MAILPIPE_REDIS_TIMEOUT_S (5 s)."""
    Path(settings.servers_file).write_text(SERVERS, encoding="utf-8")
    topology = Topology.from_settings(settings)
    with PrivateRedis(tmp_path) as private_redis:
        port = free_port()
        settings = settings.replace(
            redis_url=private_redis.url, heartbeat_s=2, verp_keys=KEYS, return_path_domain=DOMAIN,
            inbound_smtp_host="127.0.0.1", inbound_smtp_port=free_port(), inbound_http_port=free_port())
        logs = tmp_path / "logs"
        logs.mkdir()
        stages = StageProcesses(settings, logs, "inbound", metrics_ports={"inbound": port})
        bounced = [f"frozen{i}@example.net" for i in range(20)]
        with stages:
            deadline = time.monotonic() + 30
            while http_get(port, "/readyz")[0] != 200:
                assert time.monotonic() < deadline and stages.alive(), stages.logs()
                time.sleep(0.2)
            assert private_redis.proc is not None
            private_redis.proc.send_signal(signal.SIGSTOP)
            frozen_at = time.monotonic()
            try:
                broker = Broker(settings.amqp_url, client_name="test").connect()
                broker.publish([queued(topology.reports, *dsn(who)) for who in bounced])
                broker.close()
                while time.monotonic() - frozen_at < FROZEN_S:
                    assert DROPPED not in stages.logs(), \
                        f"the inbound stage lost its session while Redis was frozen\n{stages.logs()}"
                    assert stages.alive(), stages.logs()
                    time.sleep(0.5)
                assert gauge(port, "mailpipe_waiting_for_redis_messages") == len(bounced), stages.logs()
            finally:
                private_redis.proc.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 20
            while gauge(port, "mailpipe_waiting_for_redis_messages") != 0:
                assert time.monotonic() < deadline and stages.alive(), stages.logs()
                time.sleep(0.2)
        text = (logs / "inbound-0.log").read_text()
        assert DROPPED not in text and text.count(WAITING) == 1 and text.count(BACK) == 1, text[-5000:]
        store = redis.Redis.from_url(private_redis.url)
        assert set(suppression.suppressed(store, settings.namespace, [("acme", bounced)])[0]) == set(bounced)
        store.close()
    assert read_dead(settings.amqp_url, settings.namespace) == []
