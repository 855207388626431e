"""Validate an intake request and render its RFC 5322 message, once.

Everything here is pure and raises ``InvalidMessage`` with a reason that names the field, so
the client library can refuse bad input before it is published and the enqueue stage can
dead-letter what an upstream in another language sent anyway.
"""

from __future__ import annotations

import binascii
import functools
import re
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate

import dkim
from email_validator import EmailNotValidError, validate_email

from mailpipe.errors import ConfigError, InvalidMessage
from mailpipe.model import PRIORITIES, IntakeRequest
from mailpipe.servers import DkimKey

# Used with fullmatch: "$" would also match before a trailing newline ("X-Bad\n").
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")  # printable ASCII, no colon, no space
_FORBIDDEN_CHARS = ("\r", "\n", "\0")
# Headers the renderer owns: a caller setting them would break the envelope or the MIME tree.
RESERVED_HEADERS = frozenset({
    "from", "to", "cc", "bcc", "subject", "date", "message-id", "mime-version",
    "content-type", "content-transfer-encoding", "content-disposition", "return-path",
    "received", "dkim-signature",
})


def check_address(address: str, field: str) -> str:
    """The address in ASCII form (IDNA domain), or ``InvalidMessage`` naming the field and what
    is wrong. email-validator does the RFC work; no DNS lookup on the intake's hot path, and no
    internationalized local parts (not every server speaks SMTPUTF8)."""
    if any(c in address for c in _FORBIDDEN_CHARS):
        raise InvalidMessage(f"{field}: {address!r} contains CR, LF or NUL")
    checked, problem = _checked(address.strip())
    if problem:
        raise InvalidMessage(f"{field}: {address!r} is not a valid address: {problem}")
    return checked


@functools.lru_cache(maxsize=65536)
def _checked(address: str) -> tuple[str, str]:
    """(ASCII form, "") or ("", why not). Cached: a tenant's senders and regular recipients
    come back all day, and the check is a third of the intake's time (py-spy)."""
    try:
        return str(validate_email(address, check_deliverability=False, allow_smtputf8=False).ascii_email), ""
    except EmailNotValidError as exc:
        return "", str(exc)


def check_header(name: str, value: str) -> None:
    if not _HEADER_NAME.fullmatch(name):
        raise InvalidMessage(f"headers[{name!r}]: not a valid header name")
    if name.lower() in RESERVED_HEADERS:
        raise InvalidMessage(f"headers[{name!r}]: set by mailpipe; use the matching argument instead")
    if any(c in value for c in _FORBIDDEN_CHARS):
        raise InvalidMessage(f"headers[{name!r}]: value contains CR, LF or NUL")


def _check_text(value: str | None, field: str) -> None:
    if value is not None and any(c in value for c in _FORBIDDEN_CHARS):
        raise InvalidMessage(f"{field}: contains CR, LF or NUL")


def envelope_recipients(req: IntakeRequest, max_recipients: int) -> tuple[str, ...]:
    """Every recipient once (to, cc, bcc; or a raw request's recipients), validated."""
    named: list[tuple[str, str]] = []
    if req.is_raw:
        named += [(f"recipients[{i}]", a) for i, a in enumerate(req.recipients)]
    else:
        for field in ("to", "cc", "bcc"):
            named += [(f"{field}[{i}]", a) for i, a in enumerate(getattr(req, field))]
    if not named:
        raise InvalidMessage("recipients: none given (to, cc, bcc or recipients)")
    if len(named) > max_recipients:
        raise InvalidMessage(f"recipients: {len(named)} given, at most {max_recipients} per mail")
    seen: dict[str, str] = {}
    for field, address in named:
        checked = check_address(address, field)
        seen.setdefault(checked.lower(), checked)
    return tuple(seen.values())


MAX_SCHEDULE_MS = 30 * 24 * 3600 * 1000


def validate(req: IntakeRequest, max_message_bytes: int, max_recipients: int) -> tuple[str, ...]:
    """Check a request; return its envelope recipients."""
    if not req.tenant or any(c in req.tenant for c in _FORBIDDEN_CHARS):
        raise InvalidMessage("tenant: empty or contains CR, LF or NUL")
    if req.priority not in PRIORITIES:
        raise InvalidMessage(f"priority: {req.priority!r} is not one of {', '.join(PRIORITIES)}")
    if req.send_at_ms is not None and req.send_at_ms > req.created_ms + MAX_SCHEDULE_MS:
        raise InvalidMessage("send_at: more than 30 days ahead")
    check_address(req.sender, "sender")
    recipients = envelope_recipients(req, max_recipients)
    if req.is_raw:
        assert req.message is not None
        if not req.message:
            raise InvalidMessage("message: empty")
        if len(req.message) > max_message_bytes:
            raise InvalidMessage(f"message: {len(req.message)} bytes, "
                                 f"over the {max_message_bytes}-byte limit")
        return recipients
    _check_text(req.subject, "subject")
    for name, value in req.headers.items():
        check_header(name, value)
    if req.text is None and req.html is None:
        raise InvalidMessage("text, html: give at least one body part")
    size = sum(len(a.data) for a in req.attachments) + len(req.text or "") + len(req.html or "")
    if size > max_message_bytes:
        raise InvalidMessage(f"message: {size} bytes of content, over the {max_message_bytes}-byte limit")
    for i, attachment in enumerate(req.attachments):
        _check_text(attachment.filename, f"attachments[{i}].filename")
        maintype, slash, subtype = attachment.content_type.partition("/")
        if not slash or not _HEADER_NAME.fullmatch(maintype) or not _HEADER_NAME.fullmatch(subtype):
            raise InvalidMessage(f"attachments[{i}].content_type: {attachment.content_type!r} "
                                 f"is not like type/subtype")
    return recipients


def render(req: IntakeRequest, job_id: str) -> bytes:
    """The RFC 5322 message, CRLF line endings (the SMTP policy), ready to send as is."""
    if req.is_raw:
        assert req.message is not None
        return req.message
    return render_plain(req, job_id) or render_mime(req, job_id)


def _headers(req: IntakeRequest, job_id: str) -> list[tuple[str, str]]:
    headers = [("From", req.sender)]
    if req.to:
        headers.append(("To", ", ".join(req.to)))
    if req.cc:
        headers.append(("Cc", ", ".join(req.cc)))
    if req.subject is not None:
        headers.append(("Subject", req.subject))
    headers.append(("Date", formatdate(req.created_ms / 1000, localtime=False, usegmt=True)))
    headers.append(("Message-ID", f"<{job_id}@{req.sender.rpartition('@')[2]}>"))
    return headers + list(req.headers.items())


def _body_part(text: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, CRLF body): 7bit when it can be, else quoted-printable."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii() and all(len(line) <= 998 for line in text.split("\n")):
        return "7bit", text.replace("\n", "\r\n").encode("ascii")
    encoded = binascii.b2a_qp(text.encode("utf-8"), quotetabs=False, istext=True, header=False)
    return "quoted-printable", encoded.replace(b"\n", b"\r\n")


def render_plain(req: IntakeRequest, job_id: str) -> bytes | None:
    """Text and/or HTML without attachments, with short ASCII headers, built directly: the
    common case, several times faster than ``email``'s EmailMessage (which the hot path of the
    intake would otherwise spend most of its time in). None when ``render_mime`` is needed."""
    if req.attachments or (req.text is None and req.html is None):
        return None
    headers = _headers(req, job_id)
    if any(not (name + value).isascii() or len(name) + len(value) > 76 for name, value in headers
           if name not in ("To", "Cc")):
        return None
    lines = [f"{name}: {_fold_addresses(value) if name in ('To', 'Cc') else value}" for name, value in headers]
    lines.append("MIME-Version: 1.0")
    parts = [(subtype, body) for subtype, body in (("plain", req.text), ("html", req.html)) if body is not None]
    if len(parts) == 1:
        subtype, body = parts[0]
        encoding, payload = _body_part(body)
        lines += [f'Content-Type: text/{subtype}; charset="utf-8"', f"Content-Transfer-Encoding: {encoding}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + payload + (
            b"" if payload.endswith(b"\r\n") else b"\r\n")
    boundary = f"=_mailpipe_{job_id}"
    lines.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
    out = [("\r\n".join(lines) + "\r\n\r\n").encode("ascii")]
    for subtype, body in parts:
        encoding, payload = _body_part(body)
        out.append(f'--{boundary}\r\nContent-Type: text/{subtype}; charset="utf-8"\r\n'
                   f"Content-Transfer-Encoding: {encoding}\r\n\r\n".encode("ascii"))
        out.append(payload + (b"" if payload.endswith(b"\r\n") else b"\r\n"))
    out.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


def _fold_addresses(value: str) -> str:
    """An address list folded after commas, so no header line runs past 78 characters."""
    folded, line = [], ""
    for address in value.split(", "):
        if line and len(line) + len(address) + 2 > 70:
            folded.append(line + ",")
            line = " " + address
        else:
            line = f"{line}, {address}" if line else address
    return "\r\n".join([*folded, line])


def render_mime(req: IntakeRequest, job_id: str) -> bytes:
    """The general case (attachments, non-ASCII or long headers): the standard library's."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = req.sender
    if req.to:
        msg["To"] = ", ".join(req.to)
    if req.cc:
        msg["Cc"] = ", ".join(req.cc)
    if req.subject is not None:
        msg["Subject"] = req.subject
    msg["Date"] = formatdate(req.created_ms / 1000, localtime=False, usegmt=True)
    domain = req.sender.rpartition("@")[2]
    msg["Message-ID"] = f"<{job_id}@{domain}>"
    for name, value in req.headers.items():
        msg[name] = value
    if req.text is not None:
        msg.set_content(req.text)
        if req.html is not None:
            msg.add_alternative(req.html, subtype="html")
    elif req.html is not None:
        msg.set_content(req.html, subtype="html")
    for attachment in req.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        msg.add_attachment(attachment.data, maintype=maintype, subtype=subtype,
                           filename=attachment.filename)
    try:
        return msg.as_bytes()
    except (ValueError, TypeError, UnicodeError) as exc:
        raise InvalidMessage(f"message: cannot be rendered: {exc}") from None


SIGNED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"mime-version",
                  b"content-type", b"reply-to", b"list-unsubscribe")


def dkim_sign(message: bytes, sender: str, key: DkimKey | None) -> bytes:
    """Prepend a DKIM-Signature when the tenant has a key for the sender's domain.

    Signing with a domain the From address does not belong to would not align (DMARC), so a
    mail from another domain goes unsigned rather than signed wrongly.
    """
    if key is None:
        return message
    domain = sender.rpartition("@")[2].lower()
    if domain != key.domain and not domain.endswith("." + key.domain):
        return message
    try:
        signature = dkim.sign(message, key.selector.encode(), key.domain.encode(), key.private_key,
                              include_headers=list(SIGNED_HEADERS), linesep=b"\r\n")
    except dkim.DKIMException as exc:
        raise ConfigError(f"DKIM key for {key.domain}: cannot sign: {exc}") from None
    return bytes(signature) + message
