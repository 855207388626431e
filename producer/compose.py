"""Validate an intake request and render its RFC 5322 message, once.

Everything here is pure and raises ``InvalidMessage`` with a reason that names the field, so
the client library can refuse bad input before it is published and the enqueue stage can
dead-letter what an upstream in another language sent anyway.
"""

from __future__ import annotations

import binascii
import email.errors
import functools
import re
import unicodedata
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate

import dkim
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES

from mailpipe.errors import ConfigError, InvalidMessage
from mailpipe.model import PRIORITIES, IntakeRequest
from mailpipe.servers import DkimKey

# Used with fullmatch: "$" would also match before a trailing newline ("X-Bad\n").
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")  # printable ASCII, no colon, no space

# What no text that reaches a header (subject, header values, filenames, the tenant, ...) may
# hold: every control character (Unicode Cc: C0 with TAB, DEL, C1 with U+0085 NEXT LINE), the
# line and paragraph separators (Zl U+2028, Zp U+2029) and lone surrogates (Cs, which a Python
# caller can pass and UTF-8 cannot encode). That covers every Unicode line break (LF, VT, FF,
# CR, U+001C..U+001E, NEL, LS, PS). TAB is refused too: folding whitespace would allow it in
# unstructured values, but mailpipe folds headers itself and a TAB there is always a mistake.
# Format characters (Cf: zero-width joiner in emoji, bidi marks in Arabic or Hebrew subjects)
# and other spaces are allowed in values: they break no line. Addresses are stricter (below).
# The classes are fixed by Unicode (Cc, Zl, Zp and Cs never change), so the pattern is written
# out, not derived from unicodedata at import; a unit test checks it against unicodedata.
_FORBIDDEN_IN_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_CLASSIC = frozenset("\r\n\0")
_NAMES = {"\0": "NULL", "\t": "CHARACTER TABULATION", "\n": "LINE FEED", "\x0b": "LINE TABULATION",
          "\x0c": "FORM FEED", "\r": "CARRIAGE RETURN", "\x1c": "INFORMATION SEPARATOR FOUR",
          "\x1d": "INFORMATION SEPARATOR THREE", "\x1e": "INFORMATION SEPARATOR TWO",
          "\x1f": "INFORMATION SEPARATOR ONE", "\x7f": "DELETE", "\x85": "NEXT LINE"}
# Headers the renderer owns: a caller setting them would break the envelope or the MIME tree.
RESERVED_HEADERS = frozenset({
    "from", "to", "cc", "bcc", "subject", "date", "message-id", "mime-version",
    "content-type", "content-transfer-encoding", "content-disposition", "return-path",
    "received", "dkim-signature",
})


def describe_char(char: str) -> str:
    """``U+2028 (LINE SEPARATOR)``: a character named for a reason, whatever it is."""
    name = _NAMES.get(char) or unicodedata.name(char, "") or {
        "Cc": "control character", "Cs": "surrogate", "Cf": "format character", "Co": "private use",
        "Cn": "unassigned"}.get(unicodedata.category(char), unicodedata.category(char))
    return f"U+{ord(char):04X} ({name})"


def _refusal(field: str, char: str, shown: str = "") -> InvalidMessage:
    what = "CR, LF or NUL: " if char in _CLASSIC else ""  # the reason upstreams have always seen
    kind = "" if char in _CLASSIC else (", a control character or line break" if
                                        _FORBIDDEN_IN_TEXT.match(char) else ", not allowed in an address")
    return InvalidMessage(f"{field}: {shown}contains {what}{describe_char(char)}{kind}")


def check_text(value: str | None, field: str) -> None:
    """Refuse a control character or line break (``_FORBIDDEN_IN_TEXT``), naming field and character."""
    if value is not None:
        found = _FORBIDDEN_IN_TEXT.search(value)
        if found is not None:
            raise _refusal(field, found.group())


def check_address(address: str, field: str) -> str:
    """The address in ASCII form (IDNA domain), or ``InvalidMessage`` naming the field and what
    is wrong. email-validator does the RFC work; no DNS lookup on the intake's hot path, and no
    internationalized local parts (not every server speaks SMTPUTF8).

    Before it, every character must be printable (``str.isprintable``, in C): no control or
    format character, no line or paragraph separator, no space but the ASCII one (which is
    trimmed around the address). Python's ``strip`` would otherwise trim U+0085 or U+2028 off
    the checked copy, and the raw address, which goes into the To and Cc headers, keep it."""
    if not address.isprintable():
        bad = next(c for c in address if not c.isprintable())
        raise _refusal(field, bad, f"{address!r} ")
    checked, problem = _checked(address.strip())
    if problem:
        raise InvalidMessage(f"{field}: {address!r} is not a valid address: {problem}")
    return checked


def _checked(address: str) -> tuple[str, str]:
    """(ASCII form, "") or ("", why not)."""
    plain = plain_address(address)
    if plain is not None:
        return plain, ""
    return _checked_fully(address)


# A plain ASCII address, the common case: a dot-atom local part, a domain of two or more
# letter-digit-hyphen labels whose last is letters only. For such an address email-validator's
# answer is known without running it (26 us per new address, twice per mail: the client and
# the enqueue stage): valid, the local part as given (lower-cased for the RFC 2142 role names),
# the domain lower-cased. What the pattern lets through that email-validator would still refuse
# or change goes to it: a special-use domain (test, local...), a "--" in the domain (Punycode,
# R-LDH labels), over 254 characters. tests/unit/test_address_fast_path.py holds this to
# email-validator's answer on random and adversarial input.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PLAIN_ADDRESS = re.compile(rf"({_ATEXT}+(?:\.{_ATEXT}+)*)@((?:{_LABEL}\.)+[A-Za-z]{{2,63}})")
_SPECIAL_USE = tuple(f".{name}" for name in SPECIAL_USE_DOMAIN_NAMES)
_ROLE_NAMES = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)
MAX_ADDRESS_CHARS = 254


def plain_address(address: str) -> str | None:
    """The ASCII form email-validator gives ``address`` when it is a plain ASCII address (see
    above), without running it; None for anything else (the full check decides)."""
    if len(address) > MAX_ADDRESS_CHARS:
        return None
    found = _PLAIN_ADDRESS.fullmatch(address)
    if found is None:
        return None
    local, domain = found.group(1), found.group(2).lower()
    if "--" in domain or f".{domain}".endswith(_SPECIAL_USE):
        return None
    if local.lower() in _ROLE_NAMES:
        local = local.lower()
    return f"{local}@{domain}"


@functools.lru_cache(maxsize=65536)
def _checked_fully(address: str) -> tuple[str, str]:
    """email-validator's answer. Cached: a tenant's senders and regular recipients that are not
    plain come back all day, and the check is costly (py-spy: a third of the intake's time)."""
    try:
        return str(validate_email(address, check_deliverability=False, allow_smtputf8=False).ascii_email), ""
    except EmailNotValidError as exc:
        return "", str(exc)


def check_header(name: str, value: str) -> None:
    if not _HEADER_NAME.fullmatch(name):
        bad = next((c for c in name if not ("!" <= c <= "~") or c == ":"), None)
        why = f"contains {describe_char(bad)}" if bad is not None else "empty or longer than 76 characters"
        raise InvalidMessage(f"headers[{name!r}]: not a valid header name ({why}; printable ASCII "
                             "without colon or space only)")
    if name.lower() in RESERVED_HEADERS:
        raise InvalidMessage(f"headers[{name!r}]: set by mailpipe; use the matching argument instead")
    check_text(value, f"headers[{name!r}] value")


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


# The id is the left part of the Message-ID and part of the MIME boundary: RFC 5322 atext and
# dots, which a UUID's hex (new_id, job_id_for) always is.
_ID = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")
# created_ms becomes the Date header: at most 9999-12-31 (formatdate cannot go further).
MAX_CREATED_MS = 253_402_300_799_999


def validate(req: IntakeRequest, max_message_bytes: int, max_recipients: int) -> tuple[str, ...]:
    """Check a request; return its envelope recipients."""
    if not req.tenant:
        raise InvalidMessage("tenant: empty")
    check_text(req.tenant, "tenant")
    if not _ID.fullmatch(req.id):
        raise InvalidMessage(f"id: {req.id!r} is not 1 to 64 letters, digits or !#$%&'*+/=?^_`{{|}}~.- "
                             "(it becomes the Message-ID)")
    check_text(req.server, "server")
    check_text(req.idempotency_key, "idempotency_key")
    if req.created_ms > MAX_CREATED_MS:
        raise InvalidMessage("created_ms: after the year 9999")
    if req.priority not in PRIORITIES:
        raise InvalidMessage(f"priority: {req.priority!r} is not one of {', '.join(PRIORITIES)}")
    if req.send_at_ms is not None and req.send_at_ms > req.created_ms + MAX_SCHEDULE_MS:
        raise InvalidMessage("send_at: more than 30 days ahead")
    check_address(req.sender, "sender")
    recipients = envelope_recipients(req, max_recipients)
    if req.bulk and len(recipients) != 1:
        raise InvalidMessage(f"bulk: a bulk mail has exactly one recipient, whose own unsubscribe link it carries; "
                             f"got {len(recipients)}: publish one mail per recipient")
    if req.is_raw:
        assert req.message is not None
        if not req.message:
            raise InvalidMessage("message: empty")
        if len(req.message) > max_message_bytes:
            raise InvalidMessage(f"message: {len(req.message)} bytes, "
                                 f"over the {max_message_bytes}-byte limit")
        return recipients
    check_text(req.subject, "subject")
    for name, value in req.headers.items():
        check_header(name, value)
    if req.text is None and req.html is None:
        raise InvalidMessage("text, html: give at least one body part")
    size = sum(len(a.data) for a in req.attachments) + len(req.text or "") + len(req.html or "")
    if size > max_message_bytes:
        raise InvalidMessage(f"message: {size} bytes of content, over the {max_message_bytes}-byte limit")
    for i, attachment in enumerate(req.attachments):
        check_text(attachment.filename, f"attachments[{i}].filename")
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
    try:
        plain = render_plain(req, job_id)
    except _RENDER_ERRORS as exc:  # a lone surrogate that a Python caller put in text or html
        raise InvalidMessage(f"message: cannot be rendered: {type(exc).__name__}: {exc}") from None
    return plain or render_mime(req, job_id)


@functools.lru_cache(maxsize=256)
def _date_of_second(second: int) -> str:
    return formatdate(second, localtime=False, usegmt=True)


def date_header(created_ms: int) -> str:
    """The Date header of a mail created at ``created_ms``: formatted once per second (a burst
    of mails shares its seconds; formatdate cost 12 µs a mail, issue 24's profile)."""
    return _date_of_second(created_ms // 1000)


def _headers(req: IntakeRequest, job_id: str) -> list[tuple[str, str]]:
    headers = [("From", req.sender)]
    if req.to:
        headers.append(("To", ", ".join(req.to)))
    if req.cc:
        headers.append(("Cc", ", ".join(req.cc)))
    if req.subject is not None:
        headers.append(("Subject", req.subject))
    headers.append(("Date", date_header(req.created_ms)))
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


# What the standard library's email package raises on input it cannot render (a header it
# parses strictly, such as a second Sender, a text it cannot encode).
_RENDER_ERRORS = (ValueError, TypeError, UnicodeError, LookupError, email.errors.MessageError)


def render_mime(req: IntakeRequest, job_id: str) -> bytes:
    """The general case (attachments, non-ASCII or long headers): the standard library's."""
    try:
        return _render_mime(req, job_id)
    except _RENDER_ERRORS as exc:
        raise InvalidMessage(f"message: cannot be rendered: {type(exc).__name__}: {exc}") from None


def _render_mime(req: IntakeRequest, job_id: str) -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = req.sender
    if req.to:
        msg["To"] = ", ".join(req.to)
    if req.cc:
        msg["Cc"] = ", ".join(req.cc)
    if req.subject is not None:
        msg["Subject"] = req.subject
    msg["Date"] = date_header(req.created_ms)
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
    return msg.as_bytes()


SIGNED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"mime-version",
                  b"content-type", b"reply-to", b"list-unsubscribe", b"list-unsubscribe-post")


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
