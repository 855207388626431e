"""SMTP reply classification: outcome by code, category by code, enhanced status and text."""

from __future__ import annotations

import pytest

from sender import replies
from sender.replies import classify, connection_failure, enhanced_code


@pytest.mark.parametrize(("code", "outcome"), [
    (250, "sent"), (251, "sent"), (421, "deferred"), (450, "deferred"), (451, "deferred"),
    (452, "deferred"), (550, "failed"), (552, "failed"), (553, "failed"), (554, "failed"),
    (354, "deferred"), (0, "deferred"),
])
def test_outcome_by_code(code: int, outcome: str) -> None:
    assert classify(code, "whatever").outcome == outcome


@pytest.mark.parametrize(("text", "expected"), [
    ("5.7.1 Unable to relay", "5.7.1"),
    ("sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)", "5.7.1"),
    ("4.7.1 <x@y>: Recipient address rejected: greylisted", "4.7.1"),
    ("2.0.0 Ok: queued as 4B2F", "2.0.0"),
    ("High probability of spam", None),
    ("no code at all", None),
])
def test_enhanced_code(text: str, expected: str | None) -> None:
    assert enhanced_code(text) == expected


@pytest.mark.parametrize(("code", "text", "category"), [
    # The three replies of seed 003, word for word.
    (553, "sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)", "relay_denied"),
    (550, "5.7.1 Unable to relay", "relay_denied"),
    (550, "High probability of spam", "spam_rejected"),
    (554, "5.7.1 <bob@example.com>: Relay access denied", "relay_denied"),
    (553, "5.7.1", "relay_denied"),
    (550, "5.7.1 Message rejected as spam by Content Filtering", "spam_rejected"),
    (554, "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
     "spam_rejected"),
    (550, "5.1.1 <nobody@example.com>: Recipient address rejected: User unknown", "bad_recipient"),
    (550, "No such user here", "bad_recipient"),
    (553, "5.1.3 Error: malformed address", "bad_recipient"),
    (552, "5.3.4 Message size exceeds fixed limit", "too_large"),
    (552, "Message too large", "too_large"),
    (554, "5.3.4 Message too big for system", "too_large"),
    (552, "5.2.2 Mailbox full", "other"),
    (535, "5.7.8 Authentication credentials invalid", "auth_failed"),
    (535, "Authentication failed", "auth_failed"),
    (530, "5.7.0 Authentication required", "auth_failed"),
    (451, "4.3.0 Temporary local problem", "other"),
    (421, "4.7.0 Try again later, closing connection", "other"),
    (250, "OK", ""),
])
def test_category(code: int, text: str, category: str) -> None:
    assert classify(code, text).category == category


def test_multi_line_reply_is_one_line() -> None:
    reply = classify(550, "5.7.1 Unable to relay\nsee https://example.com/relay")
    assert reply.text == "5.7.1 Unable to relay see https://example.com/relay"
    assert reply.enhanced == "5.7.1"
    assert str(reply) == "550 5.7.1 Unable to relay see https://example.com/relay"


@pytest.mark.parametrize("category", ["relay_denied", "spam_rejected"])
def test_relay_and_spam_advice_point_to_own_server_and_spf(category: str) -> None:
    reply = replies.Reply(code=550, text="x", enhanced=None, outcome="failed", category=category)
    assert "own" in reply.advice and "SMTP server" in reply.advice
    assert "SPF" in reply.advice


def test_every_category_but_other_has_advice() -> None:
    for category in replies.ReplyCategory:
        assert bool(replies.ADVICE[category]) == (category != "other"), category


def test_connection_failure_is_deferred() -> None:
    reply = connection_failure("Connection refused")
    assert reply.outcome == "deferred" and reply.transient
    assert reply.category == "connection" and reply.code == 0
    assert str(reply) == "Connection refused"
    tls = connection_failure("server does not offer STARTTLS", category="tls_failed")
    assert tls.category == "tls_failed" and tls.transient
