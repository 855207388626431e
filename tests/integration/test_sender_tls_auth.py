"""No AUTH in clear (issue 13): credentials travel only over TLS.

A server configured with credentials on a port of opportunistic STARTTLS (2525 here, like 25)
must offer STARTTLS; when it does not, the sender neither logs in nor sends, and the failure is
``tls_failed`` with advice. ``tls = "none"`` with credentials never even connects. The peers
here record every SMTP command they receive, with whether TLS was up at that moment, so the
tests see the wire, not only the outcome.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mailpipe.errors import SmtpTransient
from mailpipe.model import Job, new_id, now_ms
from mailpipe.servers import ServerConfig, parse_config
from sender.check import check_servers
from sender.delivery import BatchDelivery, deliver
from sender.pool import Pools
from sender.replies import ADVICE, ReplyCategory
from sender.smtp import open_connection
from sender.translate import reply_of
from tests.smtp_peer import SmtpPeer, TestCerts, make_test_ca

pytestmark = pytest.mark.integration

CREDS = {"CREDS": "mailer s3cret"}


class RecordingPeer(SmtpPeer):
    """An SmtpPeer that logs each command it receives as (verb, TLS up?)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: list[tuple[str, bool]] = []

    def _protocol(self) -> Any:
        smtp = super()._protocol()

        def recording(verb: str, method: Callable[[str], Awaitable[None]]) -> Callable[[str], Awaitable[None]]:
            async def run(arg: str) -> None:
                with self._lock:
                    self.commands.append((verb, smtp._tls_protocol is not None))
                await method(arg)
            return run

        smtp._smtp_methods = {verb: recording(verb, method) for verb, method in smtp._smtp_methods.items()}
        return smtp

    def verbs(self) -> list[str]:
        with self._lock:
            return [verb for verb, _ in self.commands]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TestCerts:
    return make_test_ca(tmp_path_factory.mktemp("ca"))


def server(port: int, environ: dict[str, str] | None = None, **fields: Any) -> ServerConfig:
    table = {"address": f"[127.0.0.1]:{port}", **fields}
    return parse_config({"servers": {"smtp": table}}, "test", environ or {}).servers["smtp"]


def job(*recipients: str) -> Job:
    return Job(id=new_id(), tenant="acme", server="smtp", sender="hr@acme.example", recipients=recipients,
               message=b"Subject: t\r\n\r\nhello\r\n", created_ms=now_ms())


def run_delivery(jobs: list[Job], srv: ServerConfig) -> BatchDelivery:
    async def go() -> BatchDelivery:
        pools = Pools(default_size=1, timeout_s=5.0, idle_timeout_s=60)
        try:
            return await deliver(jobs, srv, pools.get(srv), time.monotonic() + 20, hold=None, margin_s=0.2)
        finally:
            await pools.close()
    return asyncio.run(go())


def test_the_clear_peer_does_offer_auth_in_clear() -> None:
    """The premise: without STARTTLS the peer advertises AUTH and would take the password."""
    async def ehlo(port: int) -> bool:
        import aiosmtplib
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5, start_tls=False)
        await client.connect()
        try:
            await client.ehlo()
            return client.supports_extension("auth") and not client.supports_extension("starttls")
        finally:
            client.close()

    with SmtpPeer(auth={"mailer": "s3cret"}) as peer:
        assert asyncio.run(ehlo(peer.port))


def test_credentials_without_starttls_offered_are_never_sent() -> None:
    """Port 2525 (opportunistic, as 25): the server offers AUTH but no STARTTLS. The sender says
    EHLO, sees no STARTTLS, and stops: no AUTH, no MAIL, no mail; tls_failed with advice."""
    with RecordingPeer(auth={"mailer": "s3cret"}) as peer:
        srv = server(peer.port, CREDS, credentials_env="CREDS")
        assert srv.tls == "opportunistic" and srv.credentials is not None
        with pytest.raises(SmtpTransient) as info:
            asyncio.run(open_connection(srv, timeout_s=5))
        result = run_delivery([job("a@example.com")], srv)
        verbs = peer.verbs()
        messages = peer.messages
    reply = reply_of(info.value)
    assert reply.category == ReplyCategory.TLS_FAILED and reply.transient
    assert "STARTTLS" in reply.text and "only over TLS" in reply.text
    assert "s3cret" not in reply.text and "s3cret" not in info.value.reason
    assert reply.advice == ADVICE[ReplyCategory.TLS_FAILED] and "only over TLS" in reply.advice
    assert "AUTH" not in verbs and "MAIL" not in verbs and set(verbs) <= {"EHLO", "QUIT"}
    assert messages == []
    # The server is broken for us: the mail goes back to wait, and the delivery says why.
    [outcome] = result.outcomes
    assert outcome.sent == [] and outcome.deferred == {} and outcome.back == ["a@example.com"]
    assert result.stopped_by == "broken" and [s.kind for s in result.signals] == ["server_broken"]


def test_tls_none_with_credentials_never_connects() -> None:
    """``tls = "none"`` with credentials: refused before a socket is opened."""
    with RecordingPeer(auth={"mailer": "s3cret"}) as peer:
        srv = server(peer.port, CREDS, tls="none", credentials_env="CREDS")
        with pytest.raises(SmtpTransient) as info:
            asyncio.run(open_connection(srv, timeout_s=5))
        result = run_delivery([job("a@example.com")], srv)
        connections, verbs, messages = peer.connections, peer.verbs(), peer.messages
    reply = reply_of(info.value)
    assert reply.category == ReplyCategory.TLS_FAILED and 'tls = "none"' in reply.text and reply.advice
    assert (connections, verbs, messages) == (0, [], [])
    assert [o.back for o in result.outcomes] == [["a@example.com"]] and result.stopped_by == "broken"


def test_tls_none_without_credentials_still_sends_in_clear() -> None:
    """Only credentials need TLS: a server without them may still be used in clear."""
    with RecordingPeer() as peer:
        run_delivery([job("a@example.com")], server(peer.port, tls="none"))
        [m] = peer.messages
    assert not m.tls and m.auth_user is None


@pytest.mark.parametrize("tls", ["opportunistic", "starttls"])
def test_auth_happens_after_starttls(certs: TestCerts, tls: str) -> None:
    """With STARTTLS offered (and the certificate verified against the test CA), AUTH comes
    after TLS and the mail goes through."""
    with RecordingPeer(auth={"mailer": "s3cret"}, starttls_context=certs.server_context()) as peer:
        srv = server(peer.port, CREDS, tls=tls, ca_file=str(certs.ca_file), credentials_env="CREDS")
        result = run_delivery([job("a@example.com")], srv)
        [m] = peer.messages
        commands = list(peer.commands)
    assert result.outcomes[0].sent == ["a@example.com"]
    assert m.tls and m.auth_user == "mailer"
    verbs = [verb for verb, _ in commands]
    assert verbs.index("STARTTLS") < verbs.index("AUTH") < verbs.index("MAIL")
    assert all(up for verb, up in commands if verb in ("AUTH", "MAIL", "RCPT", "DATA"))


def test_certificates_stay_verified_by_default(certs: TestCerts) -> None:
    """STARTTLS to a certificate of an unknown CA (no ca_file): tls_failed, nothing sent."""
    with RecordingPeer(auth={"mailer": "s3cret"}, starttls_context=certs.server_context()) as peer:
        srv = server(peer.port, CREDS, credentials_env="CREDS")
        with pytest.raises(SmtpTransient) as info:
            asyncio.run(open_connection(srv, timeout_s=5))
        verbs = peer.verbs()
    assert info.value.category == ReplyCategory.TLS_FAILED
    assert "AUTH" not in verbs and "MAIL" not in verbs


def test_servers_check_explains_the_refusal() -> None:
    with RecordingPeer(auth={"mailer": "s3cret"}) as peer:
        cfg = parse_config({"servers": {"smtp": {"address": f"[127.0.0.1]:{peer.port}",
                                                 "credentials_env": "CREDS"}}}, "test", CREDS)
        out = io.StringIO()
        assert check_servers(cfg, ["smtp"], out=out) == 1
        verbs = peer.verbs()
    text = out.getvalue()
    assert "[tls_failed]" in text and "STARTTLS" in text and "what to do:" in text
    assert "s3cret" not in text and "AUTH" not in verbs
