"""The fair share's maths on the references (``limiter.decide.decide``, ``limiter.taking``, the
lanes' ``LaneBook``), no Redis: tenants publish into their lanes, and ask again when told, as the
limiter stage does, on one server at 10 mails/s.

``decide.lua`` and ``taking.lua`` make the same decisions (tests/integration/test_limiter_script.py)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from limiter import taking
from limiter.decide import Fair, State, TenantAsk, decide
from limiter.gcra import US, Limits, local_midnights, worst_window
from mailpipe.lanes import lane_id

T0 = 1_700_000_000 * US
RATE = 36_000  # 10 mails/s
STEP_US = 100_000
BURST = 20
LEASE_US = 180 * US


@dataclass
class Tenant:
    name: str
    backlog: int
    weight: float = 1.0
    cap: int = 10**9
    from_us: int = T0  # publishes then
    high: bool = False  # its mail is transactional, within its ration


def publish(state: State, now: int, tenant: Tenant) -> None:
    state.book.exit(now, "packer", [(lane_id(tenant.name, "high" if tenant.high else "normal"), tenant.backlog)])


def empty(state: State, now: int, tenant: Tenant) -> None:
    """A limiter finds the tenant's lane empty: it is no longer present."""
    lane = lane_id(tenant.name, "high" if tenant.high else "normal")
    member = f"limiter/{now} {lane}"
    version = taking.hold(state.book, now, LEASE_US, [member])[0]
    taking.got(state.book, now, LEASE_US, [(member, version, 0)])


def run(tenants: list[Tenant], until_us: int, state: State | None = None,
        limits: Limits | None = None) -> list[tuple[int, str, int]]:
    """Each tenant publishes at ``from_us`` and asks when it is due (after a grant one mail's time
    later, after a refusal when told); returns the grants as (time us, tenant, mails)."""
    state = state or State()
    limits = limits or Limits.for_server(RATE, BURST)
    due: dict[str, int | None] = {t.name: t.from_us for t in tenants}
    published: set[str] = set()
    grants: list[tuple[int, str, int]] = []
    ids = itertools.count()
    while True:
        asking = [t for t in tenants if t.backlog > 0 and due[t.name] is not None]
        if not asking:
            return grants
        tenant = min(asking, key=lambda t: (due[t.name] or 0, t.name))
        now = due[tenant.name] or 0
        if now >= until_us:
            return grants
        if tenant.name not in published:
            publish(state, now, tenant)
            published.add(tenant.name)
        ask = [TenantAsk(tenant.name, tenant.backlog, tenant.cap, local_midnights("UTC", now / US))]
        d = decide(state, now, f"b{next(ids)}", tenant.backlog, limits, ask,
                   fair=Fair(tenant.name, tenant.weight, tenant.high))
        if d.granted:
            grants.append((now, tenant.name, d.granted))
            tenant.backlog -= d.granted
            due[tenant.name] = now + STEP_US
            if not tenant.backlog:
                empty(state, now, tenant)
        elif d.retry_after_us > 3600 * US:
            due[tenant.name] = None  # its cap is reached: it waits in its lane until its midnight
        else:
            due[tenant.name] = now + d.retry_after_us


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


def test_a_tenant_in_its_lane_keeps_its_place_when_nobody_holds_its_batch() -> None:
    """Waiting is mail in a lane, not a batch some replica holds: c, with mail in its lane but
    not asking for a while (no replica took its batch yet), still has its turn; a is told to
    wait for it instead of taking the server alone."""
    state = State()
    limits = Limits.for_server(RATE, BURST)
    a, c = Tenant("a", 10_000), Tenant("c", 600, weight=3)
    publish(state, T0, a)
    publish(state, T0, c)
    now = T0 + 10 * US  # the bucket is full: a alone would take it all
    ids = itertools.count()

    def ask(t: Tenant) -> int:
        tenants = [TenantAsk(t.name, 50, 10**9, local_midnights("UTC", now / US))]
        return decide(state, now, f"{t.name}{next(ids)}", 50, limits, tenants, fair=Fair(t.name, t.weight)).granted

    assert ask(a) == 1  # one mail a turn: c is waiting
    assert ask(a) == 0  # and the next turn is c's, though c has not asked
    assert ask(c) == 1


def test_using_an_idle_server_is_not_held_against_a_tenant() -> None:
    """a, alone, took the whole burst an idle server had saved; c, arriving just after, shares
    from then on, 1:1: it does not get a's burst back first."""
    arrive = T0 + 50_000
    grants = run([Tenant("a", 10_000), Tenant("c", 10_000, from_us=arrive)], T0 + 20 * US)
    assert mails(grants, "a", T0, arrive) == BURST
    a, c = mails(grants, "a", arrive), mails(grants, "c", arrive)
    assert abs(a - c) <= 2, (a, c)


def test_a_tenant_whose_lane_empties_hands_its_share_to_the_others() -> None:
    grants = run([Tenant("a", 10_000), Tenant("b", 100)], T0 + 40 * US)
    done = max(at for at, who, _ in grants if who == "b")
    assert done < T0 + 25 * US  # 100 mails at half the rate
    after = mails(grants, "a", done + US, T0 + 40 * US)
    assert after >= 0.97 * 10 * (T0 + 40 * US - done - US) / US  # a alone again: the whole rate


def test_a_tenant_at_its_daily_cap_does_not_hold_a_turn() -> None:
    grants = run([Tenant("a", 10_000), Tenant("capped", 1000, cap=15)], T0 + 30 * US)
    assert mails(grants, "capped") == 15
    assert mails(grants, "a", T0 + 10 * US) >= 0.97 * 200


def test_a_dead_holders_batch_is_back_in_its_lane_when_its_lease_ends() -> None:
    """A limiter took b's only batch and died: b still waits (its batch is held), and when the
    hold's lease ends its lane is present again, with its mails, for any replica to take."""
    state = State()
    b = Tenant("b", 5)
    publish(state, T0, b)
    member = "dead/1 n:b"
    version = taking.hold(state.book, T0, LEASE_US, [member])[0]
    taking.got(state.book, T0, LEASE_US, [(member, version, 5)])
    empty(state, T0 + 1, b)  # another replica finds nothing more in b's lane
    assert "n:b" not in state.book.present and "b" in state.book.tags  # held: still waiting
    assert taking.plan(state.book, T0 + 2, True, 8) == [("n:b", version)]  # listed: held somewhere
    plan = taking.plan(state.book, T0 + LEASE_US, True, 8)
    assert plan == [("n:b", version + 1)] and state.book.mails["n:b"] == 5  # present again


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
        return decide(state, now, f"{name}{now}{ahead}", 5, limits, tenants, fair=Fair(name, 1.0, ahead)).granted

    publish(state, now, Tenant("a", 100))
    assert ask("a") == 5  # alone: its whole batch from the burst, and it stays in line
    now += 3 * STEP_US
    publish(state, now, Tenant("b", 100))
    assert ask("b") == 1  # b arrives at the server's virtual time: level with a, its turn
    now += 3 * STEP_US
    assert ask("b") == 0  # now a's turn comes first ...
    finish, v = state.book.finish["b"], state.book.v
    assert ask("b", ahead=True) == 5  # ... but b's transactional mail does not wait for it
    assert state.book.finish["b"] == finish + 5  # and is counted against b's next turns
    assert state.book.v == v  # but moves nobody else's


def test_transactional_mail_does_not_push_later_tenants_back() -> None:
    """Issue 20: a high-priority grant within its ration used to move the server's virtual time
    to its own start tag: tenants arriving later joined behind every tenant waiting. Tenant A at
    weight 0.01 sends one transactional mail every 10 intervals while B has a backlog; C, arriving
    later, is served within a few turns."""
    state = State()
    limits = Limits.for_server(RATE, BURST)
    a, b, c = Tenant("a", 10**6, weight=0.01, high=True), Tenant("b", 10**6), Tenant("c", 50, from_us=T0 + 60 * US)
    publish(state, T0, a)
    publish(state, T0, b)
    now, ids = T0, itertools.count()
    first_c = None
    while now < T0 + 150 * US and first_c is None:
        if now >= c.from_us and c.name not in state.book.tags and first_c is None:
            publish(state, now, c)
        for t in (a, b, c):
            if t is a and (now - T0) % (10 * STEP_US):
                continue
            if t is c and now < c.from_us:
                continue
            tenants = [TenantAsk(t.name, 1, 10**9, local_midnights("UTC", now / US))]
            d = decide(state, now, f"{t.name}{next(ids)}", 1, limits, tenants, fair=Fair(t.name, t.weight, t.high))
            if t is c and d.granted:
                first_c = now
        now += STEP_US
    assert first_c is not None and first_c - c.from_us <= 3 * STEP_US
