"""An SMTP session after its handshake: commands written, replies read in order, pipelined.

aiosmtplib opens the session (connect, EHLO, STARTTLS, AUTH: ``sender/smtp.py``); then
``Session`` takes over its transport for the mail transactions. aiosmtplib reads one reply per
command it writes, so one mail costs four writes and four round trips (MAIL, RCPT, DATA, the
message). A server that offers PIPELINING (RFC 2920) gets MAIL, every RCPT and DATA in one
write and the message in a second: two round trips. Profiled (py-spy), the socket writes were
the sender's largest cost; over a WAN the round trips are its largest wait.

Errors are the transport's own kinds: ``ConnectionError`` when the session is lost or a
reply is malformed, ``TimeoutError`` when a reply does not come in time.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import NamedTuple, cast

import aiosmtplib

MAX_REPLY_BYTES = 64 * 1024  # a reply longer than this is not a server we understand


class ServerReply(NamedTuple):
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


def address_arg(address: str) -> bytes:
    """``<address>`` for MAIL FROM / RCPT TO; ValueError for what cannot go on the wire."""
    if any(c in address for c in "\r\n\0<>"):
        raise ValueError(f"{address!r} holds a line break, NUL or angle bracket")
    return b"<" + address.encode("ascii") + b">"  # UnicodeEncodeError is a ValueError


def data_payload(message: bytes) -> bytes:
    """The message as DATA sends it: CRLF line ends, leading dots doubled, ``.`` at the end."""
    crlf = message.count(b"\r\n")  # once: a two-byte count is the slow one (2 µs for 2 KB)
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        message = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if message.startswith(b".") or b"\n." in message:
        message = (b"." if message.startswith(b".") else b"") + message.replace(b"\n.", b"\n..")
    return message + (b".\r\n" if message.endswith(b"\r\n") else b"\r\n.\r\n")


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Session(asyncio.Protocol):
    """The protocol of one open session: replies are parsed as they arrive and queued.

    No write flow control: a session never has more than one message unanswered in its
    transport's buffer (the next write waits for the reply)."""

    def __init__(self, transport: asyncio.Transport, extensions: dict[str, str], timeout_s: float) -> None:
        self.transport = transport
        self.extensions = extensions
        self.timeout_s = timeout_s
        self.pipelining = "pipelining" in extensions
        self._buffer = bytearray()
        self._replies: deque[ServerReply] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._want = 0
        self._lost: ConnectionError | None = None

    @classmethod
    def take_over(cls, client: aiosmtplib.SMTP, timeout_s: float) -> Session:
        """The session of a client whose handshake is done; the client is not used after this."""
        transport = client.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the connection closed during its handshake")
        session = cls(cast(asyncio.Transport, transport), dict(client.esmtp_extensions), timeout_s)
        transport.set_protocol(session)
        return session

    @property
    def is_connected(self) -> bool:
        return self._lost is None and not self.transport.is_closing()

    def supports(self, extension: str) -> bool:
        return extension.lower() in self.extensions

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._parse()
        except ConnectionError as exc:
            self._fail(exc)
            self.transport.close()
            return
        if self._waiter is not None and len(self._replies) >= self._want and not self._waiter.done():
            self._waiter.set_result(None)

    def eof_received(self) -> bool:
        self._fail(ConnectionResetError("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        lost = ConnectionResetError(f"connection lost: {exc}" if exc else "the server closed the connection")
        self._fail(lost)

    def _fail(self, exc: ConnectionError) -> None:
        if self._lost is None:
            self._lost = exc
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)  # the reader sees ``_lost``

    def _parse(self) -> None:
        buffer = self._buffer
        start = position = 0
        while (end := buffer.find(b"\n", position)) >= 0:
            line = buffer[position:end]
            position = end + 1
            if len(line) < 3 or not line[:3].isdigit():
                raise ConnectionAbortedError(f"malformed SMTP reply line: {bytes(line[:200])!r}")
            if line[3:4] == b"-":
                continue  # a multi-line reply goes on
            lines = buffer[start:position].split(b"\n")
            text = b"\n".join(part[4:].strip() for part in lines if part.strip())
            self._replies.append(ServerReply(int(line[:3]), text.decode("utf-8", "replace")))
            start = position
        if start:
            del buffer[:start]
        if len(buffer) > MAX_REPLY_BYTES:
            raise ConnectionAbortedError(f"SMTP reply longer than {MAX_REPLY_BYTES} bytes")

    # -- commands -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.is_connected:
            raise self._lost or ConnectionResetError("the connection is closed")
        self.transport.write(data)

    async def replies(self, count: int, timeout_s: float | None = None) -> list[ServerReply]:
        """The next ``count`` replies, in order. A server that answers 421 and closes may give
        fewer: the 421 is then the last one (RFC 5321 4.2.2: it is closing the session)."""
        while len(self._replies) < count:
            if self._lost is not None:
                if self._replies and self._replies[-1].code == 421:
                    break
                raise self._lost
            self._want = count
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            # A timer handle, not ``asyncio.timeout``: that one cost 9% of the sender's CPU
            # (issue 24's profile), for a wait that is almost always answered in time.
            timer = loop.call_later(timeout_s or self.timeout_s, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return [self._replies.popleft() for _ in range(min(count, len(self._replies)))]

    async def command(self, line: bytes, timeout_s: float | None = None) -> ServerReply:
        self.write(line)
        return (await self.replies(1, timeout_s))[0]

    def close(self) -> None:
        self._fail(ConnectionResetError("the connection is closed"))
        self.transport.close()

    async def quit(self, timeout_s: float = 2.0) -> None:
        """QUIT politely; whether the server answers does not matter."""
        try:
            await self.command(b"QUIT\r\n", timeout_s)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self.close()
