"""mailpipe/stage.py RedisOutage: one warning per outage, a backoff between tries, and an outage
that ends only with a try in which nothing failed."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from mailpipe.errors import RedisUnavailable
from mailpipe.stage import REDIS_BACKOFF_MAX_S, REDIS_BACKOFF_MIN_S, RedisOutage

STAGE = "unit-outage"


def gauge() -> float | None:
    return REGISTRY.get_sample_value("mailpipe_failing_closed", {"stage": STAGE})


def reconnects() -> float:
    return REGISTRY.get_sample_value("mailpipe_reconnects_total", {"stage": STAGE, "service": "redis"}) or 0.0


def test_an_outage_warns_once_backs_off_and_ends_with_a_clean_try(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailpipe.stage")
    outage = RedisOutage(STAGE)
    assert outage.ask() and not outage.down and gauge() == 0
    before = reconnects()

    outage.failed(RedisUnavailable("Redis: refused"), "requests held")
    assert outage.down and not outage.ask() and gauge() == 1
    assert not outage.retry(), "asked again before its backoff"
    waits = []
    for _ in range(6):  # every try fails: the backoff doubles up to its cap, no new warning
        outage.retry_at = 0.0
        assert outage.retry() and outage.ask()
        outage.failed(RedisUnavailable("Redis: still refused"), "requests held")
        waits.append(outage.backoff_s)
        assert not outage.ask()
    assert waits[0] == 4 * REDIS_BACKOFF_MIN_S and waits[-1] == REDIS_BACKOFF_MAX_S
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "waiting for Redis" in warnings[0].getMessage()
    assert "Redis: refused" in warnings[0].getMessage()

    outage.tried("nothing")  # no try under way: the outage goes on
    assert outage.down and gauge() == 1 and reconnects() == before

    outage.retry_at = 0.0
    assert outage.retry()
    outage.tried("3 held")
    assert not outage.down and outage.ask() and gauge() == 0 and reconnects() == before + 1
    assert outage.backoff_s == REDIS_BACKOFF_MIN_S
    ends = [r.getMessage() for r in caplog.records if "answers again" in r.getMessage()]
    assert len(ends) == 1 and "3 held" in ends[0]

    outage.failed(RedisUnavailable("Redis: gone again"), "requests held")  # a new outage: a new warning
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
