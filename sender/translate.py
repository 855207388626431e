"""Errors of aiosmtplib, of our SMTP session and of the network, translated where they enter:
an ``SmtpTransient`` or ``SmtpPermanent`` carrying the reply code, text and category (a
connection that failed has code 0 and category ``connection``, a TLS failure ``tls_failed``)."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl

import aiosmtplib

from mailpipe.errors import SmtpError, SmtpPermanent, SmtpTransient
from sender.replies import Reply, ReplyCategory, classify, connection_failure


def error_for(reply: Reply, reason: str, phase: str = "") -> SmtpError:
    """The exception of ours that carries ``reply``: transient for 4xx and connection failures."""
    kind = SmtpTransient if reply.transient else SmtpPermanent
    return kind(reason, code=reply.code, text=reply.text, category=reply.category, phase=phase)


def reply_of(exc: SmtpError) -> Reply:
    """The classified reply an SmtpError carries (the inverse of ``error_for``), classified in
    the phase it came in: a 421 at the greeting is too many connections, later a server busy."""
    if exc.code:
        reply = classify(exc.code, exc.text, exc.phase or None)
        return dataclasses.replace(reply, category=exc.category or reply.category)
    return connection_failure(exc.text or exc.reason, exc.category or ReplyCategory.CONNECTION)


# What ``translate`` is told it was doing, as the reply rules name the SMTP phases.
PHASE_OF = {"connect": "greeting", "EHLO": "ehlo", "STARTTLS": "starttls", "AUTH": "auth", "sending": "mail"}


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
    phase = PHASE_OF.get(during, "")
    if _is_tls_error(exc):
        reply = connection_failure(f"TLS failed: {_describe(exc)}", ReplyCategory.TLS_FAILED)
        return error_for(reply, f"{where}: TLS failed", phase)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        reply = classify(exc.code, exc.message, phase or None)
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            reply = dataclasses.replace(reply, category=ReplyCategory.AUTH_FAILED)
        elif reply.category == ReplyCategory.OTHER and (during.startswith("connect") or exc.code == 421):
            reply = dataclasses.replace(reply, category=ReplyCategory.CONNECTION)
        return error_for(reply, f"{where}: {reply}", phase)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | asyncio.TimeoutError | TimeoutError):
        return error_for(connection_failure(f"timed out during {during}"), f"{where}: timed out", phase)
    if isinstance(exc, aiosmtplib.SMTPException | OSError | EOFError):
        return error_for(connection_failure(_describe(exc)), f"{where}: {_describe(exc)}", phase)
    return error_for(connection_failure(f"{type(exc).__name__}: {exc}"), f"{where}: {exc}", phase)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({type(cause).__name__}: {cause})"
    return text
