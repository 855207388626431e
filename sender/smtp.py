"""SMTP connections to one server: open (TLS, AUTH), send one mail, pool and reuse.

aiosmtplib opens each connection (connect, EHLO, STARTTLS, AUTH); then ``sender/session.py``
takes its transport over and carries the mail transactions, pipelined when the server offers
PIPELINING. Errors of either are translated here into ``SmtpTransient`` / ``SmtpPermanent``
carrying the reply code, text and category. A connection that saw a protocol error (timeout,
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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import aiosmtplib

from mailpipe.errors import SmtpError, SmtpPermanent, SmtpTransient
from mailpipe.servers import ServerConfig
from sender import metrics
from sender.mx import MxResolver
from sender.replies import (
    Reply,
    ReplyCategory,
    classify,
    connection_failure,
)
from sender.session import ServerReply, Session, address_arg, data_payload

log = logging.getLogger(__name__)

# A reused connection idle longer than this is probed with NOOP first: servers close idle
# sessions (often after 60 s to 5 min) and a mail should not be deferred for that.
PROBE_AFTER_S = 5.0


def error_for(reply: Reply, reason: str) -> SmtpError:
    """The exception of ours that carries ``reply``: transient for 4xx and connection failures."""
    kind = SmtpTransient if reply.transient else SmtpPermanent
    return kind(reason, code=reply.code, text=reply.text, category=reply.category)


def reply_of(exc: SmtpError) -> Reply:
    """The classified reply an SmtpError carries (the inverse of ``error_for``)."""
    if exc.code:
        reply = classify(exc.code, exc.text)
        return Reply(reply.code, reply.text, reply.enhanced, reply.outcome, exc.category or reply.category)
    return connection_failure(exc.text or exc.reason, exc.category or ReplyCategory.CONNECTION)


def _is_tls_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError | ssl.CertificateError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def translate(exc: BaseException, server: str, during: str) -> SmtpError:
    """An aiosmtplib (or socket) error as ours, with the reply and its category."""
    where = f"SMTP {server}: {during}"
    if isinstance(exc, SmtpError):
        return exc
    if _is_tls_error(exc):
        reply = connection_failure(f"TLS failed: {_describe(exc)}", ReplyCategory.TLS_FAILED)
        return error_for(reply, f"{where}: TLS failed")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        reply = classify(exc.code, exc.message)
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            reply = Reply(reply.code, reply.text, reply.enhanced, reply.outcome, ReplyCategory.AUTH_FAILED)
        elif reply.category == ReplyCategory.OTHER and (during.startswith("connect") or exc.code == 421):
            reply = Reply(reply.code, reply.text, reply.enhanced, reply.outcome, ReplyCategory.CONNECTION)
        return error_for(reply, f"{where}: {reply}")
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | asyncio.TimeoutError | TimeoutError):
        return error_for(connection_failure(f"timed out during {during}"), f"{where}: timed out")
    if isinstance(exc, aiosmtplib.SMTPException | OSError | EOFError):
        return error_for(connection_failure(_describe(exc)), f"{where}: {_describe(exc)}")
    return error_for(connection_failure(f"{type(exc).__name__}: {exc}"), f"{where}: {exc}")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({type(cause).__name__}: {cause})"
    return text


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
            await client.login(server.credentials.username, server.credentials.password)
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


@dataclass(frozen=True)
class MailResult:
    """What the server said about one mail, per recipient. ``aborted``: ``ready`` said no, and
    the message was never sent (the connection is closed: the server discards the mail)."""

    accepted: tuple[str, ...]
    refused: dict[str, Reply]
    aborted: bool = False


async def send_mail(conn: Connection, sender: str, recipients: Sequence[str], message: bytes, *,
                    ready: Callable[[], Awaitable[bool]] | None = None) -> MailResult:
    """One transaction: MAIL, RCPT per recipient, DATA, pipelined when the server offers it.
    ``ready`` is awaited after the 354, before the message: the server can accept nothing
    before it says yes (the sender waits there for the previous mail's "sent" mark).

    Per-recipient replies are kept apart; a reply to MAIL or DATA applies to every recipient it
    covers. Raises SmtpTransient/SmtpPermanent only for what breaks the session (and marks it
    broken).
    """
    session = conn.session
    server = conn.server
    conn.mails += 1
    conn.last_used = time.monotonic()
    refused: dict[str, Reply] = {}
    try:
        mail_from = address_arg(sender)
    except ValueError as exc:
        reply = classify(553, f"5.1.7 sender address not sendable: {exc}")
        return MailResult(accepted=(), refused=dict.fromkeys(recipients, reply))
    envelope: list[tuple[str, bytes]] = []
    for recipient in recipients:
        try:
            envelope.append((recipient, address_arg(recipient)))
        except ValueError as exc:
            refused[recipient] = classify(553, f"5.1.3 address not sendable: {exc}")
    if not envelope:
        return MailResult(accepted=(), refused=refused)
    mail = b"MAIL FROM:" + mail_from
    if session.supports("size"):
        mail += b" SIZE=%d" % len(message)
    if session.supports("8bitmime") and not message.isascii():
        mail += b" BODY=8BITMIME"
    try:
        started = time.monotonic()
        replies = await _envelope(session, mail + b"\r\n", [arg for _, arg in envelope])
        metrics.REPLY_SECONDS.labels(server, "envelope").observe(time.monotonic() - started)
        mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        if not mail_reply.ok:
            reply = classify(mail_reply.code, mail_reply.text)
            refused.update(dict.fromkeys((r for r, _ in envelope), reply))
            await _reset(conn, replies)
            return MailResult(accepted=(), refused=refused)
        accepted: list[str] = []
        for (recipient, _), answer in zip(envelope, rcpt_replies, strict=False):
            if answer.ok:
                accepted.append(recipient)
            else:
                refused[recipient] = classify(answer.code, answer.text)
        closing = next((answer for answer in replies if answer.code == 421), None)
        if closing is not None:  # the server is closing the session: nothing more goes now
            conn.close()
            reply = classify(closing.code, closing.text)
            return MailResult(accepted=(), refused=dict.fromkeys(recipients, reply))
        if data_reply.code != 354:
            if accepted:  # DATA itself refused: it covers every recipient RCPT accepted
                refused.update(dict.fromkeys(accepted, classify(data_reply.code, data_reply.text)))
            await _reset(conn, replies)
            return MailResult(accepted=(), refused=refused)
        if not accepted:  # RFC 2920: a DATA that got 354 with no recipient is ended at once
            await session.command(b".\r\n")
            await _reset(conn, replies)
            return MailResult(accepted=(), refused=refused)
        if ready is not None and not await ready():
            conn.close()
            return MailResult(accepted=(), refused=refused, aborted=True)
        started = time.monotonic()
        final = await session.command(data_payload(message))
        metrics.REPLY_SECONDS.labels(server, "data").observe(time.monotonic() - started)
        if not final.ok:
            refused.update(dict.fromkeys(accepted, classify(final.code, final.text)))
            await _reset(conn, [final])
            return MailResult(accepted=(), refused=refused)
        return MailResult(accepted=tuple(accepted), refused=refused)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise translate(exc, server, "sending") from exc
    finally:
        conn.last_used = time.monotonic()


async def _envelope(session: Session, mail: bytes, rcpts: list[bytes]) -> list[ServerReply]:
    """The replies to MAIL, each RCPT and DATA (padded with the last one when the server
    stopped early: a refused MAIL, a 421). Pipelined: one write, one wait."""
    commands = [mail, *(b"RCPT TO:" + arg + b"\r\n" for arg in rcpts), b"DATA\r\n"]
    if session.pipelining:
        session.write(b"".join(commands))
        replies = await session.replies(len(commands))
    else:
        replies = []
        for i, command in enumerate(commands):
            replies.append(await session.command(command))
            if replies[-1].code == 421 or (i == 0 and not replies[0].ok):
                break
            if i == len(commands) - 2 and not any(r.ok for r in replies[1:]):
                break  # no recipient accepted: no DATA
    return replies + [replies[-1]] * (len(commands) - len(replies))


async def _reset(conn: Connection, replies: Sequence[ServerReply]) -> None:
    """RSET after a refused transaction; a 421 or a failing RSET ends the session."""
    if any(reply.code == 421 for reply in replies):
        conn.close()
        return
    try:
        if not (await conn.session.command(b"RSET\r\n")).ok:
            conn.close()
    except (ConnectionError, TimeoutError):
        conn.close()


class ServerPool:
    """Up to ``size`` connections to one server, shared by every batch in flight for it.

    ``acquire()`` waits for a free slot, then reuses an idle healthy connection or opens a
    fresh one. A connection is retired after ``max_mails_per_connection`` mails, after
    ``idle_timeout_s`` unused, and at once after a protocol error.
    """

    def __init__(self, server: ServerConfig, *, size: int, timeout_s: float, idle_timeout_s: float,
                 local_hostname: str | None = None, resolver: MxResolver | None = None) -> None:
        self.server = server
        self.resolver = resolver
        self.size = size
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.local_hostname = local_hostname
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Connection] = []
        self._quitting: set[asyncio.Task[None]] = set()
        self._closed = False

    async def acquire(self) -> Connection:
        await self._slots.acquire()
        try:
            while self._idle:
                conn = self._idle.pop()
                if await self._usable(conn):
                    return conn
            return await open_connection(self.server, timeout_s=self.timeout_s, resolver=self.resolver,
                                         local_hostname=self.local_hostname)
        except BaseException:
            self._slots.release()
            raise

    async def _usable(self, conn: Connection) -> bool:
        idle = time.monotonic() - conn.last_used
        if conn.broken or not conn.is_connected or idle > self.idle_timeout_s:
            await self._retire(conn)
            return False
        if idle > PROBE_AFTER_S:
            try:
                if not (await conn.session.command(b"NOOP\r\n", min(self.timeout_s, 5.0))).ok:
                    raise ConnectionResetError("NOOP refused")
            except (ConnectionError, TimeoutError):
                conn.close()
                return False
        return True

    def release(self, conn: Connection) -> None:
        """Give a connection back: kept for reuse if healthy, closed otherwise."""
        try:
            if self._closed or conn.broken or not conn.is_connected:
                conn.close()
            elif conn.mails >= self.server.max_mails_per_connection:
                task = asyncio.get_running_loop().create_task(conn.quit())
                self._quitting.add(task)  # kept referenced until done; close() waits for them
                task.add_done_callback(self._quitting.discard)
            else:
                self._idle.append(conn)
        finally:
            self._slots.release()

    async def _retire(self, conn: Connection) -> None:
        if conn.broken or not conn.is_connected:
            conn.close()
        else:
            await conn.quit()

    async def reap(self) -> None:
        """Close connections idle longer than the idle timeout."""
        now = time.monotonic()
        keep = []
        for conn in self._idle:
            if now - conn.last_used > self.idle_timeout_s:
                await self._retire(conn)
            else:
                keep.append(conn)
        self._idle = keep

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(conn.quit() for conn in idle), *self._quitting, return_exceptions=True)


class Pools:
    """One ServerPool per server name; a changed server configuration gets a new pool."""

    def __init__(self, *, default_size: int, timeout_s: float, idle_timeout_s: float,
                 resolver: MxResolver | None = None) -> None:
        self.default_size = default_size
        self.resolver = resolver
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._pools: dict[str, ServerPool] = {}
        self._retired: list[ServerPool] = []

    def get(self, server: ServerConfig) -> ServerPool:
        pool = self._pools.get(server.name)
        if pool is None or pool.server != server:
            if pool is not None:  # the old one finishes its mails, then its connections close
                pool._closed = True
                self._retired.append(pool)
            pool = ServerPool(server, size=server.concurrency or self.default_size, timeout_s=self.timeout_s,
                              idle_timeout_s=self.idle_timeout_s, resolver=self.resolver)
            self._pools[server.name] = pool
        return pool

    async def reap(self) -> None:
        for pool in list(self._pools.values()):
            await pool.reap()
        retired, self._retired = self._retired, []
        for pool in retired:
            await pool.close()

    async def close(self) -> None:
        pools, self._pools = [*self._pools.values(), *self._retired], {}
        self._retired = []
        await asyncio.gather(*(pool.close() for pool in pools), return_exceptions=True)
