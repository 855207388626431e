"""One mail transaction over an open connection: MAIL, RCPT per recipient, DATA, pipelined
when the server offers PIPELINING (``sender/session.py`` speaks it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from sender import metrics
from sender.replies import Reply, classify
from sender.session import ServerReply, Session, address_arg, data_payload
from sender.smtp import Connection
from sender.translate import translate


@dataclass(frozen=True)
class MailResult:
    """What the server said about one mail, per recipient. ``aborted``: the message was never
    sent (the connection is closed: the server discards the mail), because ``ready`` said no,
    or, ``late``, because the cutoff came first (``refused`` still holds the RCPT refusals)."""

    accepted: tuple[str, ...]
    refused: dict[str, Reply]
    aborted: bool = False
    late: bool = False


async def send_mail(conn: Connection, sender: str, recipients: Sequence[str], message: bytes, *,
                    ready: Callable[[], Awaitable[bool]] | None = None,
                    cutoff: float | None = None, mail_params: bytes = b"",
                    rcpt_params: Mapping[str, bytes] | None = None) -> MailResult:
    """One transaction: MAIL, RCPT per recipient, DATA, pipelined when the server offers it.
    ``ready`` is awaited after the 354, before the message: the server can accept nothing
    before it says yes (the sender waits there for the previous mail's "sent" mark).

    ``cutoff`` (``time.monotonic()``): no body goes after it. The wait for the envelope's
    replies (the 354 above all: a tarpit holds it) ends there, and it is checked again just
    before the body; past it the connection is dropped, since a transaction that had its 354
    cannot be taken back otherwise, and the result is ``aborted`` and ``late``.

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
    mail += mail_params  # DSN's RET and ENVID (sender/envelope.py)
    try:
        started = time.monotonic()
        try:
            rcpts = [arg + (rcpt_params or {}).get(r, b"") for r, arg in envelope]  # DSN's NOTIFY, ORCPT
            replies = await _envelope(session, mail + b"\r\n", rcpts, cutoff)
        except _CutoffCame:
            conn.close()
            return MailResult(accepted=(), refused=refused, aborted=True, late=True)
        metrics.reply_seconds(server, "envelope").observe(time.monotonic() - started)
        mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        if not mail_reply.ok:
            reply = classify(mail_reply.code, mail_reply.text, "mail")
            refused.update(dict.fromkeys((r for r, _ in envelope), reply))
            await _reset(conn, replies)
            return MailResult(accepted=(), refused=refused)
        accepted: list[str] = []
        for (recipient, _), answer in zip(envelope, rcpt_replies, strict=False):
            if answer.ok:
                accepted.append(recipient)
            else:
                refused[recipient] = classify(answer.code, answer.text, "rcpt")
        closing = next((i for i, answer in enumerate(replies) if answer.code == 421), None)
        if closing is not None:  # the server is closing the session: nothing more goes now
            conn.close()
            phase = "mail" if closing == 0 else "data" if closing == len(replies) - 1 else "rcpt"
            reply = classify(421, replies[closing].text, phase)
            return MailResult(accepted=(), refused=dict.fromkeys(recipients, reply))
        if data_reply.code != 354:
            if accepted:  # DATA itself refused: it covers every recipient RCPT accepted
                refused.update(dict.fromkeys(accepted, classify(data_reply.code, data_reply.text, "data")))
            await _reset(conn, replies)
            return MailResult(accepted=(), refused=refused)
        if not accepted:  # RFC 2920: a DATA that got 354 with no recipient is ended at once
            await session.command(b".\r\n")
            await _reset(conn, replies)
            return MailResult(accepted=(), refused=refused)
        if ready is not None and not await ready():
            conn.close()
            return MailResult(accepted=(), refused=refused, aborted=True)
        if _past(cutoff):  # the previous mark, or the 354 itself, came too late
            conn.close()
            return MailResult(accepted=(), refused=refused, aborted=True, late=True)
        started = time.monotonic()
        final = await session.command(data_payload(message))
        metrics.reply_seconds(server, "data").observe(time.monotonic() - started)
        if not final.ok:
            refused.update(dict.fromkeys(accepted, classify(final.code, final.text, "eod")))
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


def _past(cutoff: float | None) -> bool:
    return cutoff is not None and time.monotonic() >= cutoff


class _CutoffCame(Exception):
    """The cutoff came before the server's replies did (a timeout the cutoff set, not the
    server's silence past the SMTP timeout)."""


async def _replies(session: Session, count: int, cutoff: float | None, command: bytes = b"") -> list[ServerReply]:
    """``count`` replies (after writing ``command``), waiting at most the SMTP timeout, or
    until the cutoff if that comes first (then ``_CutoffCame``)."""
    wait_s = session.timeout_s
    if cutoff is not None and cutoff - time.monotonic() < wait_s:
        wait_s = cutoff - time.monotonic()
        if wait_s <= 0:
            raise _CutoffCame
    if command:
        session.write(command)
    try:
        return await session.replies(count, wait_s)
    except TimeoutError:
        if wait_s < session.timeout_s:
            raise _CutoffCame from None
        raise


async def _envelope(session: Session, mail: bytes, rcpts: list[bytes], cutoff: float | None) -> list[ServerReply]:
    """The replies to MAIL, each RCPT and DATA (padded with the last one when the server
    stopped early: a refused MAIL, a 421). Pipelined: one write, one wait. TimeoutError when
    the server is silent past the SMTP timeout, ``_CutoffCame`` when the cutoff comes first."""
    commands = [mail, *(b"RCPT TO:" + arg + b"\r\n" for arg in rcpts), b"DATA\r\n"]
    if session.pipelining:
        replies = await _replies(session, len(commands), cutoff, b"".join(commands))
    else:
        replies = []
        for i, command in enumerate(commands):
            replies.append((await _replies(session, 1, cutoff, command))[0])
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
