"""The pace controller's maths on its twin (``mailpipe.pushback.Controller``), no Redis: cuts,
floor, growth after a quiet period, dedupe, pause after broken replies in a row, probes and
their doubling hold, the connection cap; and what the limiter's decision makes of a cut.
``pushback.lua`` does the same (tests/integration/test_pushback_script.py)."""

from __future__ import annotations

from limiter.decide import PAUSED_RECHECK_US, PROBE_LEASE_US, Fair, State, TenantAsk, decide
from limiter.gcra import Limits, local_midnights
from mailpipe.pushback import ACTIVE, PAUSED, Controller, Policy, Signal

US = 1_000_000
T0 = 1_700_000_000 * US
POLICY = Policy(conf=3600.0, concurrency=4, step=180.0, floor=180.0)  # 1/s; floor and step 5%


def throttle(job: str, cut: float = 0.5) -> Signal:
    return Signal("rate", "rate-limited", cut, f"{job}:0", "451 4.7.1 Rate limited")


def broken(job: str) -> Signal:
    return Signal("server_broken", "auth-failed", 1.0, f"{job}:0", "535 5.7.8 Authentication failed")


def test_a_throttle_cuts_the_rate_at_most_once_per_interval_never_below_the_floor() -> None:
    c = Controller()
    assert [x.kind for x in c.report(T0, POLICY, 0, [throttle("j1")])] == ["cut"]
    assert c.eff == 1800.0
    assert c.report(T0 + 30 * US, POLICY, 0, [throttle("j2")]) == []  # the same overload: no second cut
    c.report(T0 + 60 * US, POLICY, 0, [throttle("j3", cut=0.7)])
    assert c.eff == 1800.0 * 0.7  # a vague "try later" cuts less
    for i in range(20):
        c.report(T0 + (120 + 60 * i) * US, POLICY, 0, [throttle(f"k{i}")])
    assert c.eff == POLICY.floor


def test_a_throttle_holds_grants_back_doubling_while_refusals_go_on_after_it() -> None:
    """A server whose window is full refuses every mail until it slides: after a rate signal no
    grant for a back-off (5 s), doubled by a refusal of a mail granted after it when nothing got
    through (up to the cut interval), not by the refusals of mails in flight when it began; a
    report with successes starts it over."""
    c = Controller()
    c.report(T0, POLICY, 0, [throttle("j1")])
    assert (c.backoff_us, c.backoff_until) == (5 * US, T0 + 5 * US)
    c.report(T0 + 1 * US, POLICY, 0, [throttle("j2"), throttle("j3")])  # in flight: the same hold
    assert c.backoff_until == T0 + 5 * US
    now = T0 + 5 * US
    for want_s in (10, 20, 40, 60, 60):  # each mail granted after the hold refused again
        c.report(now, POLICY, 0, [throttle(f"after{now}")])
        assert c.backoff_us == want_s * US
        now = c.backoff_until
    c.report(now, POLICY, 3, [])  # the server takes mail again
    assert c.backoff_us == 0
    c.report(now + US, POLICY, 0, [throttle("again")])
    assert c.backoff_us == 5 * US  # from the start
    c.report(c.backoff_until, POLICY, 0, [throttle("again2")])
    assert c.backoff_us == 10 * US
    mixed_at = c.backoff_until
    c.report(mixed_at, POLICY, 2, [throttle("mixed")])  # some taken, one refused: held, from the start
    assert (c.backoff_us, c.backoff_until) == (5 * US, mixed_at + 5 * US)


def test_the_same_signal_seen_by_several_senders_counts_once() -> None:
    c = Controller()
    c.report(T0, POLICY, 0, [throttle("j1")])
    assert c.report(T0 + 120 * US, POLICY, 0, [throttle("j1")]) == []  # job j1, attempt 0 again
    assert c.eff == 1800.0


def test_quiet_with_enough_successes_grows_back_by_steps_to_the_configured_rate() -> None:
    c = Controller()
    c.report(T0, POLICY, 0, [throttle("j1")])
    assert c.report(T0 + 299 * US, POLICY, 50, []) == []  # not quiet long enough
    c = Controller()
    c.report(T0, POLICY, 0, [throttle("j1")])
    assert c.report(T0 + 300 * US, POLICY, 19, []) == []  # not enough mails
    assert [x.kind for x in c.report(T0 + 301 * US, POLICY, 1, [])] == ["grew"]
    assert c.eff == 1800.0 + 180.0
    now = T0 + 301 * US
    for _ in range(20):
        now += 300 * US
        c.report(now, POLICY, 20, [])
    assert c.eff == POLICY.conf  # never above it


def test_broken_replies_in_a_row_pause_the_server_and_a_success_in_between_does_not() -> None:
    c = Controller()
    c.report(T0, POLICY, 0, [broken("j1"), broken("j2")])
    c.report(T0 + US, POLICY, 1, [])  # a success: the streak ends
    assert c.report(T0 + 2 * US, POLICY, 0, [broken("j3"), broken("j4")]) == []
    changes = c.report(T0 + 3 * US, POLICY, 0, [broken("j5")])
    assert [x.kind for x in changes] == ["paused"] and c.state == PAUSED
    assert c.hold_until == T0 + 3 * US + POLICY.hold_us


def test_a_failed_probe_doubles_the_hold_up_to_its_maximum_and_a_success_resumes_at_a_quarter() -> None:
    c = Controller()
    c.report(T0, POLICY, 0, [broken("a"), broken("b"), broken("c")])
    holds = []
    now = T0
    for i in range(6):
        now = c.hold_until
        c.state = "probing"  # the limiter granted the probe once the hold ended
        c.report(now + US, POLICY, 0, [broken(f"probe{i}")])
        holds.append(c.hold_us // US)
    assert holds == [1800, 3600, 7200, 14400, 14400, 14400]
    c.state = "probing"
    assert [x.kind for x in c.report(c.hold_until + US, POLICY, 1, [])] == ["resumed"]
    assert (c.state, c.eff) == (ACTIVE, 900.0)


def test_a_pause_by_hand_is_not_lifted_by_a_success_only_by_resume() -> None:
    c = Controller()
    c.pause(T0, POLICY)
    c.report(T0 + US, POLICY, 5, [])
    assert c.state == PAUSED
    assert [x.kind for x in c.resume(T0 + 2 * US, POLICY)] == ["resumed"] and c.state == ACTIVE


def test_the_connection_cap_goes_down_on_a_connection_signal_never_below_one() -> None:
    c = Controller()
    for i in range(6):
        c.report(T0 + i * US, POLICY, 0, [Signal("connections", "too-many-connections", 1.0, f"c{i}", "421 4.7.0")])
    assert c.cap == 1


def test_a_cut_slows_the_grants_and_shrinks_the_burst_in_proportion() -> None:
    """The limiter's decision reads the pace: after a cut to half, the interval doubles, the
    burst halves, and the debt of the grants made is counted at the new interval at once."""
    state = State()
    limits = Limits.for_server(3600, 10)
    tenants = [TenantAsk("a", 10, 10**9, local_midnights("UTC", T0 / US))]
    assert decide(state, T0, "g1", 10, limits, tenants, Fair("a")).granted == 10
    state.pushback.report(T0, POLICY, 0, [throttle("j1")])
    held = decide(state, T0, "g2", 5, limits, tenants, Fair("a"))
    assert held.granted == 0 and held.retry_after_us == POLICY.backoff_us  # the back-off first
    refused = decide(state, T0 + POLICY.backoff_us, "g2", 5, limits, tenants, Fair("a"))
    # 10 owed, now at 2 s each: 20 s of debt; with a burst of 5 (10 s), one mail fits in 12 s.
    assert refused.granted == 0 and refused.retry_after_us == 12 * US - POLICY.backoff_us
    assert decide(state, T0 + 12 * US, "g3", 5, limits, tenants, Fair("a")).granted == 1
    assert decide(state, T0 + 13 * US, "g4", 4, limits, tenants, Fair("a")).retry_after_us == US  # 1 per 2 s


def test_a_paused_server_is_granted_nothing_until_its_hold_ends_then_one_probe() -> None:
    state = State()
    limits = Limits.for_server(3600, 10)
    tenants = [TenantAsk("a", 5, 10**9, local_midnights("UTC", T0 / US))]
    state.pushback.report(T0, POLICY, 0, [broken("x"), broken("y"), broken("z")])
    # Refused until the hold ends, asked again every few seconds meanwhile (a resume by hand).
    paused = decide(state, T0 + US, "g1", 5, limits, tenants, Fair("a"))
    assert paused.granted == 0 and paused.retry_after_us == PAUSED_RECHECK_US
    assert decide(state, T0 + POLICY.hold_us - US, "g1", 5, limits, tenants, Fair("a")).granted == 0
    later = T0 + POLICY.hold_us
    assert decide(state, later, "g2", 5, limits, tenants, Fair("a")).granted == 1  # the probe
    again = decide(state, later + US, "g3", 5, limits, tenants, Fair("a"))
    assert again.granted == 0 and again.retry_after_us == PAUSED_RECHECK_US  # one probe at a time
    assert decide(state, later + PROBE_LEASE_US - US, "g4", 5, limits, tenants, Fair("a")).granted == 0
    state.pushback.resume(later + 2 * US, POLICY)
    assert decide(state, later + 3 * US, "g5", 5, limits, tenants, Fair("a")).granted == 5


def test_an_explicit_throttle_cuts_deeper_than_a_vague_try_later() -> None:
    from mailpipe.replies import classify

    explicit = classify(451, "4.7.1 Rate limited, try later", "rcpt")
    vague = classify(421, "4.7.0 Try again later, closing connection.", "mail")
    assert (explicit.signal, explicit.cut) == ("rate", 0.5)
    assert (vague.signal, vague.cut) == ("rate", 0.7)
    assert classify(550, "5.1.1 No such user", "rcpt").signal == "recipient"
