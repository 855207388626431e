"""Opening an SMTP connection to a server: TCP, TLS, EHLO, AUTH.

aiosmtplib opens each connection (connect, EHLO, STARTTLS, AUTH); then ``sender/session.py``
takes its transport over and carries the mail transactions, pipelined when the server offers
PIPELINING. Errors of either are translated (``sender/translate.py``) into ``SmtpTransient`` /
``SmtpPermanent`` carrying the reply code, text and category; ``sender/transaction.py`` sends a
mail over an open connection, ``sender/pool.py`` pools them. A connection that saw a protocol error (timeout,
dropped connection, unexpected reply) is closed and never reused; every connection is a fresh
``aiosmtplib.SMTP`` (aiosmtplib is known to hang when one client object reconnects).

TLS by ``ServerConfig.tls``:
- ``implicit``: TLS from the first byte (port 465, the seeds' "SSL").
- ``starttls``: STARTTLS is required (port 587, the seeds' "TLS"); a server that does not offer
  it is refused with category ``tls_failed``, never used in clear.
- ``opportunistic``: STARTTLS if the server offers it (port 25, and any port but 465/587).
- ``none``: clear text.
Certificates are verified unless the server says ``tls_verify = false``; ``ca_file`` adds a CA.

No AUTH in clear: credentials go only over TLS. A server with credentials whose mode is
``opportunistic`` must offer STARTTLS (else ``tls_failed``, the credentials unsent); with
``tls = "none"`` it is refused before any connection is opened.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field

import aiosmtplib

from mailpipe.errors import SmtpError, SmtpTransient
from mailpipe.servers import ServerConfig
from sender import metrics
from sender.mx import MxResolver
from sender.replies import ReplyCategory, connection_failure
from sender.session import Session
from sender.translate import error_for, translate

log = logging.getLogger(__name__)


def tls_context(server: ServerConfig) -> ssl.SSLContext:
    """Verified by default (system CAs, plus ``ca_file``); no verification only when asked."""
    context = ssl.create_default_context()
    if server.ca_file:
        context.load_verify_locations(cafile=server.ca_file)
    if not server.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass
class Connection:
    """One open, ready (TLS negotiated, authenticated) SMTP session."""

    session: Session
    server: str
    opened: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    mails: int = 0
    tls: bool = False
    tls_version: str | None = None
    authenticated: bool = False
    broken: bool = False
    lease: str | None = None  # its place under the server's connection cap (mailpipe/pushback.py)

    @property
    def is_connected(self) -> bool:
        return self.session.is_connected

    def close(self) -> None:
        """Drop the socket at once (no QUIT): for a broken session, or on shutdown."""
        self.broken = True
        self.session.close()

    async def quit(self, timeout_s: float = 2.0) -> None:
        """End a healthy session politely; a failure to do so does not matter."""
        await self.session.quit(timeout_s)


async def open_connection(server: ServerConfig, *, timeout_s: float, resolver: MxResolver | None = None,
                          local_hostname: str | None = None) -> Connection:
    """Connect (to the MX hosts in turn, for a bare host name and a resolver), negotiate TLS as
    the server's mode says, and log in when credentials are set."""
    hosts = await resolver.hosts(server.address) if resolver is not None else [server.address.host]
    for i, host in enumerate(hosts):
        try:
            return await _open_one(server, host, timeout_s=timeout_s, local_hostname=local_hostname)
        except SmtpTransient as exc:
            if exc.category != ReplyCategory.CONNECTION or i == len(hosts) - 1:
                raise
            log.info("%s; trying the next MX host", exc.reason)
    raise AssertionError("unreachable: hosts is never empty")


def _refused_in_clear(server: ServerConfig, why: str) -> SmtpError:
    """The error for a connection that would have to send the credentials in clear."""
    return error_for(connection_failure(
        f"{server.address}: {why}; mailpipe sends credentials only over TLS, so it did not log in "
        "(use implicit TLS on port 465 or STARTTLS, or remove the credentials)", ReplyCategory.TLS_FAILED),
        f"SMTP {server.name}: {why}; credentials are never sent in clear")


async def _open_one(server: ServerConfig, host: str, *, timeout_s: float,
                    local_hostname: str | None) -> Connection:
    address = server.address
    mode = server.tls
    if mode == "none" and server.credentials is not None:
        # Not even a connection: a server that would see the password in clear gets nothing.
        error = _refused_in_clear(server, 'tls = "none" with credentials')
        metrics.CONNECTIONS.labels(server.name, ReplyCategory.TLS_FAILED).inc()
        raise error
    # With credentials, STARTTLS is required whatever the port: no AUTH in clear.
    require_starttls = mode == "starttls" or (mode == "opportunistic" and server.credentials is not None)
    context = tls_context(server) if mode != "none" else None
    client = aiosmtplib.SMTP(
        hostname=host, port=address.port, timeout=timeout_s,
        use_tls=mode == "implicit", start_tls=False, tls_context=context,
        local_hostname=local_hostname or socket.getfqdn())
    started = time.monotonic()
    during = "connect"
    try:
        await client.connect()
        tls = mode == "implicit"
        authenticated = False
        if mode in ("starttls", "opportunistic"):
            during = "EHLO"
            await client.ehlo()
            offered = client.supports_extension("starttls")
            if not offered and mode == "starttls":
                raise error_for(connection_failure(
                    f"{address} does not offer STARTTLS, which port {address.port} requires; "
                    "refusing to send in clear", ReplyCategory.TLS_FAILED), f"SMTP {server.name}: STARTTLS not offered")
            if not offered and require_starttls:
                raise _refused_in_clear(server, "the server does not offer STARTTLS")
            if offered:
                during = "STARTTLS"
                await client.starttls(tls_context=context)
                tls = True
                await client.ehlo()  # RFC 3207: what was learnt before TLS is forgotten; ask again
        if server.credentials is not None:
            if not tls:  # unreachable by the checks above; kept so that no path ever logs in in clear
                raise _refused_in_clear(server, "no TLS on this connection")
            during = "AUTH"
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()
            if not client.supports_extension("auth"):
                raise error_for(connection_failure(
                    f"{address} does not offer AUTH", ReplyCategory.AUTH_FAILED),
                    f"SMTP {server.name}: AUTH not offered")
            await _login(client, server.credentials.username, server.credentials.password)
            authenticated = True
        if client.is_ehlo_or_helo_needed:  # the extensions (PIPELINING, SIZE) are known before the first mail
            during = "EHLO"
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                await client.helo()  # a server from before ESMTP
        ssl_object = client.get_transport_info("ssl_object")
        session = Session.take_over(client, timeout_s)
    except BaseException as exc:
        client.close()
        if isinstance(exc, asyncio.CancelledError):
            raise
        error = translate(exc, server.name, during)
        metrics.CONNECTIONS.labels(server.name, error.category or "error").inc()
        raise error from exc
    metrics.CONNECTIONS.labels(server.name, "opened").inc()
    metrics.REPLY_SECONDS.labels(server.name, "connect").observe(time.monotonic() - started)
    return Connection(session=session, server=server.name, tls=tls, authenticated=authenticated,
                      tls_version=ssl_object.version() if ssl_object is not None else None)


async def _login(client: aiosmtplib.SMTP, username: str, password: str) -> None:
    """AUTH with the first mechanism that works, but never again after a 535: the credentials
    are wrong whatever the mechanism, and each try counts towards the account's lockout
    (aiosmtplib's ``login`` tries every mechanism offered)."""
    refused: aiosmtplib.SMTPAuthenticationError | None = None
    for name in client.supported_auth_methods:
        try:
            await getattr(client, f"auth_{name.replace('-', '')}")(username, password)
            return
        except aiosmtplib.SMTPAuthenticationError as exc:
            if exc.code == 535:
                raise
            refused = exc  # 504 and the like: a mechanism offered but not supported
    raise refused or aiosmtplib.SMTPException("no AUTH mechanism we know is offered")
