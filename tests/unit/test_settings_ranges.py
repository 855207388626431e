"""Settings that validate but cannot work (issue 21, item 4) are refused at start, naming the
variable and the range that works."""

from __future__ import annotations

import dataclasses

import pytest

from mailpipe.errors import ConfigError
from mailpipe.settings import Settings

VARIABLES = {f"MAILPIPE_{f.name.upper()}" for f in dataclasses.fields(Settings)}

# (variable, value, the whole reason): each of these started a stage that then misbehaved.
_REFUSED = [
    # A prefetch of 0 is RabbitMQ's "unlimited": memory grows with the queue.
    ("MAILPIPE_SEND_PREFETCH", "0", "MAILPIPE_SEND_PREFETCH must be > 0, got 0"),
    ("MAILPIPE_LIMITER_PREFETCH", "0", "MAILPIPE_LIMITER_PREFETCH must be > 0, got 0"),
    # EXPIRE key 0 deletes every claim; SET ... EX 0 is a Redis error after the confirm.
    ("MAILPIPE_SENT_MARK_TTL_S", "0", "MAILPIPE_SENT_MARK_TTL_S must be > MAILPIPE_WINDOW_S + "
     "MAILPIPE_SMTP_TIMEOUT_S (90, a claim's longest lease), got 0"),
    ("MAILPIPE_IDEMPOTENCY_TTL_S", "0", "MAILPIPE_IDEMPOTENCY_TTL_S must be > 0, got 0"),
    # Park queues with a TTL of 0 hand their batches straight back.
    ("MAILPIPE_LANE_IDLE_S", "0", "MAILPIPE_LANE_IDLE_S must be > 0, got 0.0"),
    ("MAILPIPE_MINUTE_WINDOW_S", "0.5", "MAILPIPE_MINUTE_WINDOW_S must be above MAILPIPE_SEND_MARGIN_S (1): a server "
     "with a per-minute ceiling gets that window (at most MAILPIPE_WINDOW_S), got 0.5"),
    ("MAILPIPE_LIMITER_HOLD_S", "0", "MAILPIPE_LIMITER_HOLD_S must be > 0, got 0.0"),
    ("MAILPIPE_IDEMPOTENCY_LEASE_S", "0", "MAILPIPE_IDEMPOTENCY_LEASE_S must be > 0, got 0.0"),
    ("MAILPIPE_SUPPRESS_DAYS", "0", "MAILPIPE_SUPPRESS_DAYS must be > 0, got 0"),
    ("MAILPIPE_RECONNECT_MAX_S", "0", "MAILPIPE_RECONNECT_MAX_S must be > 0, got 0.0"),
    ("MAILPIPE_LOG_LEVEL", "verbose", "MAILPIPE_LOG_LEVEL='verbose': expected one of DEBUG, INFO, WARNING, "
     "ERROR, CRITICAL"),
]
# A setting the limiter's rewrite removes (its park queues, its fair lease) leaves with its case.
REFUSED = [case for case in _REFUSED if case[0] in VARIABLES]


@pytest.mark.parametrize(("name", "value", "reason"), REFUSED)
def test_a_value_that_cannot_work_is_refused_with_its_range(name: str, value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert info.value.reason == reason


@pytest.mark.parametrize(("window", "margin"), [("60", "60"), ("1", "2"), ("5", "5.0")])
def test_a_margin_that_leaves_no_window_is_refused(window: str, margin: str) -> None:
    """Every batch would be late: its mail loops through refund and re-grant forever."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"MAILPIPE_WINDOW_S": window, "MAILPIPE_SEND_MARGIN_S": margin})
    assert info.value.reason == (f"MAILPIPE_SEND_MARGIN_S must be below MAILPIPE_WINDOW_S ({float(window):g}), "
                                 f"got {float(margin):g}")


def test_a_claim_ttl_shorter_than_its_lease_is_refused() -> None:
    """The claim hash must outlive the lease it holds (window + SMTP timeout), or a second
    holder sends what the first still has."""
    with pytest.raises(ConfigError, match=r"MAILPIPE_SENT_MARK_TTL_S must be > .*\(15, .*got 15"):
        Settings.from_env({"MAILPIPE_WINDOW_S": "10", "MAILPIPE_SMTP_TIMEOUT_S": "5",
                           "MAILPIPE_SENT_MARK_TTL_S": "15"})
    Settings.from_env({"MAILPIPE_WINDOW_S": "10", "MAILPIPE_SMTP_TIMEOUT_S": "5", "MAILPIPE_SENT_MARK_TTL_S": "16"})


def test_sentinels_need_the_primary_s_name() -> None:
    with pytest.raises(ConfigError, match="MAILPIPE_REDIS_MASTER must name the primary"):
        Settings.from_env({"MAILPIPE_REDIS_SENTINELS": "127.0.0.1:26379", "MAILPIPE_REDIS_MASTER": ""})


@pytest.mark.parametrize(("name", "value"), [
    ("MAILPIPE_SEND_PREFETCH", "1"), ("MAILPIPE_LIMITER_PREFETCH", "1"), ("MAILPIPE_LANE_IDLE_S", "1"),
    ("MAILPIPE_SEND_MARGIN_S", "0"), ("MAILPIPE_SEND_MARGIN_S", "4.9"), ("MAILPIPE_LOG_LEVEL", "debug"),
    ("MAILPIPE_LINGER_MS", "0"), ("MAILPIPE_SMTP_IDLE_TIMEOUT_S", "0"), ("MAILPIPE_RETRY_MAX_AGE_S", "0"),
])
def test_the_edges_that_work_are_accepted(name: str, value: str) -> None:
    Settings.from_env({name: value})
