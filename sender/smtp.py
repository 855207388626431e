"""SMTP connections to one server: open (TLS, AUTH), send one mail, pool and reuse.

aiosmtplib errors are translated here into ``SmtpTransient`` / ``SmtpPermanent`` carrying the
reply code, text and category. A client object that saw a protocol error (timeout, dropped
connection, unexpected reply) is closed and never reused: aiosmtplib is known to hang when one
client object reconnects, so every connection is a fresh ``aiosmtplib.SMTP``.

TLS by ``ServerConfig.tls``:
- ``implicit``: TLS from the first byte (port 465, the seeds' "SSL").
- ``starttls``: STARTTLS is required (port 587, the seeds' "TLS"); a server that does not offer
  it is refused with category ``tls_failed``, never used in clear.
- ``opportunistic``: STARTTLS if the server offers it (port 25).
- ``none``: clear text.
Certificates are verified unless the server says ``tls_verify = false``; ``ca_file`` adds a CA.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosmtplib

from mailpipe.errors import SmtpError, SmtpPermanent, SmtpTransient
from mailpipe.servers import ServerConfig
from sender import metrics
from sender.mx import MxResolver
from sender.replies import (
    AUTH_FAILED,
    CONNECTION,
    OTHER,
    TLS_FAILED,
    Reply,
    classify,
    connection_failure,
)

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
    return connection_failure(exc.text or exc.reason, exc.category or CONNECTION)


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
        reply = connection_failure(f"TLS failed: {_describe(exc)}", TLS_FAILED)
        return error_for(reply, f"{where}: TLS failed")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        reply = classify(exc.code, exc.message)
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            reply = Reply(reply.code, reply.text, reply.enhanced, reply.outcome, AUTH_FAILED)
        elif reply.category == OTHER and (during.startswith("connect") or exc.code == 421):
            reply = Reply(reply.code, reply.text, reply.enhanced, reply.outcome, CONNECTION)
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

    client: aiosmtplib.SMTP
    server: str
    opened: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    mails: int = 0
    tls: bool = False
    authenticated: bool = False
    broken: bool = False

    def close(self) -> None:
        """Drop the socket at once (no QUIT): for a broken session, or on shutdown."""
        self.broken = True
        self.client.close()

    async def quit(self, timeout_s: float = 2.0) -> None:
        """End a healthy session politely; a failure to do so does not matter."""
        try:
            await asyncio.wait_for(self.client.quit(), timeout_s)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            self.client.close()


async def open_connection(server: ServerConfig, *, timeout_s: float, resolver: MxResolver | None = None,
                          local_hostname: str | None = None) -> Connection:
    """Connect (to the MX hosts in turn, for a bare host name and a resolver), negotiate TLS as
    the server's mode says, and log in when credentials are set."""
    hosts = await resolver.hosts(server.address) if resolver is not None else [server.address.host]
    for i, host in enumerate(hosts):
        try:
            return await _open_one(server, host, timeout_s=timeout_s, local_hostname=local_hostname)
        except SmtpTransient as exc:
            if exc.category != CONNECTION or i == len(hosts) - 1:
                raise
            log.info("%s; trying the next MX host", exc.reason)
    raise AssertionError("unreachable: hosts is never empty")


async def _open_one(server: ServerConfig, host: str, *, timeout_s: float,
                    local_hostname: str | None) -> Connection:
    address = server.address
    mode = server.tls
    context = tls_context(server) if mode != "none" else None
    client = aiosmtplib.SMTP(
        hostname=host, port=address.port, timeout=timeout_s,
        use_tls=mode == "implicit", start_tls=False, tls_context=context,
        local_hostname=local_hostname or socket.getfqdn())
    started = time.monotonic()
    during = "connect"
    try:
        await client.connect()
        conn = Connection(client=client, server=server.name, tls=mode == "implicit")
        if mode in ("starttls", "opportunistic"):
            during = "EHLO"
            await client.ehlo()
            offered = client.supports_extension("starttls")
            if mode == "starttls" and not offered:
                raise error_for(connection_failure(
                    f"{address} does not offer STARTTLS, which port {address.port} requires; "
                    "refusing to send in clear", TLS_FAILED), f"SMTP {server.name}: STARTTLS not offered")
            if offered:
                during = "STARTTLS"
                await client.starttls(tls_context=context)
                conn.tls = True
                await client.ehlo()  # RFC 3207: what was learnt before TLS is forgotten; ask again
        if server.credentials is not None:
            during = "AUTH"
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()
            if not client.supports_extension("auth"):
                raise error_for(connection_failure(
                    f"{address} does not offer AUTH" + ("" if conn.tls else " without TLS"), AUTH_FAILED),
                    f"SMTP {server.name}: AUTH not offered")
            await client.login(server.credentials.username, server.credentials.password)
            conn.authenticated = True
    except BaseException as exc:
        client.close()
        if isinstance(exc, asyncio.CancelledError):
            raise
        error = translate(exc, server.name, during)
        metrics.CONNECTIONS.labels(server.name, error.category or "error").inc()
        raise error from exc
    metrics.CONNECTIONS.labels(server.name, "opened").inc()
    metrics.REPLY_SECONDS.labels(server.name, "connect").observe(time.monotonic() - started)
    return conn


@dataclass(frozen=True)
class MailResult:
    """What the server said about one mail, per recipient."""

    accepted: tuple[str, ...]
    refused: dict[str, Reply]


async def send_mail(conn: Connection, sender: str, recipients: Sequence[str], message: bytes) -> MailResult:
    """One transaction: MAIL, RCPT per recipient, DATA. Per-recipient replies are kept apart.

    aiosmtplib's ``sendmail`` returns refused recipients as a dict only when some are accepted
    and raises when all are refused, and loses the RCPT replies when DATA is refused; so the
    transaction is spelt out here. A reply to MAIL or DATA applies to every recipient it covers.
    Raises SmtpTransient/SmtpPermanent only for what breaks the session (and marks it broken).
    """
    client = conn.client
    server = conn.server
    refused: dict[str, Reply] = {}
    conn.mails += 1
    conn.last_used = time.monotonic()
    try:
        options = []
        if client.supports_extension("size"):
            options.append(f"SIZE={len(message)}")
        if client.supports_extension("8bitmime") and not message[:65536].isascii():
            options.append("BODY=8BITMIME")
        started = time.monotonic()
        try:
            await client.mail(sender, options=options)
        except aiosmtplib.SMTPSenderRefused as exc:
            reply = classify(exc.code, exc.message)
            await _reset(conn, exc.code)
            return MailResult(accepted=(), refused=dict.fromkeys(recipients, reply))
        finally:
            metrics.REPLY_SECONDS.labels(server, "mail").observe(time.monotonic() - started)
        accepted: list[str] = []
        for recipient in recipients:
            started = time.monotonic()
            try:
                await client.rcpt(recipient)
                accepted.append(recipient)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused[recipient] = classify(exc.code, exc.message)
                if exc.code == 421:  # the server is closing the session: nothing more goes now
                    conn.close()
                    return MailResult(accepted=(), refused=dict.fromkeys(recipients, refused[recipient]))
            except ValueError as exc:  # an address aiosmtplib will not put on the wire (CR, LF)
                refused[recipient] = classify(553, f"5.1.3 address not sendable: {exc}")
            finally:
                metrics.REPLY_SECONDS.labels(server, "rcpt").observe(time.monotonic() - started)
        if not accepted:
            await _reset(conn, 0)
            return MailResult(accepted=(), refused=refused)
        started = time.monotonic()
        try:
            await client.data(message)
        except aiosmtplib.SMTPDataError as exc:
            reply = classify(exc.code, exc.message)
            await _reset(conn, exc.code)
            refused.update(dict.fromkeys(accepted, reply))
            return MailResult(accepted=(), refused=refused)
        finally:
            metrics.REPLY_SECONDS.labels(server, "data").observe(time.monotonic() - started)
        return MailResult(accepted=tuple(accepted), refused=refused)
    except ValueError as exc:  # the sender address cannot be sent (CR, LF, non-ASCII)
        reply = classify(553, f"5.1.7 sender address not sendable: {exc}")
        await _reset(conn, 0)
        return MailResult(accepted=(), refused=dict.fromkeys(recipients, reply))
    except BaseException as exc:
        conn.close()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise translate(exc, server, "sending") from exc
    finally:
        conn.last_used = time.monotonic()


async def _reset(conn: Connection, code: int) -> None:
    """RSET after a refused transaction; a 421 or a failing RSET ends the session."""
    if code == 421:
        conn.close()
        return
    try:
        await conn.client.rset()
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
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
        if conn.broken or not conn.client.is_connected or idle > self.idle_timeout_s:
            await self._retire(conn)
            return False
        if idle > PROBE_AFTER_S:
            try:
                await conn.client.noop(timeout=min(self.timeout_s, 5.0))
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                conn.close()
                return False
        return True

    def release(self, conn: Connection) -> None:
        """Give a connection back: kept for reuse if healthy, closed otherwise."""
        try:
            if self._closed or conn.broken or not conn.client.is_connected:
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
        if conn.broken or not conn.client.is_connected:
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
