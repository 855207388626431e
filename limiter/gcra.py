"""The maths of a server's limits: GCRA for the rate, an exact sliding window for the per-minute
ceiling, local days for the daily caps. Pure functions, no I/O.

GCRA (the generic cell rate algorithm) keeps one number per limit, the theoretical arrival
time ``tat``: when the bucket would be empty again if nothing more were taken. With ``T`` the
time one mail costs (``3600 s / rate_per_hour``) and ``B`` the burst, asking for ``n`` mails
at ``now`` is allowed when

    max(tat, now) + n*T - B*T <= now

and then ``tat`` becomes ``max(tat, now) + n*T``. The bound this gives, for any replicas:
in every interval of length ``w``, at most ``w/T + B`` mails are granted.

The promise is kept at the SMTP server, not at the grant. A granted batch may start its mails
up to one delivery window ``W`` after its grant (the sender starts none later, judged in
Redis time), so the mails a server receives in ``[a, b]`` were granted in ``[a - W, b]``: at
most ``(b - a + W)/T + B_grant``. The limiter therefore grants with ``B_grant = B - ceil(W/T)``
and the server sees at most ``w/T + B`` in every window ``w``, however late a sender starts.

The per-minute ceiling ``P`` (a provider's "30 messages a minute") is a hard number at the
server: at most ``P`` mails in ANY 60 s. A GCRA cannot say that (it allows ``w/T + B``), so it
is an exact sliding window over the grants, and its span is 60 s plus the delivery window of
such a server (``MAILPIPE_MINUTE_WINDOW_S``, short): mails arriving in ``[a, a + 60]`` were
granted in ``[a - W_m, a + 60]``, a span of ``60 + W_m`` that holds at most ``P`` grants.

A refund hands back only what its grant still owes: the mails whose time (``tat`` after the
grant, counting back) has not come yet, and only while no later grant has moved ``tat``;
tokens the bucket has already refilled are never handed back twice.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo

from mailpipe.errors import ConfigError
from mailpipe.servers import ServerConfig
from mailpipe.settings import Settings

US = 1_000_000
HOUR_US = 3600 * US
MINUTE_US = 60 * US
MIDNIGHTS = 6  # local midnights passed per tenant: two days back to three ahead


class Limits(NamedTuple):
    """A server's limits in the units of the decision. ``interval_us`` = 0: unlimited rate.
    ``burst`` is what one grant may take: the server's burst less one window at the rate.
    ``per_minute`` (0: none) holds in every ``minute_span_us``; ``window_s`` is the delivery
    window its grants get (their deadline)."""

    interval_us: int
    burst: int
    per_minute: int = 0
    minute_span_us: int = 0
    window_s: float = 60.0

    @classmethod
    def for_server(cls, rate_per_hour: int, burst: int, per_minute: int | None = None,
                   unlimited: bool = False, reserve: int = 0, window_s: float = 60.0) -> Limits:
        """``burst`` is the server's (what it may receive at once above its rate); ``reserve``
        of it is kept out of every grant for the mails a window lets start late."""
        minute = (per_minute or 0, MINUTE_US + int(window_s * US) if per_minute else 0)
        if unlimited:
            return cls(0, burst, *minute, window_s)
        # Rounded up: a rate we cannot express exactly in microseconds errs on the slow side.
        interval = math.ceil(HOUR_US / rate_per_hour)
        grant_burst = burst - reserve
        if grant_burst < 1:
            raise ConfigError(
                f"a burst of {burst} mails leaves nothing to grant at {rate_per_hour} mails/hour: "
                f"{reserve} are kept back for the delivery window "
                "(raise MAILPIPE_BURST_MAILS or lower MAILPIPE_WINDOW_S)")
        return cls(interval, grant_burst, *minute, window_s)

    @classmethod
    def of(cls, server: ServerConfig, settings: Settings) -> Limits:
        """A configured server's limits under these settings. A server with a per-minute ceiling
        gets the short delivery window, so that the ceiling costs little of its rate."""
        window_s = min(settings.window_s, settings.minute_window_s) if server.per_minute else settings.window_s
        return cls.for_server(server.rate_per_hour, settings.burst(server.rate_per_hour), server.per_minute,
                              server.unlimited, settings.window_reserve(server.rate_per_hour, window_s), window_s)


# -- GCRA -------------------------------------------------------------------------------------

def rescale(tat_us: int | None, step_us: int | None, now_us: int, interval_us: int) -> int | None:
    """The TAT counted in ``step_us`` per mail, in ``interval_us`` per mail: after a rate change
    the mails still owed are owed at the new rate, so it applies at once. (Float maths, as Lua.)"""
    if tat_us is None or step_us is None or step_us == interval_us or tat_us <= now_us:
        return tat_us
    return now_us + math.ceil(float(tat_us - now_us) * interval_us / step_us)


def gcra_wait(tat_us: int | None, now_us: int, cost: int, interval_us: int, burst: int) -> tuple[int, int]:
    """(wait_us, tat): how long until ``cost`` mails fit (<= 0: now), and the tat to add to."""
    tat = max(tat_us or 0, now_us)
    return tat + cost * interval_us - burst * interval_us - now_us, tat


def tokens_available(tat_us: int | None, now_us: int, interval_us: int, burst: int) -> int:
    """Mails one decision could take right now (0 to ``burst``)."""
    tat = max(tat_us or 0, now_us)
    return max(0, (burst * interval_us - (tat - now_us)) // interval_us)


def gcra_refund(tat_us: int | None, step_us: int | None, now_us: int, refund: int, interval_us: int,
                grant_tat_us: int | None) -> int | None:
    """The TAT after giving back ``refund`` mails of the grant that left it at ``grant_tat_us``:
    at most the mails whose time has not come, and only while that grant is the last one."""
    if tat_us is None or grant_tat_us is None or tat_us != grant_tat_us or step_us != interval_us:
        return tat_us
    back = min(refund, (grant_tat_us - now_us) // interval_us)
    return grant_tat_us - back * interval_us if back > 0 else tat_us


# -- the per-minute ceiling: an exact sliding window --------------------------------------------

def minute_inside(granted_us: Sequence[int], now_us: int, span_us: int) -> list[int]:
    """The grant times still inside the span, newest first."""
    return sorted((t for t in granted_us if t + span_us > now_us), reverse=True)


def minute_wait(inside: Sequence[int], now_us: int, span_us: int, per_minute: int, n: int) -> int:
    """How long until ``n`` more mails fit: the (P - n + 1)-th newest grant must leave the span."""
    if len(inside) + n <= per_minute:
        return 0
    return inside[per_minute - n] + span_us - now_us


# -- local days ---------------------------------------------------------------------------------

def local_midnights(timezone: str, around_s: float, count: int = MIDNIGHTS) -> tuple[int, ...]:
    """Epoch seconds of local midnights in ``timezone``: from two days before the local date
    of ``around_s`` on. The decision picks today among them with Redis time, so a worker clock
    that is off by less than a day changes nothing."""
    tz = ZoneInfo(timezone)
    today = datetime.fromtimestamp(around_s, tz).date()
    return tuple(_midnight(today + timedelta(days=d), tz) for d in range(-2, count - 2))


def _midnight(day: date, tz: ZoneInfo) -> int:
    # A day may start at 01:00 where DST begins at midnight; fold=0 and a round trip through
    # UTC give the first instant of the day that exists.
    naive = datetime(day.year, day.month, day.day)
    return int(naive.replace(tzinfo=tz).timestamp())


def day_of(midnights_s: Sequence[int], at_s: int) -> tuple[int, int] | None:
    """(start, end) in epoch seconds of the local day holding ``at_s``, or None outside them."""
    for start, end in itertools.pairwise(midnights_s):
        if start <= at_s < end:
            return start, end
    return None


def worst_window(releases: Sequence[tuple[int, int]], window_ms: int) -> int:
    """The most mails released in any closed interval of ``window_ms``; ``releases`` holds
    (time_ms, mails). The GCRA bound says: at most ``window/T + B``."""
    events = sorted(releases)
    worst, total, start = 0, 0, 0
    for end_time, mails in events:
        total += mails
        while events[start][0] < end_time - window_ms:
            total -= events[start][1]
            start += 1
        worst = max(worst, total)
    return worst
