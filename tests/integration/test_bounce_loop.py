"""After the 250, end to end (issue 23): a bulk mail sent through the whole pipeline (every stage a
process, real RabbitMQ and Redis) to a platform server (an aiosmtpd peer) leaves with a signed
VERP envelope sender and a one-click unsubscribe in its headers; then a DSN for it
is delivered by SMTP to the inbound stage, as the remote server would: the recipient is
suppressed for that tenant only, the tenant's events arrive, the next publish to it is refused.
A synchronous 550 5.1.1 on the same path is a hard bounce too."""

from __future__ import annotations

import re
import smtplib
import socket
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from mailpipe import suppression
from mailpipe.settings import Settings
from mailpipe.sink import free_port
from mailpipe.verp import Keys, Signer, Token
from producer import Producer
from tests.integration.test_inbound import CORPUS, CORPUS_RP, Listener
from tests.smtp_peer import SmtpPeer
from tests.stages import StageProcesses

pytestmark = pytest.mark.integration

KEYS = "2:end to end key of the bounce loop"
DOMAIN = "bounces.mailpipe.test"


def wait(condition: Callable[[], bool], what: str, stages: StageProcesses, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{stages.logs()}")
        if len(stages.alive()) < len(stages.procs):
            pytest.fail(f"a stage died waiting for {what}\n{stages.logs()}")
        time.sleep(0.1)


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def test_a_mail_sent_then_its_dsn_suppresses_tells_and_stops_the_next(settings: Settings, tmp_path: Path,
                                                                       redis_url: str) -> None:
    settings = settings.replace(verp_keys=KEYS, return_path_domain=DOMAIN, inbound_smtp_host="127.0.0.1",
                                inbound_smtp_port=free_port(), inbound_http_port=free_port(),
                                unsubscribe_url="https://mail.mailpipe.test/unsubscribe")
    signer = Signer(Keys.parse(KEYS, "test"))
    events = Listener(settings)
    client = redis.Redis.from_url(redis_url)
    with SmtpPeer() as peer:
        peer.refuse("gone@example.net", 550, "5.1.1 <gone@example.net>: Recipient address rejected: User unknown")
        Path(settings.servers_file).write_text(
            f'[servers.platform]\naddress = "[127.0.0.1]:{peer.port}"\ntls = "none"\nunlimited = true\n'
            'platform = true\n\n[tenants.acme]\ndomains = ["acme.example"]\n\n'
            '[tenants.globex]\ndomains = ["globex.example"]\n', encoding="utf-8")
        with StageProcesses(settings, tmp_path, "producer", "packer", "limiter", "sender", "inbound") as stages:
            wait(lambda: accepts(settings.inbound_smtp_port), "the inbound stage", stages)
            with Producer(settings.amqp_url, settings.namespace) as producer:
                job = producer.publish(tenant="acme", sender="news@acme.example", to=["ann@example.net"],
                                       subject="Our news", text="News.", bulk=True)
                producer.publish(tenant="acme", sender="news@acme.example", to=["gone@example.net"],
                                 subject="Our news", text="News.", bulk=True)
            wait(lambda: len(peer.messages) >= 1, "the mail at the platform's server", stages)
            (mail,) = [m for m in peer.messages if m.recipients == ("ann@example.net",)]

            # The envelope: a signed return path that names this tenant, job and recipient.
            local, _, domain = mail.sender.partition("@")
            assert domain == DOMAIN and len(local) <= 64 and local == local.lower() and "ann" not in local
            token = signer.verify(local, ["acme", "globex"])
            assert isinstance(token, Token) and (token.tenant, token.job_id, token.shared) == ("acme", job, True)
            assert signer.names_recipient(token, "ann@example.net")
            headers = mail.content.split(b"\r\n\r\n", 1)[0]
            assert re.search(rb"(?m)^List-Unsubscribe: <https://mail\.mailpipe\.test/unsubscribe/", headers)
            assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in headers

            # The remote server's DSN, by SMTP to the return path.
            named = tomllib.loads((CORPUS / "expected.toml").read_text())["dsn-exchange-00.eml"]["recipient"]
            dsn = (CORPUS / "dsn-exchange-00.eml").read_bytes().decode()
            dsn = dsn.replace(named, "ann@example.net").replace(CORPUS_RP, local).encode()
            with smtplib.SMTP("127.0.0.1", settings.inbound_smtp_port, timeout=30) as smtp:
                smtp.sendmail("", [mail.sender], dsn)

            def feedback(kind: str, recipient: str) -> bool:
                return any(f.type == kind and f.recipient == recipient for f in events.drain())
            wait(lambda: feedback("bounced", "ann@example.net") and feedback("suppressed", "ann@example.net"),
                 "the bounced and suppressed events", stages)
            bounced = next(f for f in events.feedback if f.type == "bounced" and f.recipient == "ann@example.net")
            assert (bounced.tenant, bounced.job_id, bounced.source, bounced.bounce_class) == (
                "acme", job, "dsn", "hard")
            assert bounced.status == "5.1.1" and bounced.reporting_mta
            # The synchronous 550 5.1.1 of the other mail: the same classifier, the same records.
            wait(lambda: feedback("bounced", "gone@example.net"), "the synchronous bounce", stages)
            sync = next(f for f in events.feedback if f.type == "bounced" and f.recipient == "gone@example.net")
            assert (sync.source, sync.bounce_class, sync.code) == ("sync", "hard", 550)

            ns = settings.namespace
            assert suppression.suppressed(client, ns, [("acme", ["ann@example.net", "gone@example.net"]),
                                                       ("globex", ["ann@example.net"])])[1] == {}
            assert set(suppression.suppressed(client, ns, [("acme", ["ann@example.net", "gone@example.net"])])[0]) == {
                "ann@example.net", "gone@example.net"}
            with Producer(settings.amqp_url, settings.namespace) as producer:
                again = producer.publish(tenant="acme", sender="news@acme.example", to=["ann@example.net"],
                                         subject="More news", text="More.", bulk=True)
            def refused() -> bool:
                events.drain()
                return any(e.job_id == again and e.category == "suppressed" for e in events.events)
            wait(refused, "the refusal of the next mail", stages)
    events.close()
    client.close()
