"""Signed return paths and unsubscribe tokens (mailpipe/verp.py): their shape, and that forged,
altered, expired, retired-key and wrong-tenant tokens are refused with a reason."""

from __future__ import annotations

import logging
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailpipe.errors import ConfigError
from mailpipe.settings import Settings
from mailpipe.verp import LOCAL_PART_LENGTH, Invalid, Keys, Signer, Token, today, xtext

KEYS = Keys.parse("7:correct horse battery staple,3:an older secret of ours", "test")
SIGNER = Signer(KEYS)
JOB = "c592f15e833f558fb3eb7b4a530e21b5"
TENANTS = ("acme", "globex")


def valid(result: Token | Invalid) -> Token:
    assert isinstance(result, Token), result
    return result


def test_a_return_path_is_lowercase_short_and_hides_the_recipient() -> None:
    address = SIGNER.return_path("acme", JOB, "Ann.Smith@Example.com", "bounces.example.net")
    local, _, domain = address.partition("@")
    assert domain == "bounces.example.net"
    assert len(local) == LOCAL_PART_LENGTH <= 64
    assert re.fullmatch(r"b[a-z2-7]+", local)
    assert "ann" not in local and "example" not in local


def test_a_return_path_verifies_to_its_fields() -> None:
    local = SIGNER.local_part("b", "acme", JOB, "ann@example.com", shared=True)
    token = valid(SIGNER.verify(local, TENANTS))
    assert (token.kind, token.tenant, token.job_id, token.shared, token.key_id) == ("b", "acme", JOB, True, 7)
    assert SIGNER.names_recipient(token, "ANN@example.com")
    assert not SIGNER.names_recipient(token, "bob@example.com")
    assert valid(SIGNER.verify(local.upper(), TENANTS)).tenant == "acme", "case is not the token's"


def test_a_job_id_that_is_not_hex_travels_as_its_hash() -> None:
    token = valid(SIGNER.verify(SIGNER.local_part("b", "acme", "order-42/x", "ann@example.com"), TENANTS))
    assert token.job_id is None and token.names_job("order-42/x") and not token.names_job("order-43")


@pytest.mark.parametrize(("mangle", "reason"), [
    (lambda t: t[:-1] + ("a" if t[-1] != "a" else "b"), "bad signature"),
    (lambda t: t[:10] + ("a" if t[10] != "a" else "b") + t[11:], ""),
    (lambda t: "u" + t[1:], "bad signature"),
    (lambda t: t[:-2], "not a mailpipe token"),
    (lambda t: t[:-1] + "1", "not a mailpipe token"),
    (lambda t: "postmaster", "not a mailpipe token"),
])
def test_a_forged_token_is_refused(mangle: object, reason: str) -> None:
    local = SIGNER.local_part("b", "acme", JOB, "ann@example.com")
    result = SIGNER.verify(mangle(local), TENANTS)  # type: ignore[operator]
    assert isinstance(result, Invalid) and reason in result.reason


def test_another_tenant_or_key_cannot_claim_a_token() -> None:
    local = SIGNER.local_part("b", "acme", JOB, "ann@example.com")
    assert isinstance(SIGNER.verify(local, ("globex",)), Invalid)
    other = Signer(Keys.parse("7:a different secret with the same id", "test"))
    assert "bad signature" in str(other.verify(local, TENANTS))


def test_expired_and_future_tokens_are_refused() -> None:
    old = SIGNER.local_part("b", "acme", JOB, "ann@example.com", day=today() - 31)
    assert "expired" in str(SIGNER.verify(old, TENANTS))
    assert isinstance(SIGNER.verify(SIGNER.local_part("b", "acme", JOB, "a@b.example", day=today() - 30),
                                    TENANTS), Token)
    assert "future" in str(SIGNER.verify(SIGNER.local_part("b", "acme", JOB, "a@b.example", day=today() + 5),
                                         TENANTS))


def test_keys_rotate_the_first_signs_every_listed_one_verifies() -> None:
    old = Signer(Keys.parse("3:an older secret of ours", "test"))
    local = old.local_part("b", "acme", JOB, "ann@example.com")
    assert valid(SIGNER.verify(local, TENANTS)).key_id == 3
    retired = Signer(Keys.parse("7:correct horse battery staple", "test"))
    assert "not (or no longer) configured" in str(retired.verify(local, TENANTS))


def test_an_unsubscribe_link_holds_its_recipient_sealed() -> None:
    link = SIGNER.link_token("acme", JOB, "Ann@Example.com")
    assert "ann" not in link.lower() and "acme" not in link.lower()
    token = valid(SIGNER.verify_link(link))
    assert (token.tenant, token.job_id, token.recipient, token.kind) == ("acme", JOB, "ann@example.com", "u")
    tampered = link[:30] + ("A" if link[30] != "A" else "B") + link[31:]
    assert isinstance(SIGNER.verify_link(tampered), Invalid)
    assert "expired" in str(SIGNER.verify_link(SIGNER.link_token("acme", JOB, "a@b.example", day=today() - 61)))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_input_is_refused_or_valid_never_an_error(text: str) -> None:
    assert isinstance(SIGNER.verify(text, TENANTS), Invalid | Token)
    assert isinstance(SIGNER.verify_link(text), Invalid | Token)


@pytest.mark.parametrize(("text", "message"), [
    ("", "no key"), ("7", "entry 1"), ("300:0123456789abcdefghij", "entry 1"), ("1:short", "shorter than"),
    ("1:0123456789abcdef,1:0123456789abcdefg", "twice"),
])
def test_bad_keys_are_named_without_the_secret(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        Keys.parse(text, "MAILPIPE_VERP_KEYS")
    assert "0123456789abcdef" not in str(raised.value)


def test_the_secret_is_never_in_a_repr_or_log(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(verp_keys="1:a secret no one may read")
    assert "no one may read" not in repr(settings) and "no one may read" not in repr(KEYS)
    with caplog.at_level(logging.DEBUG):
        Signer.from_settings(settings)
    assert "no one may read" not in caplog.text


def test_xtext() -> None:
    assert xtext("ann+tag=1@example.com") == "ann+2Btag+3D1@example.com"
    assert xtext("a b") == "a+20b"
