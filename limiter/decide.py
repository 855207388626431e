"""One release decision, in steps: the reference of ``decide.lua`` (Redis does the same, atomically,
with Redis ``TIME``; the tests check that they agree on random sequences).

A held batch asks for what is left of it. Every limit must allow the release and the smallest
wins; a batch larger than what the limits allow at once is granted in parts, never stuck:

1. A part granted before (a redelivered batch) gets the same grant.
2. The server's pace (``mailpipe/pushback.py``): a paused server gets nothing until its hold
   ends, then one mail at a time probes it; after a rate signal, nothing for a back-off; after
   a cut, the interval is longer and the burst smaller in proportion (the GCRA's debt is
   counted at the new interval at once).
3. A tenant held off (capped, paused), or the lane of the batch (its bulk mail paused), gets
   nothing.
4. The daily caps: what each tenant may still send today. None left: the tenant is held off
   until the first local midnight that frees some, so it holds no turn meanwhile.
5. The request: the smallest of the batch, the caps' room, the grant burst, the minute's ceiling.
6. Fair share (start-time fair queuing; ``mailpipe/lanes.py`` says who is waiting): the tenant
   may take tokens only if no waiting tenant has a lower start tag (ties allowed). While others
   wait, a turn is one mail; alone, the tenant takes what the limits hold now. Transactional
   mail within its tenant's ration (``ration``) does not wait for the turn.
7. Every limit must allow the request now: the GCRA (``limiter/gcra.py``) and the minute's
   sliding window; otherwise "ask again in ...".
8. Granted: the TAT and the minute's window move, the tenants' days are counted, the fair queue
   moves (``F = S + n / weight``; ``V`` to ``S``, or to ``F`` when the tenant was alone: using
   an idle server is never held against it; transactional mail moves its own tenant's tag,
   never ``V``, so it cannot push every later tenant back), the grant is remembered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from limiter.gcra import (
    US,
    Limits,
    day_of,
    gcra_refund,
    gcra_wait,
    minute_inside,
    minute_wait,
    rescale,
    tokens_available,
)
from mailpipe.lanes import LaneBook
from mailpipe.pushback import PAUSED, PROBING, Controller

MIN_TURN_RETRY_US = 50_000  # a tenant not first asks again after at least this long
PROBE_LEASE_US = 120 * US  # a probe's outcome is reported within this (window + SMTP timeout)
PAUSED_RECHECK_US = 5 * US  # a paused server is asked again this often: a resume by hand applies at once
PURGE = 32  # ended holds dropped per decision (as lanes_common.lua)


class TenantAsk(NamedTuple):
    """One tenant's share of a batch, its daily cap and the local midnights around now."""

    name: str
    mails: int
    daily_limit: int
    midnights_s: tuple[int, ...]


class Fair(NamedTuple):
    """The tenant whose turn a batch takes on its server; ``ahead``: transactional mail within
    its ration, which does not wait for the turn (its mails still count against the tenant)."""

    tenant: str
    weight: float = 1.0
    ahead: bool = False


class Decision(NamedTuple):
    granted: int
    retry_after_us: int
    now_us: int
    cached: bool
    tenant_grants: tuple[int, ...]
    published: bool = False  # cached, and its part is already in the send queue
    turn: bool = False  # refused because another tenant's turn comes first

    @property
    def now_ms(self) -> int:
        return self.now_us // 1000

    @property
    def skipped(self) -> bool:
        """Not decided: a batch ahead of it in the same round and line was refused."""
        return self.retry_after_us < 0


@dataclass
class Grant:
    """What a grant leaves in Redis: its mails, its time, the TAT just after it, per tenant."""

    mails: int
    at_us: int
    tat_us: int | None
    per_tenant: tuple[int, ...]
    refunded: bool = False
    published: bool = False


@dataclass
class Day:
    """A tenant's counted local day: [start, end) in epoch seconds, and its mails."""

    start: int
    end: int
    mails: int


@dataclass
class State:
    """What Redis holds for one server and its tenants' days: the reference model of the keys."""

    tat_us: int | None = None
    step_us: int | None = None  # the interval tat_us was counted in
    minute: list[int] = field(default_factory=list)  # grant times (us), one per mail, newest first
    grants: dict[str, Grant] = field(default_factory=dict)
    released: dict[int, int] = field(default_factory=dict)  # 10 s bucket -> mails
    tenant_released: dict[str, dict[int, int]] = field(default_factory=dict)
    days: dict[str, Day] = field(default_factory=dict)
    book: LaneBook = field(default_factory=LaneBook)
    pushback: Controller = field(default_factory=Controller)
    rounds: set[str] = field(default_factory=set)  # round keys set (a refusal in a line)

    def tat(self, now_us: int, interval_us: int) -> int:
        """``max(tat, now)`` in the current interval (a rescaled TAT is stored, as Lua does)."""
        if self.tat_us is not None and self.step_us != interval_us and self.tat_us > now_us:
            self.tat_us, self.step_us = rescale(self.tat_us, self.step_us, now_us, interval_us), interval_us
        return max(self.tat_us or 0, now_us)


def counted_day(day: Day | None, midnights_s: Sequence[int], now_s: int) -> Day | None:
    """The day a tenant's mails count in: the stored one while it lasts (a time zone changed since
    takes effect at its end), else today from zero; None when the midnights do not cover now."""
    if day is not None and day.start <= now_s < day.end:
        return day
    today = day_of(midnights_s, now_s)
    return None if today is None else Day(today[0], today[1], 0)


def decide(state: State, now_us: int, part_id: str, cost: int, limits: Limits, tenants: Sequence[TenantAsk],
           fair: Fair | None = None, hold: str = "", hold_lease_us: int = 0, lane: str = "",
           round_key: str = "") -> Decision:
    """One decision, exactly as ``decide.lua`` makes it; mutates ``state`` as Lua does Redis."""
    book = state.book
    if round_key and round_key in state.rounds:
        return Decision(0, -1, now_us, False, ())

    def refused(retry_us: int, turn: bool = False) -> Decision:
        if round_key:
            state.rounds.add(round_key)
        return Decision(0, retry_us, now_us, False, (), turn=turn)

    if hold and hold in book.holds:
        book.holds[hold] = now_us + hold_lease_us

    # 1. A part granted before gets that grant again.
    cached = state.grants.get(part_id)
    if cached is not None:
        return Decision(cached.mails, 0, cached.at_us, True, cached.per_tenant, cached.published)
    if cost == 0:
        return Decision(0, 0, now_us, False, ())

    # 2. The server's pace (mailpipe/pushback.py): paused, nothing until its hold ends, then one
    # probe at a time; after a cut, a longer interval and a burst in proportion.
    pace = state.pushback
    probing = False
    if pace.state == PAUSED:
        if pace.manual or now_us < pace.hold_until:
            return refused(min(max(pace.hold_until - now_us, MIN_TURN_RETRY_US), PAUSED_RECHECK_US))
        pace.state = PROBING
    if pace.state == PROBING:
        if now_us < pace.probe_at + PROBE_LEASE_US:
            return refused(min(pace.probe_at + PROBE_LEASE_US - now_us, PAUSED_RECHECK_US))
        probing = True
    interval_us, burst = pace.paced(limits.interval_us, limits.burst)
    limits = limits._replace(interval_us=interval_us, burst=burst)
    if not probing and now_us < pace.backoff_until:  # held back after a rate signal
        if interval_us:
            state.tat(now_us, interval_us)  # a cut's debt counted at its rate from now
        return refused(pace.backoff_until - now_us)

    # 3. A tenant held off, or the lane of the batch, is not released.
    if fair is not None:
        off = max(book.off.get(fair.tenant, 0), book.lanes_off.get(lane, 0) if lane else 0)
        if off > now_us:
            return refused(off - now_us)

    # 4. The daily caps.
    now_s = now_us // US
    days: list[Day] = []
    for t in tenants:
        day = counted_day(state.days.get(t.name), t.midnights_s, now_s)
        if day is None:
            raise ValueError("the day boundaries given do not cover Redis time")
        days.append(day)
    allowed = [max(0, min(t.mails, t.daily_limit - d.mails)) for t, d in zip(tenants, days, strict=True)]
    waits = [d.end * US - now_us for t, d, a in zip(tenants, days, allowed, strict=True) if t.mails > 0 and a == 0]
    total = sum(allowed) if tenants else cost
    if total == 0:
        retry = min(waits, default=0)
        if fair is not None:
            book.off[fair.tenant] = now_us + retry
            book.update_waiting(fair.tenant, now_us)
        return refused(retry)

    # 5. The request.
    ask = total
    if limits.interval_us:
        ask = min(ask, limits.burst)
    if limits.per_minute:
        ask = min(ask, limits.per_minute)
    inside = minute_inside(state.minute, now_us, limits.minute_span_us) if limits.per_minute else []

    def room() -> int:
        r = 1 << 62
        if limits.interval_us:
            r = tokens_available(state.tat(now_us, limits.interval_us), now_us, limits.interval_us, limits.burst)
        if limits.per_minute:
            r = min(r, limits.per_minute - len(inside))
        return max(0, r)

    # 6. Fair share.
    queued = fair is not None and limits.interval_us > 0
    start, contended = 0.0, False
    if queued and fair is not None:
        book.purge_holds(now_us, PURGE)
        name = fair.tenant
        start = book.tags.get(name, max(book.v, book.finish.get(name, 0.0)))
        contended = len(book.tags) - (1 if name in book.tags else 0) > 0
        if contended and not fair.ahead and min(book.tags.values()) < start:
            before = sum(1 for tag in book.tags.values() if tag < start)
            turn, _ = gcra_wait(state.tat(now_us, limits.interval_us), now_us, before + 1, limits.interval_us,
                                limits.burst)
            return refused(max(turn, MIN_TURN_RETRY_US), turn=True)
        ask = 1 if contended and not fair.ahead else min(ask, max(1, room()))

    if probing:
        ask = 1  # one mail tries a paused server

    # 7. Every limit must allow it now.
    wait, tat = 0, 0
    if limits.interval_us:
        wait, tat = gcra_wait(state.tat(now_us, limits.interval_us), now_us, ask, limits.interval_us,
                              limits.burst)
    if limits.per_minute:
        wait = max(wait, minute_wait(inside, now_us, limits.minute_span_us, limits.per_minute, ask))
    if wait > 0:
        return refused(wait)

    # 8. Granted.
    grant_tat = None
    if limits.interval_us:
        state.tat_us, state.step_us = tat + ask * limits.interval_us, limits.interval_us
        grant_tat = state.tat_us
    if limits.per_minute:
        state.minute = ([now_us] * ask + state.minute)[:limits.per_minute]
    grants: list[int] = []
    left = ask
    for t, day, a in zip(tenants, days, allowed, strict=True):
        g = min(a, left)
        left -= g
        if g:
            state.days[t.name] = Day(day.start, day.end, day.mails + g)
        grants.append(g)
    bucket = now_s // 10
    state.released[bucket] = state.released.get(bucket, 0) + ask
    if queued and fair is not None:
        finish = start + ask / fair.weight
        if not fair.ahead:
            book.v = max(book.v, start if contended else finish)
        book.finish[fair.tenant] = finish
        if fair.tenant in book.tags:
            book.tags[fair.tenant] = finish
        ring = state.tenant_released.setdefault(fair.tenant, {})
        ring[bucket] = ring.get(bucket, 0) + ask
    if hold:
        LaneBook._add(book.hold_mails, hold, -ask)
        LaneBook._add(book.held_mails, lane, -ask)
    if probing:
        pace.probe_at = now_us
    if ask < cost and round_key:
        state.rounds.add(round_key)
    state.grants[part_id] = Grant(ask, now_us, grant_tat, tuple(grants))
    return Decision(ask, 0, now_us, False, tuple(grants))


def refund(state: State, now_us: int, refund_of: str, mails: int, interval_us: int,
           per_tenant: Sequence[tuple[str, int]]) -> bool:
    """A give-back's refund of ``mails`` of the grant made to ``refund_of``: once per grant, only
    what it still owes, a day's count only within the day it was counted in. True if applied."""
    given = state.grants.get(refund_of)
    if mails <= 0 or given is None or given.refunded:
        return False
    given.refunded = True
    if interval_us:
        state.tat_us = gcra_refund(state.tat_us, state.step_us, now_us, mails, interval_us, given.tat_us)
    granted_s = given.at_us // US
    for name, share in per_tenant:
        day = state.days.get(name)
        if share > 0 and day is not None and day.mails > 0 and day.start <= granted_s < day.end:
            day.mails = max(0, day.mails - share)
    return True
