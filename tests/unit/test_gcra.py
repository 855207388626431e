"""The release decision's maths, without Redis: ``limiter.decide.decide`` is the reference that
``decide.lua`` mirrors (tests/integration/test_limiter_script.py checks they agree)."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limiter.decide import Day, State, TenantAsk, decide
from limiter.decide import refund as refund_of_grant
from limiter.gcra import HOUR_US, MINUTE_US, US, Limits, day_of, local_midnights, tokens_available, worst_window
from limiter.holding import by_tenant, rest_of, unknown_names
from mailpipe.codec import encode_job
from mailpipe.errors import ConfigError
from mailpipe.model import Batch, Job, derived_id
from mailpipe.servers import parse_config

T0 = 1_700_000_000 * US  # 2023-11-14 22:13:20 UTC


_ids = itertools.count()


def ask(state: State, now_us: int, cost: int, limits: Limits, *, batch_id: str | None = None,
        tenants: tuple[TenantAsk, ...] = ()) -> tuple[int, int]:
    """One decision for a new batch id (unless given): (granted, retry_after_us)."""
    d = decide(state, now_us, batch_id or f"b{next(_ids)}", cost, limits, tenants)
    return d.granted, d.retry_after_us


def give_back(state: State, now_us: int, mails: int, refund_of: str, limits: Limits,
              per_tenant: tuple[tuple[str, int], ...] = ()) -> bool:
    return refund_of_grant(state, now_us, refund_of, mails, limits.interval_us, per_tenant)


def tenant(name: str, mails: int, limit: int = 10_000, tz: str = "UTC", at_us: int = T0) -> TenantAsk:
    return TenantAsk(name, mails, limit, local_midnights(tz, at_us / US))


# -- limits -----------------------------------------------------------------------------------

def test_limits_from_server_settings() -> None:
    assert Limits.for_server(1200, 500) == Limits(3 * US, 500)
    assert Limits.for_server(6000, 500) == Limits(600_000, 500)
    assert Limits.for_server(6000, 500, per_minute=100, window_s=5) == Limits(600_000, 500, 100, 65 * US, 5)
    assert Limits.for_server(1200, 500, unlimited=True) == Limits(0, 500)
    # A rate that does not divide an hour rounds the interval up: never faster than configured.
    assert Limits.for_server(7000, 500).interval_us * 7000 >= HOUR_US


# -- cost N and burst -------------------------------------------------------------------------

def test_a_whole_batch_asks_for_its_mails_at_once() -> None:
    limits = Limits.for_server(1200, 500)
    state = State()
    assert ask(state, T0, 500, limits) == (500, 0)
    granted, retry = ask(state, T0, 500, limits)
    assert granted == 0
    assert retry == 500 * 3 * US  # the bucket refills in 25 minutes at 1,200/h
    assert ask(state, T0 + retry - 1, 500, limits)[0] == 0
    assert ask(state, T0 + retry, 500, limits) == (500, 0)


def test_burst_lets_that_many_through_then_paces() -> None:
    limits = Limits.for_server(3600, 10)
    state = State()
    results = [ask(state, T0, 1, limits) for _ in range(11)]
    assert [g for g, _ in results] == [1] * 10 + [0]
    assert results[-1][1] == US  # the next one in one second
    assert tokens_available(state.tat_us, T0, limits.interval_us, limits.burst) == 0
    assert tokens_available(state.tat_us, T0 + 3 * US, limits.interval_us, limits.burst) == 3


def test_small_batch_waits_only_for_its_own_tokens() -> None:
    limits = Limits.for_server(3600, 10)
    state = State()
    assert ask(state, T0, 10, limits)[0] == 10
    assert ask(state, T0, 4, limits) == (0, 4 * US)


@pytest.mark.parametrize("sizes", [(1,), (3,), (1, 5, 2, 10), (7, 7, 1)])
def test_pacing_over_an_hour_keeps_every_window_within_rate_and_burst(sizes: tuple[int, ...]) -> None:
    """Ask again exactly when told; the GCRA bound must hold in every sliding window, and the
    rate be used, not wasted."""
    rate, burst = 3600, 10
    limits = Limits.for_server(rate, burst)
    state = State()
    now, releases, i = T0, [], 0
    while now < T0 + HOUR_US:
        granted, retry = ask(state, now, sizes[i % len(sizes)], limits)
        if granted:
            releases.append((now // 1000, granted))
            i += 1
        else:
            now += retry
    for window_s in (1, 10, 60, 3600):
        assert worst_window(releases, window_s * 1000) <= rate * window_s / 3600 + burst
    assert sum(g for _, g in releases) >= 0.99 * rate


def test_per_minute_ceiling_holds_in_every_span_and_the_smallest_limit_wins() -> None:
    """At most per_minute grants in any 60 s plus the delivery window: mails that start within
    that window of their grant reach the server at most per_minute in any 60 s."""
    limits = Limits.for_server(6000, 500, per_minute=20, window_s=5)
    state = State()
    assert ask(state, T0, 500, limits)[0] == 20  # split to the minute's ceiling
    granted, retry = ask(state, T0, 480, limits)
    assert granted == 0
    assert retry == 65 * US  # the 20 leave the 65 s span together
    assert ask(state, T0 + retry - 1, 480, limits)[0] == 0
    assert ask(state, T0 + retry, 480, limits)[0] == 20


@given(st.lists(st.tuples(st.integers(0, 20_000_000), st.integers(1, 40)), min_size=1, max_size=80),
       st.integers(1, 30))
@settings(max_examples=200, deadline=None)
def test_per_minute_ceiling_at_the_server_in_any_60_s(steps: list[tuple[int, int]], per_minute: int) -> None:
    """Each grant's mails arrive anywhere within the delivery window after it: in no 60 s window
    of arrivals (the worst case: every grant's mails at its earliest and at its latest) does the
    server see more than per_minute."""
    window_s = 5
    limits = Limits.for_server(360_000, 500, per_minute=per_minute, window_s=window_s)
    state = State()
    now = T0
    grants: list[tuple[int, int]] = []
    for gap_us, cost in steps:
        now += gap_us
        d = decide(state, now, f"b{next(_ids)}", cost, limits, ())
        if d.granted:
            grants.append((now, d.granted))
    span = MINUTE_US + window_s * US
    for at, _ in grants:  # every window of 60 + W starting at a grant holds at most per_minute
        assert sum(n for t, n in grants if at <= t < at + span) <= per_minute


def test_a_new_rate_applies_at_once_to_the_mails_still_owed() -> None:
    state = State()
    slow, fast = Limits.for_server(60, 1), Limits.for_server(3600, 1)
    assert ask(state, T0, 1, slow) == (1, 0)
    assert ask(state, T0, 1, slow) == (0, 60 * US)
    # At 60/h the next mail was a minute away; at 3,600/h it is a second away, not a minute.
    assert ask(state, T0, 1, fast) == (0, US)
    assert ask(state, T0 + US, 1, fast) == (1, 0)
    assert ask(state, T0 + US, 1, slow) == (0, 60 * US)  # and back: owed at the slow rate again


def test_a_batch_larger_than_the_burst_is_split_not_stuck() -> None:
    limits = Limits.for_server(1200, 500)
    state = State()
    assert ask(state, T0, 800, limits) == (500, 0)
    # The rest (300) asks again: it fits the burst, so it waits for 300 tokens.
    assert ask(state, T0, 300, limits) == (0, 300 * 3 * US)


def test_unlimited_server_grants_at_once_but_daily_caps_hold() -> None:
    limits = Limits.for_server(1200, 500, unlimited=True)
    state = State()
    assert ask(state, T0, 5000, limits) == (5000, 0)
    assert ask(state, T0, 5000, limits) == (5000, 0)
    assert ask(state, T0, 50, limits, tenants=(tenant("acme", 50, limit=30),))[0] == 30
    assert state.tat_us is None


# -- refunds and redeliveries -----------------------------------------------------------------

def test_refund_gives_back_what_the_grant_still_owes_once() -> None:
    limits = Limits.for_server(3600, 10)
    state = State()
    assert ask(state, T0, 10, limits, batch_id="a")[0] == 10
    assert give_back(state, T0, 4, "a", limits)
    assert not give_back(state, T0, 4, "a", limits)  # once per grant
    assert ask(state, T0, 5, limits) == (0, US)  # four back, not eight
    assert ask(state, T0, 4, limits)[0] == 4


def test_refund_of_tokens_the_bucket_has_refilled_gives_nothing() -> None:
    """Grant A (never sent), the bucket refills, grant B, refund A, ask for C: C must wait.
    Before, the refund handed A's tokens back and B + C, twice the burst, went out at once."""
    limits = Limits.for_server(3600, 10)
    state = State()
    assert ask(state, T0, 10, limits, batch_id="a")[0] == 10
    later = T0 + 60 * US
    assert ask(state, later, 10, limits, batch_id="b")[0] == 10
    give_back(state, later, 10, "a", limits)
    assert ask(state, later + 2_000, 10, limits) == (0, 10 * US - 2_000)


def test_refund_returns_only_the_part_whose_time_has_not_come() -> None:
    limits = Limits.for_server(3600, 10)
    state = State()
    assert ask(state, T0, 10, limits, batch_id="a")[0] == 10  # tat = T0 + 10 s
    give_back(state, T0 + 6 * US, 10, "a", limits)
    # Four of the ten were still owed: the bucket is full again, not beyond.
    assert state.tat_us == T0 + 6 * US
    assert tokens_available(state.tat_us, T0 + 6 * US, limits.interval_us, limits.burst) == 10


def test_refund_behind_a_later_grant_gives_nothing() -> None:
    """A's tokens sit under B's: handing them back would let the next grant reuse B's time."""
    limits = Limits.for_server(3600, 10)
    state = State()
    assert ask(state, T0, 5, limits, batch_id="a")[0] == 5
    assert ask(state, T0, 5, limits, batch_id="b")[0] == 5
    tat = state.tat_us
    give_back(state, T0 + US, 5, "a", limits)
    assert state.tat_us == tat


def test_refund_of_a_grant_no_longer_known_gives_nothing() -> None:
    limits = Limits.for_server(3600, 10)
    state = State()
    assert ask(state, T0, 10, limits, batch_id="a")[0] == 10
    tat = state.tat_us
    assert not give_back(state, T0, 10, "expired", limits)
    assert state.tat_us == tat


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3_000_000), st.integers(1, 12), st.integers(0, 12),
                          st.integers(0, 30)), min_size=1, max_size=60))
def test_grants_less_refunds_stay_within_rate_and_burst_in_every_window(
        steps: list[tuple[int, int, int, int]]) -> None:
    """Whatever comes back, and however late: what was granted and not refunded (the mail a
    server can receive) stays within w/T + B in every window w."""
    limits = Limits.for_server(3600, 10)
    state = State()
    now = T0
    net: dict[str, tuple[int, int]] = {}  # grant -> (time ms, mails not refunded)
    for n, (gap_us, cost, refund, pick) in enumerate(steps):
        now += gap_us
        refund_of = ""
        if refund and net:
            refund_of = sorted(net)[pick % len(net)]
            refund = min(refund, net[refund_of][1])
        if refund_of:  # a give-back first, then the ask
            tat_before = state.tat_us or 0
            give_back(state, now, refund, refund_of, limits)
            back = (tat_before - (state.tat_us or 0)) // limits.interval_us
            net[refund_of] = (net[refund_of][0], net[refund_of][1] - back)
        d = decide(state, now, f"g{n:03}", cost, limits, ())
        if d.granted and not d.cached:
            net[f"g{n:03}"] = (now // 1000, d.granted)
    releases = list(net.values())
    for window_ms in (1_000, 10_000, 60_000):
        assert worst_window(releases, window_ms) <= window_ms // 1000 + limits.burst


def test_a_redelivered_batch_gets_the_same_grant_without_new_tokens() -> None:
    limits = Limits.for_server(3600, 10)
    state = State()
    first = decide(state, T0, "same", 4, limits, (tenant("a", 4),))
    again = decide(state, T0 + 5 * US, "same", 4, limits, (tenant("a", 4),))
    assert (again.granted, again.now_us, again.cached) == (4, first.now_us, True)
    assert state.days["a"].mails == 4
    assert tokens_available(state.tat_us, T0, limits.interval_us, limits.burst) == 6


def test_refund_lowers_the_tenant_count_of_the_same_day() -> None:
    limits = Limits.for_server(3600, 10)
    state = State()
    ask(state, T0, 10, limits, batch_id="a", tenants=(tenant("a", 10),))
    assert state.days["a"].mails == 10
    give_back(state, T0 + 60 * US, 4, "a", limits, (("a", 4),))
    assert state.days["a"].mails == 6


def test_window_reserve_keeps_a_late_start_within_the_servers_burst() -> None:
    """A mail may start up to one window after its grant; the grant burst leaves that room."""
    assert Limits.for_server(36_000, 20, reserve=10).burst == 10
    assert Limits.for_server(6000, 600, reserve=100).burst == 500
    with pytest.raises(ConfigError, match="MAILPIPE_BURST_MAILS"):
        Limits.for_server(36_000, 20, reserve=600)


# -- daily caps and days ----------------------------------------------------------------------

def test_daily_cap_grants_what_is_left_then_waits_for_local_midnight() -> None:
    limits = Limits.for_server(1_000_000, 500)
    state = State()
    tz = "America/New_York"
    t = tenant("acme", 8, limit=10, tz=tz)
    assert ask(state, T0, 8, limits, tenants=(t,))[0] == 8
    assert ask(state, T0, 8, limits, tenants=(t,))[0] == 2
    rest = t._replace(mails=6)
    granted, retry = ask(state, T0, 6, limits, tenants=(rest,))
    assert granted == 0
    midnight = datetime(2023, 11, 15, 5, 0, tzinfo=UTC)  # 00:00 in New York (UTC-5)
    assert T0 + retry == int(midnight.timestamp()) * US
    assert ask(state, T0 + retry - 1, 6, limits, tenants=(rest,))[0] == 0
    assert ask(state, T0 + retry, 6, limits, tenants=(rest,))[0] == 6


def test_caps_fill_tenants_in_order_and_the_smallest_limit_wins() -> None:
    limits = Limits.for_server(3600, 10)
    state = State()
    d = decide(state, T0, "mixed", 12, limits, (tenant("a", 3, limit=2), tenant("b", 9)))
    assert (d.granted, d.tenant_grants) == (10, (2, 8))  # a: its cap; then the burst


def test_day_rolls_over_at_local_midnight_in_the_tenants_zone() -> None:
    limits = Limits.for_server(1_000_000, 500)
    state = State()
    # 23:59:59.5 in Tokyo on 2023-11-15 is 14:59:59.5 UTC.
    before = int(datetime(2023, 11, 15, 14, 59, 59, tzinfo=UTC).timestamp()) * US + 500_000
    t = tenant("jp", 5, limit=5, tz="Asia/Tokyo", at_us=before)
    assert ask(state, before, 5, limits, tenants=(t,))[0] == 5
    assert ask(state, before, 5, limits, tenants=(t,)) == (0, 500_000)
    assert ask(state, before + 500_000, 5, limits, tenants=(t,))[0] == 5


def test_dst_days_have_23_and_25_hours() -> None:
    spring = local_midnights("Europe/Paris", datetime(2024, 3, 31, 12, tzinfo=UTC).timestamp())
    autumn = local_midnights("Europe/Paris", datetime(2024, 10, 27, 12, tzinfo=UTC).timestamp())
    assert spring[3] - spring[2] == 23 * 3600
    assert autumn[3] - autumn[2] == 25 * 3600
    assert spring[2] == int(datetime(2024, 3, 30, 23, tzinfo=UTC).timestamp())


def test_a_worker_clock_off_by_hours_still_lets_redis_time_pick_the_day() -> None:
    now_s = T0 // US
    right = local_midnights("UTC", now_s)
    for skew_s in (-30, 30, -20 * 3600, 20 * 3600):
        assert day_of(local_midnights("UTC", now_s + skew_s), now_s) == day_of(right, now_s)
    assert day_of(local_midnights("UTC", now_s + 5 * 86400), now_s) is None


def test_refund_after_midnight_does_not_lower_the_new_days_count() -> None:
    limits = Limits.for_server(1_000_000, 500)
    state = State()
    midnight = int(datetime(2023, 11, 15, tzinfo=UTC).timestamp()) * US
    ask(state, midnight - 30 * US, 4, limits, batch_id="y", tenants=(tenant("a", 4, at_us=midnight),))
    ask(state, midnight + 10 * US, 5, limits, tenants=(tenant("a", 5, at_us=midnight),))
    assert state.days["a"] == Day(midnight // US, midnight // US + 86400, 5)
    # Yesterday's grant comes back 40 s later, after midnight: today's count stays.
    give_back(state, midnight + 10 * US, 4, "y", limits, (("a", 4),))
    assert state.days["a"] == Day(midnight // US, midnight // US + 86400, 5)


def test_a_time_zone_changed_mid_day_takes_effect_at_the_end_of_the_counted_day() -> None:
    """The count is the tenant's, whatever its servers' order, and a new time zone does not reset
    it: the counted day ends when it ends, then days are the new zone's."""
    limits = Limits.for_server(1_000_000, 500)
    state = State()
    noon_utc = int(datetime(2023, 11, 15, 12, tzinfo=UTC).timestamp()) * US
    assert ask(state, noon_utc, 10, limits, tenants=(tenant("a", 10, limit=10, at_us=noon_utc),))[0] == 10
    # Now in Tokyo, where it is already 21:00 of the same day ... and then past its midnight.
    tokyo = tenant("a", 10, limit=10, tz="Asia/Tokyo", at_us=noon_utc)
    assert ask(state, noon_utc, 10, limits, tenants=(tokyo,)) == (0, 12 * 3600 * US)  # UTC's midnight
    assert ask(state, noon_utc + 12 * 3600 * US, 10, limits, tenants=(tokyo,))[0] == 10


# -- helpers ----------------------------------------------------------------------------------

def test_worst_window() -> None:
    releases = [(1001, 1), (0, 5), (500, 5), (1000, 1), (3000, 4)]
    assert worst_window(releases, 1000) == 11
    assert worst_window(releases, 999) == 10
    assert worst_window(releases, 499) == 5
    assert worst_window(releases, 0) == 5
    assert worst_window([], 1000) == 0


def test_derived_ids_are_stable_and_distinct() -> None:
    assert derived_id("b1", "rest") == derived_id("b1", "rest")
    assert derived_id("b1", "rest") != derived_id("b2", "rest")
    assert len(derived_id("b1", "rest")) == 32


def _batch(tenants: list[str], with_map: bool = True) -> Batch:
    jobs = tuple(encode_job(Job(id=f"j{i}", tenant=t, server="s", sender="a@x.org", recipients=("b@y.org",),
                                message=b"x" * (10 + i))) for i, t in enumerate(tenants))
    counts: dict[str, int] = {}
    for t in tenants:
        counts[t] = counts.get(t, 0) + 1
    size = sum(10 + i for i in range(len(jobs)))
    return Batch(id="orig", server="s", jobs=jobs, mails=len(jobs), bytes=size,
                 created_ms=1, tenants=counts if with_map else {})


def test_a_batch_of_several_tenants_becomes_one_per_tenant() -> None:
    batch = dataclasses.replace(_batch(["a", "b", "a", "b", "a"]), refund=2, refund_of="g1",
                                refund_tenants={"b": 2})
    parts = by_tenant(batch)
    assert [(p.tenants, p.mails, p.bytes) for p in parts] == [({"a": 3}, 3, 10 + 12 + 14), ({"b": 2}, 2, 11 + 13)]
    assert parts[0].jobs == (batch.jobs[0], batch.jobs[2], batch.jobs[4])
    assert [p.id for p in parts] == [p.id for p in by_tenant(batch)]  # stable on a redelivery
    assert all(p.refund == 0 and p.refund_of is None for p in parts)  # applied when it was routed
    assert all(p.created_ms == batch.created_ms for p in parts)
    one = by_tenant(dataclasses.replace(_batch(["a", "a"]), refund=2, refund_of="g1", refund_tenants={"a": 2}))
    assert [(p.id, p.refund, p.tenants) for p in one] == [("orig", 0, {"a": 2})]


def test_the_rest_of_a_batch_keeps_its_jobs_in_order_under_a_stable_id() -> None:
    batch = _batch(["a"] * 5)
    rest = rest_of(batch, "a", 2, 12 + 13 + 14)
    assert rest.jobs == batch.jobs[2:] and (rest.mails, rest.bytes, rest.tenants) == (3, 39, {"a": 3})
    assert rest.id == derived_id("orig", "rest:2") and rest.grant_id is None and rest.refund == 0


def test_a_held_batch_counts_its_bytes_whole_or_split() -> None:
    """All of it: the batch's own figure, no job decoded; a part: its jobs' message bytes; a job
    that does not decode: its encoded size (the sender dead-letters it)."""
    from limiter.holding import Held

    batch = dataclasses.replace(_batch(["a"] * 4), bytes=999)  # a figure no job sum gives
    held = Held(delivery=None, batch=batch, tenant="a", lane="n:a", member="m", since=0.0, due=0.0)  # type: ignore[arg-type]
    assert held.bytes_of(0, 4) == 999 and held.sizes is None
    assert (held.bytes_of(0, 2), held.bytes_of(2, 4)) == (10 + 11, 12 + 13)
    broken = dataclasses.replace(batch, jobs=(batch.jobs[0], b"\x00not a job"))
    held = Held(delivery=None, batch=broken, tenant="a", lane="n:a", member="m", since=0.0, due=0.0)  # type: ignore[arg-type]
    assert held.bytes_of(1, 2) == len(b"\x00not a job")


def test_unknown_server_or_tenant_is_named() -> None:
    config = parse_config({"servers": {"s": {"address": "smtp.example.com"}},
                           "tenants": {"a": {"server": "s"}}}, "test", {})
    batch = _batch(["a"])
    assert unknown_names(batch, {"a": 1}, config) is None
    assert "'zz'" in (unknown_names(batch, {"a": 1, "zz": 2}, config) or "")
    other = Batch(id="x", server="nope", jobs=(), mails=0, bytes=0, created_ms=0)
    assert "unknown server 'nope'" in (unknown_names(other, {}, config) or "")
