"""The inbound stage over real sockets (issue 23): `mailpipe run inbound` as a process, real
RabbitMQ and Redis, reports delivered to it by SMTP as a remote server would, and the one-click
endpoint over HTTP. A bounce, a complaint or an unsubscribe suppresses the recipient for its
tenant only, the tenant's event arrives, and the next publish to the address is refused;
forged, expired and replayed return paths and a 20 MB report are refused at the door."""

from __future__ import annotations

import smtplib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pytest
import redis

from inbound.receiver import spent_key
from mailpipe import archive, suppression
from mailpipe.codec import decode_events
from mailpipe.feedback import Feedback, decode_feedback
from mailpipe.model import Event
from mailpipe.settings import Settings
from mailpipe.sink import free_port
from mailpipe.topology import Topology
from mailpipe.verp import Keys, Signer, today
from producer import Producer
from tests.stages import StageProcesses

pytestmark = pytest.mark.integration

KEYS = "5:inbound test key, long enough".replace(",", "")
DOMAIN = "bounces.mailpipe.test"
CORPUS = Path(__file__).resolve().parents[1] / "data" / "reports"
CORPUS_RP = "bbeae7tmcfmz23rms6fpigp2vr6z6w62kkmhcdnjg76wfzgb3v5uwfpbme4"
JOB = "c592f15e833f558fb3eb7b4a530e21b5"
SIGNER = Signer(Keys.parse(KEYS, "test"))


class Listener:
    """A queue bound to every event of the namespace, declared before anything happens."""

    def __init__(self, settings: Settings) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        self.channel = self.conn.channel()
        topology = Topology.from_settings(settings)
        topology.declare(self.channel)
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, topology.events, routing_key="#")
        self.feedback: list[Feedback] = []
        self.events: list[Event] = []

    def drain(self) -> list[Feedback]:
        while True:
            method, _props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.feedback
            if method.routing_key.split(".")[0] in ("sent", "deferred", "failed", "expired"):
                self.events.extend(decode_events(body))
            else:
                self.feedback.append(decode_feedback(body))

    def count(self, queue: str) -> int:
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    def close(self) -> None:
        self.conn.close()


@dataclass
class Inbound:
    settings: Settings
    stages: StageProcesses
    events: Listener
    redis: redis.Redis

    def wait(self, condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}\n{self.stages.logs()}")
            if len(self.stages.alive()) < len(self.stages.procs):
                pytest.fail(f"a stage died waiting for {what}\n{self.stages.logs()}")
            time.sleep(0.05)

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.settings.inbound_smtp_port, timeout=30)

    def deliver(self, rcpt: str, data: bytes, mail_from: str = "") -> None:
        with self.smtp() as client:
            client.sendmail(mail_from, [rcpt], data)

    def feedback(self, kind: str, recipient: str) -> Feedback:
        def seen() -> Feedback | None:
            return next((f for f in self.events.drain() if f.type == kind and f.recipient == recipient), None)
        self.wait(lambda: seen() is not None, f"a {kind} event for {recipient}")
        found = seen()
        assert found is not None
        return found


@pytest.fixture
def inbound(settings: Settings, tmp_path: Path, redis_url: str) -> Iterator[Inbound]:
    settings = settings.replace(verp_keys=KEYS, return_path_domain=DOMAIN, inbound_smtp_host="127.0.0.1",
                                inbound_smtp_port=free_port(), inbound_http_port=free_port(),
                                inbound_max_bytes=10 * 1024 * 1024,
                                inbound_feedback_addresses=f"fbl@{DOMAIN}",
                                unsubscribe_url="https://mail.mailpipe.test/unsubscribe")
    Path(settings.servers_file).write_text(
        '[servers.platform]\naddress = "[127.0.0.1]:2"\ntls = "none"\nplatform = true\n\n'
        '[tenants.acme]\ndomains = ["acme.example"]\n\n[tenants.globex]\ndomains = ["globex.example"]\n',
        encoding="utf-8")
    events = Listener(settings)
    client = redis.Redis.from_url(redis_url)
    with StageProcesses(settings, tmp_path, "inbound", "producer", metrics_ports={"inbound": free_port()}) as stages:
        here = Inbound(settings, stages, events, client)
        here.wait(lambda: _accepts(settings.inbound_smtp_port) and _accepts(settings.inbound_http_port),
                  "the inbound stage's ports")
        yield here
        codes = stages.stop()
    assert set(codes.values()) == {0}, f"every stage drains and exits 0 on SIGTERM: {codes}\n{stages.logs()}"
    events.close()
    client.close()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def return_path(tenant: str, recipient: str, *, day: int | None = None, kind: str = "b", shared: bool = True) -> str:
    return f"{SIGNER.local_part(kind, tenant, JOB, recipient, shared=shared, day=day)}@{DOMAIN}"


def report(name: str, recipient: str, local_part: str, corpus_recipient: str) -> bytes:
    text = (CORPUS / name).read_bytes().decode()
    return text.replace(corpus_recipient, recipient).replace(CORPUS_RP, local_part).encode()


def publish_is_refused(inbound: Inbound, tenant: str, recipient: str) -> None:
    with Producer(inbound.settings.amqp_url, inbound.settings.namespace) as producer:
        job = producer.publish(tenant=tenant, sender=f"hr@{tenant}.example", to=[recipient], subject="Again",
                               text="Hello again.")
    def refused() -> bool:
        inbound.events.drain()
        return any(e.job_id == job and e.category == "suppressed" for e in inbound.events.events)
    inbound.wait(refused, "the intake's refusal of the next mail")


def test_a_dsn_by_smtp_suppresses_for_that_tenant_only_tells_it_and_stops_the_next_mail(inbound: Inbound) -> None:
    ann = "ann@example.net"
    rp = return_path("acme", ann)
    inbound.deliver(rp, report("dsn-postfix-00.eml", ann, rp.partition("@")[0], "user0@example.net"))
    bounced = inbound.feedback("bounced", ann)
    assert (bounced.tenant, bounced.bounce_class, bounced.source, bounced.code, bounced.status) == (
        "acme", "hard", "dsn", 550, "5.1.1")
    assert bounced.job_id == JOB and bounced.reporting_mta == "mx.example.net" and "User unknown" in bounced.text
    suppressed = inbound.feedback("suppressed", ann)
    assert suppressed.tenant == "acme" and suppressed.until_ms > bounced.at_ms + 179 * 86400_000
    ns = inbound.settings.namespace
    assert suppression.suppressed(inbound.redis, ns, [("acme", [ann]), ("globex", [ann])]) == [
        {ann: suppression.suppressed(inbound.redis, ns, [("acme", [ann])])[0][ann]}, {}]
    publish_is_refused(inbound, "acme", ann)

    # The same report again, by the same return path: a replay, refused at RCPT.
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        inbound.deliver(rp, report("dsn-postfix-00.eml", ann, rp.partition("@")[0], "user0@example.net"))
    assert "brought its report already" in str(refused.value)
    assert inbound.redis.exists(spent_key(ns, SIGNER.verify(rp.partition("@")[0], ["acme"]).id))  # type: ignore[union-attr]

    # Seen: the stage's /metrics and health.
    port = inbound.stages.metrics_ports["inbound"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    assert 'mailpipe_bounces_total{class="hard",source="dsn"} 1.0' in text
    assert 'mailpipe_inbound_reports_total{kind="dsn",result="applied"} 1.0' in text
    assert 'mailpipe_inbound_rcpt_total{outcome="refused"} 1.0' in text
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as page:
        assert page.status == 200

    # The raw report, kept for the tenant (mailpipe reports list|show).
    (kept,) = archive.read(inbound.settings, tenant="acme", since_s=600)
    assert (kept.id, kept.kind) == (bounced.report_id, "dsn") and b"User unknown" in kept.data
    assert archive.read(inbound.settings, tenant="globex", since_s=600) == []


def test_forged_expired_and_unknown_return_paths_are_refused_at_rcpt(inbound: Inbound) -> None:
    good = return_path("acme", "bob@example.net").partition("@")[0]
    forged = good[:-1] + ("a" if good[-1] != "a" else "b")
    expired = return_path("acme", "bob@example.net", day=today() - 31).partition("@")[0]
    other_key = Signer(Keys.parse("5:another key of the same id!!", "t")).local_part("b", "acme", JOB, "bob@x.example")
    for local, reason in ((forged, "bad signature"), (expired, "expired"), (other_key, "bad signature"),
                          ("someone", "not a mailpipe token")):
        with inbound.smtp() as client:
            client.ehlo()
            client.mail("")
            code, text = client.rcpt(f"{local}@{DOMAIN}")
        assert code == 550 and reason in text.decode(), (local, text)
    with inbound.smtp() as client:
        client.ehlo()
        client.mail("")
        code, text = client.rcpt(f"{good}@elsewhere.example")
    assert code == 550 and b"relay" in text


def test_a_20_mb_report_is_refused(inbound: Inbound) -> None:
    rp = return_path("acme", "cy@example.net")
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 21_000
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:  # SIZE= announced: refused at MAIL
        inbound.deliver(rp, big)
    assert refused.value.smtp_code == 552
    with inbound.smtp() as client:  # no SIZE=: refused after the data
        client.ehlo()
        assert client.docmd("MAIL FROM:<>")[0] == 250
        assert client.rcpt(rp)[0] == 250
        code, _ = client.data(big)
    assert code == 552


def test_an_arf_complaint_to_the_feedback_address_suppresses_until_lifted(inbound: Inbound) -> None:
    dee = "dee@comcast.example"
    rp = return_path("globex", dee)
    inbound.deliver(f"fbl@{DOMAIN}", report("arf-cloudmark-0.eml", dee, rp.partition("@")[0], "fbl0@comcast.net"),
                    mail_from="feedbackloop@comcastfbl.senderscore.net")
    complained = inbound.feedback("complained", dee)
    assert (complained.tenant, complained.source, complained.feedback_type) == ("globex", "arf", "abuse")
    assert inbound.feedback("suppressed", dee).until_ms == 0, "until the tenant lifts it"
    assert suppression.suppressed(inbound.redis, inbound.settings.namespace, [("acme", [dee])]) == [{}]
    publish_is_refused(inbound, "globex", dee)


def test_a_one_click_post_unsubscribes_at_once_and_a_get_shows_a_page(inbound: Inbound) -> None:
    eve = "eve@example.org"
    url = f"http://127.0.0.1:{inbound.settings.inbound_http_port}/unsubscribe/{SIGNER.link_token('acme', JOB, eve)}"
    with urllib.request.urlopen(url, timeout=10) as page:
        assert page.status == 200 and b"Unsubscribe" in page.read()
    request = urllib.request.Request(url, data=b"List-Unsubscribe=One-Click", method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 202
    assert suppression.suppressed(inbound.redis, inbound.settings.namespace, [("acme", [eve])])[0], "at once"
    unsubscribed = inbound.feedback("unsubscribed", eve)
    assert (unsubscribed.tenant, unsubscribed.source, unsubscribed.job_id) == ("acme", "http", JOB)
    publish_is_refused(inbound, "acme", eve)
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(urllib.request.Request(url[:-3] + "AAA", data=b"x", method="POST"), timeout=10)
    assert bad.value.code == 404
    bad.value.close()


def test_a_mailto_unsubscribe_and_what_cannot_be_read_goes_to_review(inbound: Inbound) -> None:
    fay = "fay@example.org"
    mailto = return_path("acme", fay, kind="u")
    inbound.deliver(mailto, f"From: Fay <{fay}>\r\nTo: {mailto}\r\nSubject: unsubscribe\r\n\r\n.\r\n".encode(),
                    mail_from=fay)
    assert inbound.feedback("unsubscribed", fay).source == "mailto"
    inbound.deliver(f"postmaster@{DOMAIN}", b"From: someone@example.com\r\nSubject: hello\r\n\r\nWho reads this?\r\n",
                    mail_from="someone@example.com")
    review = Topology.from_settings(inbound.settings).reports_review
    inbound.wait(lambda: inbound.events.count(review) == 1, "the unreadable mail in the review queue")
