"""SMTP reply classification (mailpipe/replies.py and its rules file): outcome by code, category,
bounce class and signal by code, enhanced status, phase and text; every rule's sample."""

from __future__ import annotations

import pytest

from mailpipe import replies
from mailpipe.errors import ConfigError
from mailpipe.replies import classify, connection_failure, enhanced_code, parse_rules, rules, split_sample


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
     "blocklisted"),  # was spam_rejected before blocklisted existed
    (550, "5.1.1 <nobody@example.com>: Recipient address rejected: User unknown", "bad_recipient"),
    (550, "No such user here", "bad_recipient"),
    (553, "5.1.3 Error: malformed address", "bad_recipient"),
    (552, "5.3.4 Message size exceeds fixed limit", "too_large"),
    (552, "Message too large", "too_large"),
    (554, "5.3.4 Message too big for system", "too_large"),
    (552, "5.2.2 Mailbox full", "mailbox_full"),  # was other before mailbox_full existed
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


def test_the_sender_shim_is_the_kernel_classifier() -> None:
    from sender import replies as shim

    assert shim.classify is classify and shim.Reply is replies.Reply


@pytest.mark.parametrize("rule", rules().rules, ids=lambda r: r.name)
def test_every_rule_matches_its_own_sample_first(rule: replies.Rule) -> None:
    code, text = split_sample(rule.sample)
    reply = classify(code, text, rule.sample_phase)
    assert reply.rule == rule.name, f"{rule.sample!r} matched {reply.rule!r} first"
    assert (reply.category, reply.bounce, reply.signal) == (rule.category, rule.bounce, rule.signal)


@pytest.mark.parametrize(("code", "text", "phase", "bounce", "signal"), [
    # Recipient-caused (5.1.x, 5.2.1): hard; the sender's own address (5.1.7, 5.1.8) is not.
    (550, "5.1.1 The email account that you tried to reach does not exist.", "rcpt", "hard", "recipient"),
    (550, "5.2.1 The email account that you tried to reach is disabled.", "rcpt", "hard", "recipient"),
    (554, "5.1.8 Email Outgoing Blocked.", "mail", "reputation", "server_broken"),
    (550, "5.1.0 <x@acme.example>: Sender address rejected: User unknown in local recipient table", "mail",
     "reputation", "server_broken"),
    # Soft: 4.x and mailbox full.
    (452, "4.2.2 The email account that you tried to reach is over quota.", "rcpt", "soft", "recipient"),
    (451, "4.3.0 Temporary System Problem. Try again later.", "eod", "soft", "none"),
    # Sender- or reputation-caused: never the recipient's.
    (550, "5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org", "rcpt",
     "reputation", "server_broken"),
    (554, "5.7.9 Message not accepted for policy reasons.", "eod", "reputation", "none"),
    (535, "5.7.8 Authentication credentials invalid", "auth", "reputation", "server_broken"),
    # Issue 22's signals.
    (421, "4.7.0 mx.example.com Error: too many connections from 192.0.2.1", "greeting", "none", "connections"),
    (421, "4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume", "mail",
     "reputation", "rate"),
    (451, "4.7.1 Rate limited, try later", "mail", "reputation", "rate"),
    (452, "4.5.3 Too many recipients", "rcpt", "none", "rate"),
    (450, "4.7.1 <a@b.example>: Recipient address rejected: Greylisted for 300 seconds", "rcpt", "soft", "none"),
])
def test_bounce_class_and_signal(code: int, text: str, phase: str, bounce: str, signal: str) -> None:
    reply = classify(code, text, phase)
    assert (reply.bounce, reply.signal) == (bounce, signal), reply.rule


def test_a_dsn_status_overrides_the_text() -> None:
    reply = classify(550, "host mx.example.net said: mailbox unavailable", enhanced="5.1.1")
    assert reply.enhanced == "5.1.1" and reply.bounce == "hard"


def test_an_unknown_permanent_failure_is_never_hard() -> None:
    for text in ("5.0.0 Service unavailable", "Requested action not taken", "5.3.0 Other mail system problem"):
        assert classify(554, text).bounce == "soft", text


def test_phase_rules_match_only_in_their_phase() -> None:
    assert classify(421, "4.7.0 Service not available", "greeting").signal == "connections"
    assert classify(421, "4.7.0 Service not available", "rcpt").signal == "rate"
    assert classify(421, "4.7.0 Service not available").signal == "rate"


def test_a_shadow_rule_is_logged_not_applied(caplog: pytest.LogCaptureFixture) -> None:
    loaded = parse_rules({"version": 1, "rule": [
        {"name": "new-pattern", "text": "frobnicated", "category": "rate", "bounce": "none", "signal": "rate",
         "shadow": True, "sample": "451 4.7.1 frobnicated"},
        {"name": "any", "codes": ["4xx"], "category": "other", "bounce": "soft", "signal": "none",
         "sample": "451 x"}]}, "test")
    with caplog.at_level("INFO", logger="mailpipe.replies"):
        rule = loaded.first(451, "4.7.1 frobnicated", "4.7.1", None)
    assert rule is not None and rule.name == "any"
    assert "shadow rule new-pattern" in caplog.text


@pytest.mark.parametrize(("change", "message"), [
    ({"category": "nope"}, "category"),
    ({"bounce": "medium"}, "bounce"),
    ({"signal": "loud"}, "signal"),
    ({"text": "("}, "text"),
    ({"codes": [99]}, "codes"),
    ({"status": ["5.x"]}, "status"),
    ({"phases": ["helo"]}, "phases"),
    ({"sample": "no code"}, "sample"),
    ({"colour": "red"}, "unknown field"),
])
def test_a_bad_rule_is_named(change: dict[str, object], message: str) -> None:
    rule = {"name": "r", "category": "other", "bounce": "none", "signal": "none", "sample": "550 x", **change}
    with pytest.raises(ConfigError, match=message):
        parse_rules({"version": 1, "rule": [rule]}, "test")


def test_the_rules_file_has_a_version_and_unique_names() -> None:
    loaded = rules()
    assert loaded.version >= 1 and len(loaded.rules) >= 40
    assert len({r.name for r in loaded.rules}) == len(loaded.rules)
