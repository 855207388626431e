"""DKIM signatures made at render time verify against the key's public half (dkimpy)."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import dkim
import pytest

from mailpipe.model import IntakeRequest
from mailpipe.servers import DkimKey
from producer.compose import dkim_sign, render


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[DkimKey, bytes]:
    directory: Path = tmp_path_factory.mktemp("dkim")
    private = directory / "key.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(private), "2048"], check=True, capture_output=True)
    public_der = subprocess.run(["openssl", "rsa", "-in", str(private), "-pubout", "-outform", "DER"],
                                check=True, capture_output=True).stdout
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public_der)
    return DkimKey(domain="acme.example", selector="mp1", private_key=private.read_bytes()), record


def message(sender: str = "hr@acme.example") -> tuple[IntakeRequest, bytes]:
    req = IntakeRequest(id="b" * 32, tenant="acme", sender=sender, created_ms=1_700_000_000_000,
                        to=("ann@example.com",), subject="Interview", text="See you on Monday.\n",
                        html="<p>See you on <b>Monday</b>.</p>")
    return req, render(req, req.id)


def test_signature_verifies_with_the_public_key(key: tuple[DkimKey, bytes]) -> None:
    dkim_key, record = key
    req, raw = message()
    signed = dkim_sign(raw, req.sender, dkim_key)
    assert signed.startswith(b"DKIM-Signature: ")
    dns = {b"mp1._domainkey.acme.example.": record}
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: dns.get(name))


def test_a_changed_body_no_longer_verifies(key: tuple[DkimKey, bytes]) -> None:
    dkim_key, record = key
    req, raw = message()
    tampered = dkim_sign(raw, req.sender, dkim_key).replace(b"Monday", b"Friday")
    assert not dkim.verify(tampered, dnsfunc=lambda name, timeout=5: record)


def test_subdomain_senders_are_signed_other_domains_are_not(key: tuple[DkimKey, bytes]) -> None:
    dkim_key, _ = key
    req, raw = message("jobs@mail.acme.example")
    assert dkim_sign(raw, req.sender, dkim_key).startswith(b"DKIM-Signature: ")
    req, raw = message("hr@other.example")
    assert dkim_sign(raw, req.sender, dkim_key) == raw


def test_a_bulk_mails_unsubscribe_headers_are_under_the_signature(key: tuple[DkimKey, bytes]) -> None:
    from mailpipe.verp import Keys, Signer, Token
    from producer.unsubscribe import has_list_unsubscribe, headers

    dkim_key, record = key
    signer = Signer(Keys.parse("1:a key for the unsubscribe test", "test"))
    req, raw = message()
    lines = headers(signer, "acme", req.id, "ann@example.com", url="https://mail.example.net/unsubscribe",
                    mailto_domain="bounces.example.net")
    assert lines.startswith(b"List-Unsubscribe: <https://mail.example.net/unsubscribe/")
    assert b"<mailto:u" in lines and b"@bounces.example.net?subject=unsubscribe>" in lines
    assert b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in lines
    assert b"ann@example.com" not in lines
    signed = dkim_sign(lines + raw, req.sender, dkim_key)
    h = signed.split(b"h=", 1)[1].split(b";", 1)[0].replace(b"\r\n", b"").replace(b" ", b"").lower()
    assert b"list-unsubscribe:list-unsubscribe-post" in h
    dns = {b"mp1._domainkey.acme.example.": record}
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: dns.get(name))
    tampered = signed.replace(b"List-Unsubscribe=One-Click", b"List-Unsubscribe=Two-Clicks")
    assert not dkim.verify(tampered, dnsfunc=lambda name, timeout=5: dns.get(name))
    link = lines.split(b"/unsubscribe/", 1)[1].split(b">", 1)[0].decode()
    token = signer.verify_link(link)
    assert isinstance(token, Token) and token.recipient == "ann@example.com" and token.job_id == req.id
    assert has_list_unsubscribe(lines + raw) and not has_list_unsubscribe(raw)
    assert headers(signer, "acme", req.id, "a@b.example", url="", mailto_domain="bounces.example.net").count(
        b"List-Unsubscribe-Post") == 0, "one-click needs the HTTPS endpoint"
