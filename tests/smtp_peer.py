"""An in-process SMTP server for tests: aiosmtpd on its own event loop in a thread.

    with SmtpPeer(auth={"user": "secret"}, starttls_context=certs.server_context()) as peer:
        peer.refuse("bob@example.com", 451, "4.7.1 Try again later", times=1)
        ...  # connect to peer.host:peer.port
        assert [m.recipients for m in peer.messages] == [...]

Behaviours a test can switch on, each before or while clients talk to it:

- ``refuse(match, code, text, times=None)``: answer RCPT for matching recipients with that reply
  (``times=N``: only the first N times, then accept). ``match`` is an address (case-insensitive),
  a predicate on the address, or None for every recipient.
- ``refuse_data(match, code, text, times=None)``: the same for DATA, matched against any recipient
  accepted in the transaction.
- ``drop_connections(n, at="data")``: the next n sessions are cut without a reply when they reach
  ``at`` ("connect", "mail", "rcpt" or "data").
- ``stall_after_data(seconds, times=None)``: hold the reply to DATA that long (the message is
  recorded once the stall is over, as a real server that is slow to answer may still deliver).
- ``reply_delay_s``: every reply, the greeting included, is delayed that long.
- ``limit(mails, per_s=60, connections=None)``: a server that enforces a real limit (a hosted
  relay's plan, Microsoft 365's 30 a minute): at most ``mails`` accepted in any ``per_s``
  seconds, ``451 4.7.1`` to RCPT above it; at most ``connections`` sessions open at once,
  ``421 4.7.0`` at the greeting above it. ``limit(None)`` lifts it. ``throttled`` lists each
  refusal as (time, "rate" | "connections").

PIPELINING (RFC 2920) is offered unless ``pipelining=False``.

The peer binds port 0 by default (a free port, read from ``.port``). Implicit TLS with
``tls_context``; STARTTLS with ``starttls_context`` (``require_starttls=True`` refuses mail
before it). ``auth={"user": "password"}`` requires AUTH PLAIN/LOGIN before MAIL.

``make_test_ca(directory)`` writes a test CA and a server certificate for 127.0.0.1/localhost
with the ``openssl`` command line tool (no extra Python package needed).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mailpipe.sink import ehlo_offering_pipelining

Match = str | Callable[[str], bool] | None

# A reply must be a three-digit code and text without line breaks.
_REPLY = re.compile(r"^[2-5]\d\d$")


@dataclass(frozen=True)
class Received:
    """One message the peer accepted."""

    sender: str
    recipients: tuple[str, ...]
    content: bytes = field(repr=False)
    time: float
    tls: bool = False
    auth_user: str | None = None


@dataclass
class _Rule:
    match: Match
    code: int
    text: str
    times: int | None

    def applies(self, address: str) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.match is None:
            return True
        if isinstance(self.match, str):
            return self.match.lower() == address.lower()
        return bool(self.match(address))


class _PeerSMTP(SMTP):
    """aiosmtpd's SMTP with the peer's hooks: a delay before each reply, dropped connections."""

    peer: SmtpPeer

    async def push(self, status: Any) -> None:
        if self.peer.reply_delay_s > 0:
            await asyncio.sleep(self.peer.reply_delay_s)
        await super().push(status)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._counted = True
        if not self.peer._session_opened():
            # One too many: refused at the greeting, as a busy server does.
            self.peer._count_connection(transport)
            transport.write(b"421 4.7.0 peer.test Too many connections, try again later\r\n")  # type: ignore[attr-defined]
            transport.close()
            self._refused = True
            return
        self._refused = False
        super().connection_made(transport)
        self.peer._count_connection(transport)
        if self.peer._take_drop("connect"):
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            self.peer._session_closed()
        if not getattr(self, "_refused", False):
            super().connection_lost(exc)


def _cut(server: SMTP) -> None:
    """Close the session's socket without a reply, as a crashing server would."""
    if server.transport is not None:
        server.transport.close()


class _Handler:
    def __init__(self, peer: SmtpPeer) -> None:
        self.peer = peer

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        if not self.peer.pipelining:
            session.host_name = hostname  # the hook replaces aiosmtpd's own bookkeeping
            return responses
        return ehlo_offering_pipelining(session, hostname, responses)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if self.peer._take_drop("mail"):
            _cut(server)
            return "421 4.3.0 dropped"  # never reaches the client: the transport is closed
        # A client that pipelines has written RCPT before MAIL's reply: it is already read in.
        reader = getattr(server, "_reader", None)
        self.peer._count_mail(pipelined=bool(reader is not None and reader._buffer))
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if self.peer._take_drop("rcpt"):
            _cut(server)
            return "421 4.3.0 dropped"
        refusal = self.peer._take_rule(self.peer._rcpt_rules, [address])
        if refusal is not None:
            return refusal
        if self.peer._over_rate():
            return "451 4.7.1 Rate limited: too many messages, try again later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        refusal = self.peer._take_rule(self.peer._data_rules, list(envelope.rcpt_tos))
        if refusal is not None:
            return refusal
        if self.peer._take_drop("data"):
            _cut(server)
            return "421 4.3.0 dropped"
        stall = self.peer._take_stall()
        if stall > 0:
            await asyncio.sleep(stall)
        ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
        auth_user = None
        if session.authenticated and isinstance(session.auth_data, LoginPassword):
            auth_user = session.auth_data.login.decode("utf-8", "replace")
        content = envelope.original_content or b""
        self.peer._record(Received(
            sender=envelope.mail_from or "", recipients=tuple(envelope.rcpt_tos), content=content,
            time=time.time(), tls=ssl_object is not None, auth_user=auth_user))
        return "250 2.0.0 OK queued"


class SmtpPeer:
    def __init__(self, port: int = 0, *, host: str = "127.0.0.1", tls_context: ssl.SSLContext | None = None,
                 starttls_context: ssl.SSLContext | None = None, require_starttls: bool = False,
                 auth: dict[str, str] | None = None, reply_delay_s: float = 0.0,
                 data_size_limit: int | None = 64 * 1024 * 1024, pipelining: bool = True) -> None:
        if tls_context is not None and starttls_context is not None:
            raise ValueError("give tls_context (implicit TLS) or starttls_context, not both")
        if require_starttls and starttls_context is None:
            raise ValueError("require_starttls needs a starttls_context")
        self.host = host
        self.port = port
        self.tls_context = tls_context
        self.starttls_context = starttls_context
        self.require_starttls = require_starttls
        self.auth = dict(auth) if auth is not None else None
        self.reply_delay_s = reply_delay_s
        self.data_size_limit = data_size_limit
        self.pipelining = pipelining
        self._lock = threading.Lock()
        self._messages: list[Received] = []
        self._rcpt_rules: list[_Rule] = []
        self._data_rules: list[_Rule] = []
        self._drops: dict[str, int] = {}
        self._stall_s = 0.0
        self._stall_times: int | None = None
        self._limit: tuple[int | None, float, int | None] = (None, 60.0, None)
        self._open = 0
        self._throttled: list[tuple[float, str]] = []
        self._connections = 0
        self._mails = 0
        self._pipelined = 0
        self._transports: list[asyncio.BaseTransport] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> SmtpPeer:
        if self._thread is not None:
            raise RuntimeError("SmtpPeer already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(loop.create_server(
                    self._protocol, self.host, self.port, ssl=self.tls_context))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # reported to start() in the calling thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"smtp-peer-{self.port}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None or self._loop is None:
            return
        loop = self._loop

        def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            with self._lock:
                transports, self._transports = self._transports, []
            for transport in transports:  # sessions still open: close them, no ResourceWarning
                transport.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.call_soon(loop.stop)

        loop.call_soon_threadsafe(shutdown)
        thread.join(10)

    def __enter__(self) -> SmtpPeer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _protocol(self) -> SMTP:
        authenticator = self._authenticate if self.auth is not None else None
        with warnings.catch_warnings():
            # "Requiring AUTH while not requiring TLS": on purpose, see below.
            warnings.simplefilter("ignore", UserWarning)
            smtp = self._make_smtp(authenticator)
        smtp.peer = self
        return smtp

    def _make_smtp(self, authenticator: Any) -> _PeerSMTP:
        return _PeerSMTP(
            _Handler(self), hostname="peer.test", data_size_limit=self.data_size_limit,
            tls_context=self.starttls_context, require_starttls=self.require_starttls,
            authenticator=authenticator, auth_required=self.auth is not None,
            # With implicit TLS aiosmtpd does not know the socket is encrypted; without any
            # TLS the tests still want to exercise AUTH: allow it in both cases.
            auth_require_tls=self.starttls_context is not None,
            loop=self._loop)

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword) or self.auth is None:
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        ok = self.auth.get(user) == password
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    # -- what was received ----------------------------------------------------------------------

    @property
    def messages(self) -> list[Received]:
        with self._lock:
            return list(self._messages)

    @property
    def pipelined_mails(self) -> int:
        """MAIL commands that arrived with the next command already sent behind them."""
        with self._lock:
            return self._pipelined

    @property
    def mails(self) -> int:
        """MAIL commands received."""
        with self._lock:
            return self._mails

    @property
    def connections(self) -> int:
        """How many connections the peer has accepted so far."""
        with self._lock:
            return self._connections

    def recipients(self) -> list[str]:
        """Every recipient of every received message, in order."""
        return [r for m in self.messages for r in m.recipients]

    def wait_for(self, count: int, timeout_s: float = 10.0) -> list[Received]:
        """Wait until at least ``count`` messages arrived; return them (possibly fewer on timeout)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            messages = self.messages
            if len(messages) >= count:
                return messages
            time.sleep(0.01)
        return self.messages

    def clear(self) -> None:
        with self._lock:
            self._messages.clear()

    def _record(self, received: Received) -> None:
        with self._lock:
            self._messages.append(received)

    def _count_mail(self, pipelined: bool) -> None:
        with self._lock:
            self._mails += 1
            self._pipelined += pipelined

    def _count_connection(self, transport: asyncio.BaseTransport) -> None:
        with self._lock:
            self._connections += 1
            self._transports = [t for t in self._transports if not t.is_closing()] + [transport]

    # -- behaviours -----------------------------------------------------------------------------

    def refuse(self, match: Match, code: int, text: str, times: int | None = None) -> None:
        """Answer RCPT TO for matching recipients with ``code text`` (the first ``times`` times)."""
        self._add_rule(self._rcpt_rules, match, code, text, times)

    def refuse_data(self, match: Match, code: int, text: str, times: int | None = None) -> None:
        """Answer DATA with ``code text`` when any accepted recipient matches."""
        self._add_rule(self._data_rules, match, code, text, times)

    def drop_connections(self, n: int, at: str = "data") -> None:
        """Cut the next ``n`` sessions without a reply when they reach ``at``."""
        if at not in ("connect", "mail", "rcpt", "data"):
            raise ValueError(f"at={at!r}: expected connect, mail, rcpt or data")
        with self._lock:
            self._drops[at] = self._drops.get(at, 0) + n

    def stall_after_data(self, seconds: float, times: int | None = None) -> None:
        """Hold each reply to DATA ``seconds`` (only the next ``times`` ones, if given)."""
        with self._lock:
            self._stall_s = seconds
            self._stall_times = times

    def limit(self, mails: int | None, per_s: float = 60.0, connections: int | None = None) -> None:
        """Enforce (or with None, lift) a limit: ``mails`` per ``per_s`` s, ``connections`` at once."""
        with self._lock:
            self._limit = (mails, per_s, connections)

    @property
    def throttled(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._throttled)

    def _over_rate(self) -> bool:
        with self._lock:
            mails, per_s, _ = self._limit
            if mails is None:
                return False
            since = time.time() - per_s
            over = sum(1 for m in self._messages if m.time > since) >= mails
            if over:
                self._throttled.append((time.time(), "rate"))
            return over

    def _session_opened(self) -> bool:
        """Count a session; False when it is one too many (refused at the greeting)."""
        with self._lock:
            self._open += 1
            cap = self._limit[2]
            if cap is not None and self._open > cap:
                self._throttled.append((time.time(), "connections"))
                return False
            return True

    def _session_closed(self) -> None:
        with self._lock:
            self._open -= 1

    def reset(self) -> None:
        """Forget every behaviour set (not the received messages)."""
        with self._lock:
            self._rcpt_rules.clear()
            self._data_rules.clear()
            self._drops.clear()
            self._stall_s, self._stall_times = 0.0, None
            self._limit = (None, 60.0, None)

    def _add_rule(self, rules: list[_Rule], match: Match, code: int, text: str, times: int | None) -> None:
        if not _REPLY.match(str(code)) or "\n" in text or "\r" in text:
            raise ValueError(f"not an SMTP reply: {code} {text!r}")
        with self._lock:
            rules.append(_Rule(match, code, text, times))

    def _take_rule(self, rules: list[_Rule], addresses: list[str]) -> str | None:
        with self._lock:
            for rule in rules:
                if any(rule.applies(a) for a in addresses):
                    if rule.times is not None:
                        rule.times -= 1
                    return f"{rule.code} {rule.text}"
        return None

    def _take_drop(self, at: str) -> bool:
        with self._lock:
            if self._drops.get(at, 0) > 0:
                self._drops[at] -= 1
                return True
        return False

    def _take_stall(self) -> float:
        with self._lock:
            if self._stall_s <= 0:
                return 0.0
            if self._stall_times is not None:
                if self._stall_times <= 0:
                    return 0.0
                self._stall_times -= 1
            return self._stall_s


# -- a test CA --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TestCerts:
    """Files of a test CA and of a server certificate it signed for 127.0.0.1 and localhost."""

    __test__ = False  # not a pytest test class

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return context


def make_test_ca(directory: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")) -> TestCerts:
    """Write ``ca.pem``, ``server.pem`` and ``server.key`` into ``directory`` (reused if present)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_file = directory / "ca.key", directory / "ca.pem"
    key_file, csr_file = directory / "server.key", directory / "server.csr"
    cert_file = directory / "server.pem"
    certs = TestCerts(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    if ca_file.exists() and cert_file.exists() and key_file.exists():
        return certs
    san = ",".join(f"IP:{n}" if _looks_like_ip(n) else f"DNS:{n}" for n in names)
    ext_file = directory / "server.ext"
    ext_file.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", ca_key, "-out", ca_file, "-days", "2",
             "-subj", "/CN=mailpipe test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl("req", *ec, "-keyout", key_file, "-out", csr_file, "-subj", f"/CN={names[0]}")
    _openssl("x509", "-req", "-in", csr_file, "-CA", ca_file, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert_file, "-days", "2", "-extfile", ext_file)
    return certs


def _looks_like_ip(name: str) -> bool:
    return bool(re.fullmatch(r"[0-9.]+", name)) or ":" in name


def _openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)
