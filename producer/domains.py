"""Verified sender domains: a tenant sends only from its own domains.

The envelope sender and every address of the ``From:`` header (and ``Sender:``, where there is
one) must be at one of the tenant's ``domains`` (``mailpipe/servers.py``: exact, or ``*.d`` for
the subdomains of ``d``). For a composed mail the From header is the sender (the renderer writes
it); for a raw mail the header section of the message is read here, strictly: one From header,
at most one Sender, every line a header field or its continuation, and the addresses parsed by
the standard library's parser with no defect it calls invalid. Whatever cannot be read that way
is refused, naming the field (``message.From``), never guessed at: a receiver that read the
header differently could show the mail as another tenant's.

A tenant's ``domain_policy`` says what a mismatch does: ``refuse`` (the default) raises
``InvalidMessage`` with a hint (the SPF include and the DKIM key the domain would need);
``warn`` returns a finding that travels with the job. A message that cannot be parsed is always
refused. A tenant without ``domains`` is not checked. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from email.errors import MessageDefect, ObsoleteHeaderDefect
from email.policy import default as _default_policy

from mailpipe.errors import InvalidMessage
from mailpipe.model import IntakeRequest
from mailpipe.servers import ServerConfig, TenantConfig, normalize_domain
from producer.compose import describe_char
from producer.lint import Finding, registered_domain

RULE = "sender_domain_unverified"
# A From header longer than this is refused unparsed: the standard library's address parser is
# quadratic on some inputs (16,000 quotes take seconds), and no real From is near this long.
MAX_ADDRESS_HEADER = 2000
_LINE_END = re.compile(rb"\r\n|\r|\n")  # as the parser and the sender (which makes them CRLF) see them
# In a raw header line (UTF-8): C0 and C1 controls but TAB (folding whitespace), DEL, U+2028
# and U+2029: line breaks to some mail software, never to others.
_FORBIDDEN_IN_HEADER = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")
_FIELD = re.compile(rb"([!-9;-~]+):")  # a header field's name and colon (RFC 5322 ftext)
ADDRESS_HEADERS = ("from", "sender")


def check_domains(req: IntakeRequest, tenant: TenantConfig, server: ServerConfig) -> list[Finding]:
    """Check the request's sender addresses against the tenant's domains.

    Raises ``InvalidMessage`` naming the field when one is not the tenant's and the policy is
    ``refuse``, or when a raw message's From cannot be read; returns the findings to travel with
    the job when the policy is ``warn``; returns [] for a tenant without ``domains``."""
    if tenant.domains is None:
        return []
    foreign: list[tuple[str, str, str]] = []  # (field, address, domain)
    for field, address in sender_addresses(req):
        domain = address_domain(address, field)
        if not tenant.allows_domain(domain):
            foreign.append((field, address, domain))
    if not foreign:
        return []
    reasons = [f"{field}: {address!r} is not at a verified domain of tenant {tenant.name!r} "
               f"({', '.join(tenant.domains) or 'none yet'})" for field, address, _domain in foreign]
    hint = _hint(tenant, server, sorted({d for _f, _a, d in foreign}))
    if tenant.domain_policy == "warn":
        return [Finding(RULE, f"{reason}; {hint}") for reason in reasons]
    raise InvalidMessage(f"{'; '.join(reasons)}; {hint}")


def sender_addresses(req: IntakeRequest) -> Iterator[tuple[str, str]]:
    """(field, address) for the envelope sender and every address of From and Sender."""
    yield "sender", req.sender
    if not req.is_raw:  # the renderer writes From: sender; a Sender header may come in headers
        for name, value in req.headers.items():
            if name.lower() == "sender":
                yield from ((f"headers[{name!r}]", a) for a in parse_addresses(value, f"headers[{name!r}]"))
        return
    assert req.message is not None
    headers = address_headers(req.message)
    if len(headers.get("from", [])) != 1:
        raise InvalidMessage(f"message.From: {len(headers.get('from', []))} From headers; "
                             "a message has exactly one")
    if len(headers.get("sender", [])) > 1:
        raise InvalidMessage(f"message.Sender: {len(headers['sender'])} Sender headers; at most one")
    for name in ADDRESS_HEADERS:
        for raw in headers.get(name, []):
            field = f"message.{name.capitalize()}"
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidMessage(f"{field}: not valid UTF-8") from None
            addresses = parse_addresses(value, field)
            if not addresses:
                raise InvalidMessage(f"{field}: names no address")
            yield from ((field, a) for a in addresses)


def address_headers(message: bytes) -> dict[str, list[bytes]]:
    """The unfolded values of the From and Sender headers of a raw message's header section,
    by lower-case name. The header section ends at the first empty line; each line before it
    must be a header field (``Name:``) or the continuation of one (starting with a space or a
    tab). A line that is neither is refused: mail software disagrees about what it means."""
    fields: list[tuple[str, list[bytes]]] = []  # (name, lines) of each From and Sender field
    current: list[bytes] | None = None  # the lines of the From/Sender field being read
    name = ""
    start, number = 0, 0
    while start < len(message):
        match = _LINE_END.search(message, start)
        end = match.start() if match else len(message)
        line = message[start:end]
        start = match.end() if match else len(message)
        number += 1
        if not line:
            break  # the end of the header section
        if line[:1] in (b" ", b"\t"):
            if number == 1:
                raise InvalidMessage("message: the first line is a continuation, not a header field")
        else:
            field = _FIELD.match(line)
            if field is None:
                raise InvalidMessage(f"message: line {number} of the header section is not a header field "
                                     f"(Name: value) nor a continuation: {line[:60]!r}")
            name = field.group(1).decode("ascii").lower()
            current = [] if name in ADDRESS_HEADERS else None
            if current is not None:
                fields.append((name, current))
            line = line[field.end():]
        forbidden = _FORBIDDEN_IN_HEADER.search(line)
        if forbidden is not None:
            char = forbidden.group().decode("utf-8", "replace")
            raise InvalidMessage(f"message.{name.title()}: contains {describe_char(char)}, "
                                 "a control character or line break")
        if current is not None:
            current.append(line)
    found: dict[str, list[bytes]] = {}
    for name, lines in fields:
        found.setdefault(name, []).append(b"".join(lines))  # unfolded: the line breaks go
    return found


def parse_addresses(value: str, field: str) -> list[str]:
    """The addr-specs of an address-list header value (display names, groups, comments and
    encoded words understood); ``InvalidMessage`` naming the field for anything the standard
    library's parser finds invalid, or that makes it fail."""
    if len(value) > MAX_ADDRESS_HEADER:
        raise InvalidMessage(f"{field}: {len(value)} characters, more than {MAX_ADDRESS_HEADER}")
    try:
        header = _default_policy.header_factory("From", value)
        defects: list[MessageDefect] = list(header.defects)
        addresses = [(a.username, a.domain, a.addr_spec) for a in header.addresses]
    except Exception as exc:  # HeaderParseError, RecursionError (nested comments), a parser bug: all refused
        raise InvalidMessage(f"{field}: cannot be parsed ({type(exc).__name__})") from None
    invalid = [d for d in defects if not isinstance(d, ObsoleteHeaderDefect)]
    if invalid:
        raise InvalidMessage(f"{field}: {value.strip()[:200]!r} is not a valid address list: {invalid[0]}")
    out = []
    for username, domain, addr_spec in addresses:
        if not username or not domain:
            raise InvalidMessage(f"{field}: {addr_spec!r} is not an address (local@domain)")
        out.append(addr_spec)
    return out


def address_domain(address: str, field: str) -> str:
    """The domain of an address, ASCII lowercase (IDNA), as the tenant's domains are stored."""
    domain = address.rpartition("@")[2]
    try:
        return normalize_domain(domain)
    except ValueError as exc:
        raise InvalidMessage(f"{field}: {address!r}: the domain is not valid: {exc}") from None


def _hint(tenant: TenantConfig, server: ServerConfig, domains: list[str]) -> str:
    """What the tenant can do: send from its own domain, or verify this one (SPF, DKIM)."""
    own = next((d for d in tenant.domains or () if not d.startswith("*.")), None)
    host = server.address.host
    spf = f"ip{6 if ':' in host else 4}:{host}" if _is_ip(host) else f"include:{registered_domain(host)}"
    dkim = (f"a DKIM key under {tenant.dkim.selector}._domainkey of it (the tenant's dkim_selector)"
            if tenant.dkim else "a DKIM key for it (dkim_domain, dkim_selector, dkim_key_file)")
    mine = f"publish from an address at {own}, or " if own else ""
    return (f"{mine}add {', '.join(domains)} to the tenant's domains after publishing SPF "
            f"({spf}, for server {server.name!r}) and {dkim}")


def _is_ip(host: str) -> bool:
    return ":" in host or host.replace(".", "").isdigit()
