"""Read what came back to a return path: pure functions, no I/O, never an exception on input.

In this order, the first that applies:
1. a DSN (RFC 3464): a ``message/delivery-status`` part, read with the standard library's
   email package: per recipient its Action, Status, Original- and Final-Recipient,
   Diagnostic-Code and Remote-MTA;
2. an ARF report (RFC 5965): a ``message/feedback-report`` part: its Feedback-Type and
   Original-Rcpt-To, and the reported mail's headers;
3. an older bounce format (qmail, old Exim, Yahoo's and others' texts) that flufl.bounce finds
   addresses in, when the mail looks like a bounce (from a mailer daemon, a bounce subject);
4. an auto-reply (RFC 3834 ``Auto-Submitted``, ``X-Autoreply``, vacation subjects): ignored;
5. flufl.bounce once more for anything else; what it cannot read either is ``unknown`` (the
   stage sends it to the review queue, never drops it).

Besides, every return-path token in the report's attached headers (the reported mail's
Return-Path, say) is collected: a feedback loop's report reaches us at a plain address, and the
token inside says which mail of which tenant it is about.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from email.header import Header, decode_header
from email.message import Message
from email.parser import HeaderParser
from email.utils import getaddresses, parseaddr

from flufl.bounce import all_failures

DSN, ARF, LEGACY, AUTO_REPLY, UNKNOWN = "dsn", "arf", "legacy", "auto_reply", "unknown"
MAX_TEXT = 256 * 1024  # how much of a body the text searches read

_TOKEN = re.compile(r"\b([bu][a-z2-7]{58})@", re.IGNORECASE)
_REPLY = re.compile(r"\b([245]\d\d)[ :\-]+((?:[245]\.\d{1,3}\.\d{1,3}\b)?[^\r\n]{0,400})")
_STATUS = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})")
_BOUNCE_FROM = re.compile(r"mailer-daemon|postmaster|mail delivery (subsystem|system)|mdaemon|bounce", re.I)
_BOUNCE_SUBJECT = re.compile(r"undeliver|delivery (status notification|failure|has failed|problem)|"
                             r"mail delivery failed|failure notice|returned mail|returned to sender|"
                             r"could not be delivered|non[- ]?delivery|delivery notification|"
                             r"nondeliverable|rejected:|warning: could not send", re.I)
_AUTO_SUBJECT = re.compile(r"out of (the )?office|automatic reply|auto(matic)?[- ]?(reply|response|antwort)|"
                           r"autoreply|vacation|on leave|abwesen|r[ée]ponse automatique|absence|"
                           r"respuesta autom[aá]tica|fuera de la oficina|risposta automatica|afwezig|"
                           r"autosvar|fr[aå]nvaro|poissa|nieobecno", re.I)


@dataclass(frozen=True)
class Failure:
    """One recipient a report is about."""

    action: str  # failed, delayed, delivered, relayed, expanded (a DSN's Action)
    status: str  # "5.1.1", or "" when none was given
    original: str  # the Original-Recipient (our ORCPT), or ""
    final: str  # the Final-Recipient, or the address an older format names
    diagnostic: str  # the Diagnostic-Code without its type ("550 5.1.1 ..."), or the text found
    remote_mta: str = ""


@dataclass(frozen=True)
class Report:
    kind: str
    reason: str = ""  # unknown: why; auto_reply: the marker
    reporting_mta: str = ""
    envelope_id: str = ""  # a DSN's Original-Envelope-Id: our ENVID, the job id
    failures: tuple[Failure, ...] = ()
    feedback_type: str = ""  # ARF
    original_recipients: tuple[str, ...] = ()  # ARF: Original-Rcpt-To, the reported mail's To and Cc
    tokens: tuple[str, ...] = ()  # return-path local parts in the attached headers
    message_ids: tuple[str, ...] = ()  # the left parts of the attached mail's Message-ID
    senders: tuple[str, ...] = ()  # the report's own From and Sender (a mailto unsubscribe)
    subject: str = ""


def read(raw: bytes) -> Report:
    """What ``raw`` is; any input gives a Report (``unknown`` with the reason when unreadable)."""
    try:
        msg = email.message_from_bytes(raw, policy=email.policy.compat32)
        return _read(msg)
    except Exception as exc:  # the email package and flufl.bounce on hostile input: never a crash
        return Report(UNKNOWN, reason=f"cannot be parsed: {type(exc).__name__}: {str(exc)[:200]}")


def _read(msg: Message) -> Report:
    senders = tuple(a for _, a in getaddresses([_header(msg, "From"), _header(msg, "Sender")]) if "@" in a)
    subject = _header(msg, "Subject")[:300]
    parts = list(msg.walk()) if msg.is_multipart() else [msg]
    attached = _attached_headers(parts)
    base = Report(UNKNOWN, senders=senders, subject=subject, tokens=_tokens(attached),
                  message_ids=_message_ids(attached))
    for part in parts:
        if part.get_content_type() == "message/delivery-status":
            return _dsn(part, base)
    for part in parts:
        if part.get_content_type() == "message/feedback-report":
            return _arf(part, attached, base)
    looks_like_bounce = (_BOUNCE_FROM.search(_header(msg, "From")) is not None
                         or _BOUNCE_SUBJECT.search(subject) is not None)
    if looks_like_bounce:
        legacy = _legacy(msg, base)
        if legacy is not None:
            return legacy
    auto = _auto_reply(msg, subject)
    if auto:
        return replace(base, kind=AUTO_REPLY, reason=auto)
    if not looks_like_bounce:
        legacy = _legacy(msg, base)
        if legacy is not None:
            return legacy
    return replace(base, reason="neither a DSN, an ARF report, an auto-reply nor a bounce format flufl.bounce knows")


def _dsn(part: Message, base: Report) -> Report:
    blocks = _field_blocks(part)
    if not blocks:
        return replace(base, reason="a delivery-status part without fields")
    head, recipients = blocks[0], blocks[1:]
    failures = []
    for block in recipients:
        original = _typed_address(block.get("original-recipient", ""))
        final = _typed_address(block.get("final-recipient", ""))
        if not (original or final):
            continue
        status_match = _STATUS.match(block.get("status", ""))
        failures.append(Failure(
            action=block.get("action", "").strip().lower().split(" ")[0], original=original, final=final,
            status=status_match.group(1) if status_match else "",
            diagnostic=_untyped(block.get("diagnostic-code", "")), remote_mta=_untyped(block.get("remote-mta", ""))))
    if not failures:
        return replace(base, reason="a delivery-status part that names no recipient")
    return replace(base, kind=DSN, reporting_mta=_untyped(str(head.get("reporting-mta", ""))),
                   envelope_id=str(head.get("original-envelope-id", "")).strip()[:200], failures=tuple(failures))


def _arf(part: Message, attached: list[Message], base: Report) -> Report:
    blocks = _field_blocks(part)
    if not blocks:
        return replace(base, reason="a feedback report without fields")
    fields = blocks[0]
    feedback_type = str(fields.get("feedback-type", "")).strip().lower()
    if not feedback_type:
        return replace(base, reason="a feedback report without Feedback-Type")
    recipients = [_typed_address(str(v)) or parseaddr(str(v))[1] for v in fields.get_all("original-rcpt-to") or []]
    for headers in attached:
        recipients += [a for _, a in getaddresses(headers.get_all("To", []) + headers.get_all("Cc", [])
                                                  + headers.get_all("Delivered-To", [])
                                                  + headers.get_all("X-Original-To", []))]
    return replace(base, kind=ARF, feedback_type=feedback_type,
                   reporting_mta=_untyped(str(fields.get("reporting-mta", ""))),
                   original_recipients=tuple(dict.fromkeys(a.strip().lower() for a in recipients if "@" in a)))


def _legacy(msg: Message, base: Report) -> Report | None:
    """An older bounce format, through flufl.bounce; None when it finds no address."""
    try:
        temporary, permanent = all_failures(msg)
    except Exception:  # a detector that trips over a malformed part: not this format
        return None
    if not (temporary or permanent):
        return None
    text = _body_text(msg)
    failures = []
    for address, action in [*((a, "failed") for a in permanent), *((a, "delayed") for a in temporary - permanent)]:
        decoded = address.decode("utf-8", "replace") if isinstance(address, bytes) else str(address)
        decoded = decoded.strip().strip("<>").lower()
        if "@" not in decoded:
            continue
        diagnostic = _reply_near(text, decoded)
        status = _STATUS.match(diagnostic[4:]) if diagnostic[:3].isdigit() else None
        failures.append(Failure(action=action, status=status.group(1) if status else "", original="",
                                final=decoded, diagnostic=diagnostic))
    if not failures:
        return None
    return replace(base, kind=LEGACY, failures=tuple(failures))


def _auto_reply(msg: Message, subject: str) -> str:
    auto = _header(msg, "Auto-Submitted").strip().lower()
    if auto and auto != "no":
        return f"Auto-Submitted: {auto[:40]}"
    for name in ("X-Autoreply", "X-Autorespond", "X-Auto-Reply"):
        if msg.get(name) is not None:
            return name
    precedence = _header(msg, "Precedence").strip().lower()
    if precedence == "auto_reply":
        return "Precedence: auto_reply"
    if _AUTO_SUBJECT.search(subject):
        return "a vacation or out-of-office subject"
    return ""


# -- helpers ---------------------------------------------------------------------------------------

def _header(msg: Message, name: str) -> str:
    """A header as text: raw UTF-8 (which the parser keeps as surrogate escapes) decoded."""
    value = msg.get(name)
    if value is None:
        return ""
    if isinstance(value, Header):  # raw 8-bit bytes: the parser's "unknown-8bit", read as UTF-8
        text = "".join(part.decode("utf-8", "replace") if isinstance(part, bytes) else part
                       for part, _charset in decode_header(value))
    else:
        text = str(value)
    return " ".join(text.split())


def _field_blocks(part: Message) -> list[Message]:
    """The header blocks of a delivery-status or feedback-report part, however it was parsed."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)]
    if isinstance(payload, str):  # a part the parser left as text: its blocks, blank-line separated
        text = payload.replace("\r\n", "\n")
        return [HeaderParser().parsestr(block.strip() + "\n") for block in re.split(r"\n\s*\n", text) if block.strip()]
    return []


def _attached_headers(parts: Iterable[Message]) -> list[Message]:
    """The headers of every attached original (message/rfc822, text/rfc822-headers)."""
    found: list[Message] = []
    for part in parts:
        kind = part.get_content_type()
        if kind == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list):
                found += [p for p in payload if isinstance(p, Message)]
        elif kind in ("text/rfc822-headers", "text/rfc822-header"):
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                found.append(HeaderParser().parsestr(payload.decode("utf-8", "replace")))
    return found


def _tokens(attached: list[Message]) -> tuple[str, ...]:
    text = "\n".join(f"{k}: {v}" for headers in attached for k, v in headers.items())
    return tuple(dict.fromkeys(m.lower() for m in _TOKEN.findall(text[:MAX_TEXT])))


def _message_ids(attached: list[Message]) -> tuple[str, ...]:
    ids = []
    for headers in attached:
        value = headers.get("Message-ID")
        if value is not None:
            left = str(value).strip().strip("<>").partition("@")[0]
            if left:
                ids.append(left[:64])
    return tuple(ids)


def _typed_address(value: str) -> str:
    """``rfc822; <ann@example.com>`` as ``ann@example.com`` (lowercase), or ""."""
    kind, sep, address = " ".join(value.split()).partition(";")
    if not sep:
        address = kind
    elif kind.strip().lower() not in ("rfc822", "utf-8"):
        return ""
    address = address.strip().strip("<>").strip()
    return address.lower() if "@" in address and " " not in address else ""


def _untyped(value: str) -> str:
    """A DSN field without its type: ``smtp; 550 5.1.1 x`` as ``550 5.1.1 x``."""
    text = " ".join(value.split())
    kind, sep, rest = text.partition(";")
    return (rest if sep and " " not in kind.strip() else text).strip()[:1000]


def _body_text(msg: Message) -> str:
    chunks: list[str] = []
    size = 0
    for part in msg.walk() if msg.is_multipart() else [msg]:
        if part.get_content_maintype() != "text":
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            chunk = payload[:MAX_TEXT - size].decode("utf-8", "replace")
            chunks.append(chunk)
            size += len(chunk)
            if size >= MAX_TEXT:
                break
    return "\n".join(chunks)


def _reply_near(text: str, address: str) -> str:
    """The SMTP reply an older bounce quotes for ``address`` (the first one after it, else the
    first anywhere), as ``CODE text``; "" when it quotes none."""
    lowered = text.lower()
    at = lowered.find(address)
    for start in ((at,) if at >= 0 else ()) + (0,):
        match = _REPLY.search(text, start, start + 2000 if start else len(text))
        if match is not None:
            return " ".join(f"{match.group(1)} {match.group(2)}".split())[:1000]
    return ""


def split_diagnostic(diagnostic: str, status: str) -> tuple[int, str]:
    """A reply code and text from a Diagnostic-Code (``550 5.1.1 ...``) and its Status: a
    diagnostic without a code gets the status's class (5: 550, 4: 450, 2: 250)."""
    match = re.match(r"\s*([245]\d\d)[\s:\-]+(.*)", diagnostic, re.S)
    if match is not None:
        return int(match.group(1)), match.group(2)
    klass = status[:1] if status[:1] in ("2", "4", "5") else "5"
    return {"2": 250, "4": 450, "5": 550}[klass], diagnostic
