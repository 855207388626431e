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
