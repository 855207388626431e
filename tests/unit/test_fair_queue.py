"""The fair share's maths on the reference (``limiter.gcra.decide``), no Redis: tenants that ask
again when told, as the limiter stage does, on one server at 10 mails/s.

``gcra.lua`` makes the same decisions (tests/integration/test_limiter_script.py)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from limiter.gcra import US, Fair, Limits, State, TenantAsk, decide, local_midnights, worst_window

T0 = 1_700_000_000 * US
RATE = 36_000  # 10 mails/s
STEP_US = 100_000
BURST = 20
LEASE_US = 2 * US


@dataclass
class Tenant:
    name: str
    backlog: int
    weight: float = 1.0
    cap: int = 10**9
    from_us: int = T0  # starts asking then
    asks: bool = True  # False: its replica died after its first ask


def run(tenants: list[Tenant], until_us: int, state: State | None = None,
        limits: Limits | None = None) -> list[tuple[int, str, int]]:
    """Every tenant asks when it is due (its first ask at ``from_us``; after a grant one mail's
    time later, after a refusal when told); returns the grants as (time us, tenant, mails)."""
    state = state or State()
    limits = limits or Limits.for_server(RATE, BURST)
    due = {t.name: t.from_us for t in tenants}
    grants: list[tuple[int, str, int]] = []
    ids = itertools.count()
    while True:
        waiting = [t for t in tenants if t.backlog > 0 and due[t.name] is not None]
        if not waiting:
            return grants
        tenant = min(waiting, key=lambda t: (due[t.name], t.name))
        now = due[tenant.name]
        if now >= until_us:
            return grants
        ask = [TenantAsk(tenant.name, tenant.backlog, tenant.cap, local_midnights("UTC", now / US))]
        d = decide(state, now, f"b{next(ids)}", tenant.backlog, limits, ask,
                   fair=Fair(tenant.name, tenant.weight, tenant.backlog), lease_us=LEASE_US)
        if d.granted:
            grants.append((now, tenant.name, d.granted))
            tenant.backlog -= d.granted
            due[tenant.name] = now + STEP_US
        elif d.retry_after_us > 3600 * US:
            due[tenant.name] = None  # its cap is reached: parked until its midnight
        else:
            due[tenant.name] = now + d.retry_after_us
        if not tenant.asks:
            due[tenant.name] = None


def mails(grants: list[tuple[int, str, int]], name: str, start_us: int = 0, end_us: int = 2**62) -> int:
    return sum(n for at, who, n in grants if who == name and start_us <= at < end_us)


def test_two_backlogged_tenants_share_by_weight() -> None:
    grants = run([Tenant("a", 10_000), Tenant("c", 10_000, weight=3)], T0 + 100 * US)
    a, c = mails(grants, "a", T0 + 5 * US), mails(grants, "c", T0 + 5 * US)
    assert abs(a / (a + c) - 0.25) < 0.01, (a, c)
    assert a + c >= 0.99 * 95 * 10  # and the server's whole rate is used


def test_a_tenant_alone_gets_the_whole_rate_burst_then_pace() -> None:
    grants = run([Tenant("a", 10_000)], T0 + 60 * US)
    assert grants[0][2] == BURST  # what the bucket held, at once
    assert mails(grants, "a") >= BURST + 59 * 10
    assert worst_window([(at // 1000, n) for at, _, n in grants], 10_000) <= 10 * 10 + BURST


def test_a_tenant_arriving_behind_a_backlog_waits_one_turn_per_tenant_waiting() -> None:
    arrive = T0 + 30 * US
    grants = run([Tenant("a", 10_000), Tenant("b", 10, from_us=arrive)], T0 + 60 * US)
    first_b = min(at for at, who, _ in grants if who == "b")
    assert first_b - arrive <= 2 * STEP_US  # (tenants waiting) x the server's interval
    # Then b and a alternate: b's 10 mails take about 20 turns, not a's backlog.
    last_b = max(at for at, who, _ in grants if who == "b")
    assert last_b - arrive <= 21 * STEP_US


def test_using_an_idle_server_is_not_held_against_a_tenant() -> None:
    """a, alone, took the whole burst an idle server had saved; c, arriving just after, shares
    from then on, 1:1: it does not get a's burst back first."""
    arrive = T0 + 50_000
    grants = run([Tenant("a", 10_000), Tenant("c", 10_000, from_us=arrive)], T0 + 20 * US)
    assert mails(grants, "a", T0, arrive) == BURST
    a, c = mails(grants, "a", arrive), mails(grants, "c", arrive)
    assert abs(a - c) <= 2, (a, c)


def test_a_tenant_that_leaves_hands_its_share_to_the_others() -> None:
    grants = run([Tenant("a", 10_000), Tenant("b", 100)], T0 + 40 * US)
    done = max(at for at, who, _ in grants if who == "b")
    assert done < T0 + 25 * US  # 100 mails at half the rate
    after = mails(grants, "a", done + US, T0 + 40 * US)
    assert after >= 0.97 * 10 * (T0 + 40 * US - done - US) / US  # a alone again: the whole rate


def test_a_tenant_at_its_daily_cap_does_not_hold_a_turn() -> None:
    grants = run([Tenant("a", 10_000), Tenant("capped", 1000, cap=15)], T0 + 30 * US)
    assert mails(grants, "capped") == 15
    assert mails(grants, "a", T0 + 10 * US) >= 0.97 * 200


def test_a_waiter_whose_replica_died_blocks_no_longer_than_its_lease() -> None:
    """'gone' asks once and never again, while first in line: 'a' waits for its lease to end,
    then has the server; the tokens saved meanwhile are not lost (the burst keeps them)."""
    state = State()
    run([Tenant("a", 10_000)], T0 + 5 * US, state)  # a is in line (its tag moved on)
    gone = Tenant("gone", 1000, from_us=T0 + 5 * US, asks=False)
    grants = run([gone, Tenant("a", 10_000, from_us=T0 + 5 * US + 1)], T0 + 20 * US, state)
    resumed = min(at for at, who, _ in grants if who == "a")
    assert resumed - (T0 + 5 * US) <= LEASE_US + 3 * STEP_US
    assert mails(grants, "a") + mails(grants, "gone") >= 0.97 * 15 * 10


def test_the_split_never_lifts_the_servers_rate() -> None:
    tenants = [Tenant(f"t{i}", 500, weight=1 + i % 3, from_us=T0 + i * 700_000) for i in range(12)]
    grants = run(tenants, T0 + 120 * US)
    releases = [(at // 1000, n) for at, _, n in grants]
    for window_ms in (1000, 10_000, 60_000):
        assert worst_window(releases, window_ms) <= 10 * window_ms / 1000 + BURST


def test_high_priority_within_its_ration_does_not_wait_for_its_turn_but_is_counted() -> None:
    state = State()
    limits = Limits.for_server(RATE, BURST)
    now = T0

    def ask(name: str, ahead: bool = False) -> int:
        tenants = [TenantAsk(name, 5, 10**9, local_midnights("UTC", now / US))]
        return decide(state, now, f"{name}{now}{ahead}", 5, limits, tenants,
                      fair=Fair(name, 1.0, 100, ahead), lease_us=LEASE_US).granted

    assert ask("a") == 5  # alone: its whole batch from the burst, and it stays in line
    now += 3 * STEP_US
    assert ask("b") == 1  # b arrives at the server's virtual time: level with a, its turn
    now += 3 * STEP_US
    assert ask("b") == 0  # now a's turn comes first ...
    finish = state.fair.finish["b"]
    assert ask("b", ahead=True) == 1  # ... but b's transactional mail does not wait for it
    assert state.fair.finish["b"] == finish + 1  # and is counted against b's next turns
