"""Verified sender domains (issue 13): the envelope sender and every address of From (and
Sender) must be at the tenant's domains; raw messages are read strictly; refuse or warn."""

from __future__ import annotations

import time

import pytest

from mailpipe.errors import InvalidMessage
from mailpipe.model import IntakeRequest, now_ms
from mailpipe.servers import Address, DkimKey, ServerConfig, TenantConfig, normalize_domain
from producer.domains import RULE, address_headers, check_domains, parse_addresses

SERVER = ServerConfig(name="platform", address=Address("smtp.mailpipe.example", 587, False), tls="starttls",
                      platform=True)
IP_SERVER = ServerConfig(name="own", address=Address("192.0.2.1", 587, False), tls="starttls")
ACME = TenantConfig(name="acme", server="platform", domains=("acme.example", "*.mail.acme.example",
                                                             "xn--bcher-kva.example"))
ACME_WARN = TenantConfig(name="acme", server="platform", domains=("acme.example",), domain_policy="warn")
UNCHECKED = TenantConfig(name="legacy", server="platform")


def composed(sender: str = "hr@acme.example", **fields: object) -> IntakeRequest:
    return IntakeRequest(id="x1", tenant="acme", sender=sender, created_ms=now_ms(), to=("ann@example.com",),
                         subject="Hi", text="Hello", **fields)  # type: ignore[arg-type]


def raw(headers: bytes, sender: str = "hr@acme.example") -> IntakeRequest:
    return IntakeRequest(id="x1", tenant="acme", sender=sender, created_ms=now_ms(),
                         recipients=("ann@example.com",), message=headers + b"\r\n\r\nHello\r\n")


def refused(req: IntakeRequest, tenant: TenantConfig = ACME) -> str:
    with pytest.raises(InvalidMessage) as info:
        check_domains(req, tenant, SERVER)
    return info.value.reason


# -- composed mail: the sender is the From header ------------------------------------------------

@pytest.mark.parametrize("sender", ["hr@acme.example", "HR@ACME.Example", "news@x.mail.acme.example",
                                    "a@b.c.mail.acme.example", "ann@xn--bcher-kva.example",
                                    "ann@bücher.example"])
def test_composed_sender_at_a_tenant_domain_passes(sender: str) -> None:
    assert check_domains(composed(sender), ACME, SERVER) == []


@pytest.mark.parametrize("sender", ["billing@b.example", "hr@sub.acme.example", "hr@mail.acme.example",
                                    "hr@acme.example.evil.example", "hr@evilacme.example",
                                    "hr@xmail.acme.example"])
def test_composed_sender_elsewhere_is_refused_naming_the_field_with_a_hint(sender: str) -> None:
    reason = refused(composed(sender))
    assert reason.startswith(f"sender: {sender!r} is not at a verified domain of tenant 'acme'")
    assert "publish from an address at acme.example" in reason
    assert "include:mailpipe.example" in reason and "'platform'" in reason  # the server's SPF
    assert "DKIM" in reason


def test_spoofing_another_tenants_domain_is_refused() -> None:
    reason = refused(composed("billing@b.example"))
    assert "'billing@b.example'" in reason and "add b.example to the tenant's domains" in reason


def test_the_hint_names_the_dkim_selector_and_an_ip_servers_spf() -> None:
    tenant = TenantConfig(name="acme", server="own", domains=("acme.example",),
                          dkim=DkimKey("acme.example", "s2024", b"-----BEGIN PRIVATE KEY-----"))
    with pytest.raises(InvalidMessage) as info:
        check_domains(composed("x@b.example"), tenant, IP_SERVER)
    assert "ip4:192.0.2.1" in info.value.reason and "s2024._domainkey" in info.value.reason


def test_a_tenant_with_no_verified_domain_yet_refuses_everything() -> None:
    tenant = TenantConfig(name="new", server="platform", domains=())
    reason = refused(composed("hr@acme.example"), tenant)
    assert "(none yet)" in reason and "publish from" not in reason


def test_a_sender_header_of_a_composed_mail_is_checked() -> None:
    assert check_domains(composed(headers={"Sender": "Desk <desk@acme.example>"}), ACME, SERVER) == []
    reason = refused(composed(headers={"sender": "desk@b.example"}))
    assert reason.startswith("headers['sender']: 'desk@b.example'")


def test_warn_policy_queues_with_a_finding() -> None:
    findings = check_domains(composed("billing@b.example"), ACME_WARN, SERVER)
    assert [f.rule for f in findings] == [RULE]
    assert "sender: 'billing@b.example'" in findings[0].message and "SPF" in findings[0].message
    assert check_domains(composed("hr@acme.example"), ACME_WARN, SERVER) == []


def test_a_tenant_without_domains_is_not_checked() -> None:
    assert check_domains(composed("billing@b.example"), UNCHECKED, SERVER) == []
    assert check_domains(raw(b"From: billing@b.example"), UNCHECKED, SERVER) == []


# -- raw mail: the From header parsed from the message -------------------------------------------

@pytest.mark.parametrize("header", [
    b"From: hr@acme.example",
    b"From: HR Team <hr@acme.example>",
    b'From: "Smith, John" <john@acme.example>',
    b"From: John Q. Public <jqp@acme.example>",  # obsolete syntax, common: allowed
    b"From: =?utf-8?q?Ren=C3=A9e_Dupont?= <renee@acme.example>",  # encoded word in the name
    b"From: =?utf-8?q?billing=40b.example?= <hr@acme.example>",  # a name that looks like an address
    b"From: a@acme.example, b@x.mail.acme.example",  # several authors, all ours
    b"From: Team: a@acme.example, b@acme.example;",  # a group
    b"From: hr@acme.example (the HR desk)",  # a comment
    b"from: hr@acme.example",  # field names are case-insensitive
    b"From:\r\n  HR <hr@acme.example>",  # folded
    "From: Ann <ann@bücher.example>".encode(),  # IDN, UTF-8 (RFC 6532)
    b"From: ann@xn--bcher-kva.example",
    b"From: hr@acme.example\r\nSender: desk@acme.example",
])
def test_raw_from_at_the_tenants_domains_passes(header: bytes) -> None:
    assert check_domains(raw(b"Subject: x\r\n" + header + b"\r\nTo: ann@example.com"), ACME, SERVER) == []


@pytest.mark.parametrize(("header", "fragment"), [
    (b"From: billing@b.example", "message.From: 'billing@b.example' is not at a verified domain"),
    (b"From: HR <billing@b.example>", "message.From: 'billing@b.example'"),
    (b'From: "hr@acme.example" <billing@b.example>', "message.From: 'billing@b.example'"),  # the name lies
    (b"From: hr@acme.example, billing@b.example", "message.From: 'billing@b.example'"),  # one of several
    (b"From: Team: hr@acme.example, billing@b.example;", "message.From: 'billing@b.example'"),
    (b"From: hr@acme.example\r\nSender: billing@b.example", "message.Sender: 'billing@b.example'"),
    (b"From: hr@sub.acme.example", "message.From: 'hr@sub.acme.example'"),
    ("From: ann@bücher.example.evil".encode(), "message.From:"),
])
def test_raw_from_elsewhere_is_refused(header: bytes, fragment: str) -> None:
    assert fragment in refused(raw(header))


@pytest.mark.parametrize(("message", "fragment"), [
    (b"Subject: no from\r\n\r\nbody", "message.From: 0 From headers"),
    (b"From: hr@acme.example\r\nFrom: billing@b.example\r\n\r\nx", "message.From: 2 From headers"),
    (b"From: hr@acme.example\r\nFROM: hr@acme.example\r\n\r\nx", "message.From: 2 From headers"),
    (b"From: hr@acme.example\rFrom: billing@b.example\r\n\r\nx", "message.From: 2 From headers"),  # bare CR
    (b"From: hr@acme.example\nFrom: billing@b.example\r\n\r\nx", "message.From: 2 From headers"),  # bare LF
    (b"From: a@acme.example\r\nSender: a@acme.example\r\nSender: b@acme.example\r\n\r\nx",
     "message.Sender: 2 Sender headers"),
    (b"From : billing@b.example\r\nFrom: hr@acme.example\r\n\r\nx", "message: line 1 of the header section"),
    (b"From hr@acme.example Mon Jan 1\r\nFrom: hr@acme.example\r\n\r\nx", "message: line 1"),
    (b"Subject: x\r\nnot a header\r\nFrom: hr@acme.example\r\n\r\nx", "message: line 2"),
    (b" continued\r\nFrom: hr@acme.example\r\n\r\nx", "message: the first line is a continuation"),
    (b"\r\nFrom: hr@acme.example\r\n\r\nx", "message.From: 0 From headers"),  # the body starts at once
    (b"Subject: x\r\n\r\nFrom: hr@acme.example\r\n", "message.From: 0 From headers"),  # From in the body
    (b"From: undisclosed:;\r\n\r\nx", "message.From: names no address"),
    (b"From:\r\n\r\nx", "message.From:"),
    (b"From: <>\r\n\r\nx", "message.From:"),
    (b"From: hr\r\n\r\nx", "message.From: 'hr' is not a valid address list"),
    (b"From: =?utf-8?q?billing=40b.example?=\r\n\r\nx", "message.From:"),  # encoded word as address
    (b"From: billing@b.example <hr@acme.example>\r\n\r\nx", "is not a valid address list"),
    (b"From: hr@acme.example (x) <billing@b.example>\r\n\r\nx", "is not a valid address list"),
    (b"From: Ann <hr@acme.example\r\n\r\nx", "is not a valid address list"),
    (b"From: hr@acme.example@b.example\r\n\r\nx", "message.From:"),
    (b"From: hr@acme.example.\r\n\r\nx", "message.From:"),
    (b"From: hr@acme.example\x00\r\n\r\nx", "message.From:"),
    (b"From: hr@[192.0.2.1]\r\n\r\nx", "message.From: 'hr@[192.0.2.1]': the domain is not valid"),
    (b"From: \xff\xfe@acme.example\r\n\r\nx", "message.From: not valid UTF-8"),
    (b"From: " + b"(" * 3000 + b"\r\n\r\nx", "more than 2000"),
    (b"From: " + b"(" * 1500 + b"\r\n\r\nx", "message.From:"),  # RecursionError inside the parser
    (b"From: " + b'"' * 1999 + b"\r\n\r\nx", "message.From:"),
])
def test_malformed_raw_headers_are_refused_naming_the_field(message: bytes, fragment: str) -> None:
    req = IntakeRequest(id="x1", tenant="acme", sender="hr@acme.example", created_ms=now_ms(),
                        recipients=("ann@example.com",), message=message)
    for tenant in (ACME, ACME_WARN):  # a message that cannot be read is refused even under "warn"
        with pytest.raises(InvalidMessage) as info:
            check_domains(req, tenant, SERVER)
        assert fragment in info.value.reason


def test_raw_envelope_sender_is_checked_too() -> None:
    reason = refused(raw(b"From: hr@acme.example", sender="bounce@b.example"))
    assert reason.startswith("sender: 'bounce@b.example'")


def test_warn_policy_on_a_forged_raw_from() -> None:
    findings = check_domains(raw(b"From: billing@b.example"), ACME_WARN, SERVER)
    assert [f.rule for f in findings] == [RULE] and "message.From: 'billing@b.example'" in findings[0].message


def test_address_headers_unfold_and_stop_at_the_body() -> None:
    found = address_headers(b"Subject: a\r\nFrom: A\r\n <a@acme.example>\r\nX: y\r\n\tz\r\n\r\nFrom: b@b.example\r\n")
    assert found == {"from": [b" A <a@acme.example>"]}
    assert address_headers(b"From: a@acme.example") == {"from": [b" a@acme.example"]}  # no body at all


def test_parse_addresses_returns_addr_specs() -> None:
    assert parse_addresses("Ann <ann@acme.example>, bob@acme.example", "f") == ["ann@acme.example",
                                                                               "bob@acme.example"]


def test_hostile_headers_are_refused_quickly() -> None:
    worst = [b'"' * 1999, b"\\" * 1999, b'" ' * 999, b",\"" * 999, b"(a" * 999, b"<" * 1999]
    for value in worst:
        start = time.monotonic()
        with pytest.raises(InvalidMessage):
            check_domains(raw(b"From: " + value), ACME, SERVER)
        assert time.monotonic() - start < 2.0, value[:10]


def test_normalize_domain() -> None:
    assert normalize_domain("Bücher.Example.") == "xn--bcher-kva.example"
    assert normalize_domain(" ACME.example ") == "acme.example"
    for bad in ("", "acme", "a..b", "a b.example", "ann@acme.example", "[192.0.2.1]", "x\n.example"):
        with pytest.raises(ValueError):
            normalize_domain(bad)
