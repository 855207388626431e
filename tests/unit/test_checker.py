"""The fault campaign's checker on hand-made runs: each check passes what it must pass and fails
what it must fail."""

from __future__ import annotations

import json
import random

from tests.faults.checker import (
    Dead,
    Fault,
    check,
    claim_held,
    classify_duplicates,
    lost_recipients,
    max_in_window,
    rate_windows,
)
from tests.faults.ledger import CUT_GRACE_S, Acceptance, Cut

R3 = ("a@example.com", "b@example.com", "c@example.com")


def acc(job: str, at: float, port: int = 1000, rcpts: tuple[str, ...] = R3) -> Acceptance:
    return Acceptance(job, rcpts, at, port)


# -- lost -------------------------------------------------------------------------------------------

def test_every_recipient_accepted_or_dead_is_not_lost() -> None:
    confirmed = {"j1": R3, "j2": R3, "j3": R3}
    accepted = [acc("j1", 1.0), acc("j2", 2.0, rcpts=R3[:2])]
    dead = [Dead("j2", (R3[2],), "550 no such user"), Dead("j3", (), "batch refused")]
    lost, failed, delivered = lost_recipients(confirmed, accepted, dead)
    assert lost == []
    assert delivered == 5
    assert sorted(failed) == [("j2", R3[2]), ("j3", R3[0]), ("j3", R3[1]), ("j3", R3[2])]


def test_a_recipient_neither_accepted_nor_dead_is_lost() -> None:
    confirmed = {"j1": R3, "j2": R3}
    accepted = [acc("j1", 1.0, rcpts=(R3[0], R3[2].upper())), acc("j2", 2.0)]
    lost, _failed, _delivered = lost_recipients(confirmed, accepted, [Dead("other", (), "x")])
    assert lost == [("j1", R3[1])]


def test_a_dead_letter_for_one_recipient_does_not_cover_the_others() -> None:
    lost, failed, _ = lost_recipients({"j1": R3}, [], [Dead("j1", (R3[0],), "550")])
    assert failed == [("j1", R3[0])]
    assert lost == [("j1", R3[1]), ("j1", R3[2])]


# -- duplicates --------------------------------------------------------------------------------------

def test_a_copy_cut_by_a_kill_within_the_grace_is_explained() -> None:
    accepted = [acc("j0", 9.0, port=1000), acc("j1", 10.0, port=1000), acc("j1", 14.0, port=2000)]
    # The kill comes after the 250 (the sender never marked it), or the buffered mail lands just after.
    for cut_at in (10.5, 10.0 - CUT_GRACE_S + 0.01):
        dups = classify_duplicates(accepted, [Cut(1000, cut_at, "sender-0 killed")])
        assert [(d.job_id, d.explained) for d in dups] == [("j1", True)] * 3
        assert "sender-0 killed" in dups[0].evidence[0]


def test_a_copy_on_a_reset_connection_is_explained() -> None:
    accepted = [acc("j1", 10.0, port=1000), acc("j1", 12.0, port=2000)]
    dups = classify_duplicates(accepted, [Cut(1000, 10.2, "proxy reset")])
    assert all(d.explained for d in dups) and len(dups) == 3


def test_a_copy_whose_reply_the_proxy_dropped_is_explained() -> None:
    accepted = [acc("j1", 10.0, port=1000), acc("j1", 15.0, port=2000)]
    dups = classify_duplicates(accepted, lost_replies=[Cut(1000, 10.01, "250 dropped")])
    assert all(d.explained for d in dups)
    assert "lost reply" in dups[0].evidence[0]


def test_a_duplicate_without_a_fault_on_its_connection_is_unexplained() -> None:
    accepted = [acc("j1", 10.0, port=1000), acc("j1", 11.0, port=2000)]
    dups = classify_duplicates(accepted, [Cut(3000, 10.1, "sender-1 killed")],
                               [Cut(4000, 10.01, "250 dropped")])
    assert len(dups) == 3 and not any(d.explained for d in dups)
    assert dups[0].evidence[0].startswith("UNEXPLAINED")


def test_a_copy_accepted_long_after_the_cut_is_unexplained() -> None:
    # The connection was cut, then the port was used again: the copy is not the cut's.
    accepted = [acc("j1", 10.0 + CUT_GRACE_S + 0.5, port=1000), acc("j1", 20.0, port=2000)]
    dups = classify_duplicates(accepted, [Cut(1000, 10.0, "sender-0 killed")])
    assert not any(d.explained for d in dups)


def test_only_the_last_mail_on_a_cut_connection_is_explained() -> None:
    # j1 was followed by j2 on the same connection: the sender had marked j1 before sending j2.
    accepted = [acc("j1", 10.0, port=1000), acc("j2", 10.2, port=1000),
                acc("j1", 12.0, port=2000), acc("j2", 12.1, port=2000)]
    dups = classify_duplicates(accepted, [Cut(1000, 10.3, "sender-0 killed")])
    assert {d.job_id: d.explained for d in dups} == {"j1": False, "j2": True}


def test_a_reply_dropped_long_after_the_acceptance_explains_nothing() -> None:
    accepted = [acc("j1", 10.0, port=1000), acc("j1", 20.0, port=2000)]
    dups = classify_duplicates(accepted, lost_replies=[Cut(1000, 10.0 + CUT_GRACE_S + 1, "dropped")])
    assert not any(d.explained for d in dups)


def test_every_earlier_copy_needs_its_own_evidence() -> None:
    accepted = [acc("j1", 10.0, port=1000), acc("j1", 11.0, port=2000), acc("j1", 12.0, port=3000)]
    half = classify_duplicates(accepted, [Cut(1000, 10.1, "proxy reset")])
    assert not any(d.explained for d in half)
    full = classify_duplicates(accepted, [Cut(1000, 10.1, "proxy reset"), Cut(2000, 11.1, "proxy reset")])
    assert all(d.explained for d in full) and len(full[0].evidence) == 2


def test_a_duplicate_of_one_recipient_only_is_counted_for_that_recipient() -> None:
    accepted = [acc("j1", 10.0, port=1000), acc("j1", 11.0, port=2000, rcpts=(R3[1],))]
    dups = classify_duplicates(accepted)
    assert [(d.recipient, d.explained) for d in dups] == [(R3[1], False)]


# -- rate --------------------------------------------------------------------------------------------

def brute_max(times: list[float], w: float) -> int:
    return max((sum(1 for u in times if t <= u <= t + w) for t in times), default=0)


def test_max_in_window_counts_a_closed_window() -> None:
    assert max_in_window([], 1.0) == (0, 0.0)
    assert max_in_window([5.0], 1.0) == (1, 5.0)
    assert max_in_window([0.0, 1.0, 2.0], 1.0)[0] == 2  # both ends are in [t, t + 1]
    assert max_in_window([0.0, 1.0001, 2.0], 1.0)[0] == 2
    assert max_in_window([3.0, 0.0, 0.5, 0.9, 2.0], 1.0) == (3, 0.0)


def test_max_in_window_agrees_with_brute_force() -> None:
    rng = random.Random(7)
    for _ in range(200):
        times = [round(rng.uniform(0, 20), rng.choice((0, 1, 3))) for _ in range(rng.randint(0, 60))]
        for w in (0.5, 1.0, 10.0):
            assert max_in_window(times, w)[0] == brute_max(times, w)


def test_an_even_flow_at_the_rate_plus_one_burst_is_within_every_bound() -> None:
    times = [i * 0.001 for i in range(20)] + [1 + i * 0.1 for i in range(600)]  # burst, then 10/s
    assert all(w.ok for w in rate_windows(times, 10, 20))


def test_a_burst_above_the_bound_fails_the_one_second_window() -> None:
    times = [i * 0.1 for i in range(100)] + [20 + i * 0.01 for i in range(31)]  # 31 in 0.3 s
    results = {w.window_s: w for w in rate_windows(times, 10, 20)}
    assert not results[1.0].ok and results[1.0].worst == 31 and results[1.0].bound == 30
    assert results[1.0].start == 20.0


def test_a_steady_excess_fails_only_the_long_window() -> None:
    times = [i / 11.5 for i in range(int(11.5 * 70))]  # 11.5/s for 70 s: 15% over a 10/s rate
    results = {w.window_s: w for w in rate_windows(times, 10, 20)}
    assert results[1.0].ok and results[10.0].ok
    assert not results[60.0].ok and results[60.0].worst > 620


# -- claims ------------------------------------------------------------------------------------------

def test_claim_held_only_while_a_hold_lease_runs() -> None:
    now = 1_700_000_000_000_000
    assert not claim_held([], now)
    assert not claim_held(["s", "r g1", b"s"], now)
    assert claim_held(["s", f"h sender-0 {now + 1} g1"], now)
    assert claim_held([f"h sender-0 {now + 5} g1".encode()], now)
    assert not claim_held([f"h sender-0 {now} g1", f"h x {now - 10} g2"], now)
    assert claim_held(["h garbled"], now)  # unreadable: held, never "drained" by mistake


# -- the whole report --------------------------------------------------------------------------------

def test_a_clean_run_passes_and_prints_json() -> None:
    confirmed = {"j1": R3, "j2": R3}
    accepted = [acc("j1", 100.0, 1000), acc("j2", 100.5, 1000), acc("j2", 101.0, 2000), acc("late", 102.0)]
    report = check(seed=3, confirmed=confirmed, accepted=accepted, cuts=[Cut(1000, 100.6, "sender-1 killed")],
                   rate_per_s=10, burst=20, attempted=["j1", "j2", "late"], origin=99.0,
                   faults=[Fault(1.5, "kill", "sender-1")])
    assert report.ok, report.violations()
    data = json.loads(report.to_json())
    assert data["seed"] == 3 and data["mails"] == 2 and data["recipients"] == 6
    assert data["delivered"] == 6 and data["lost"] == 0 and data["unconfirmed_publishes"] == 1
    assert data["duplicates"] == {**data["duplicates"], "explained": 3, "unexplained": 0}
    assert [w["bound"] for w in data["windows"]] == [30, 120, 620]
    assert data["faults"][0]["kind"] == "kill"


def test_a_run_fails_on_each_kind_of_violation() -> None:
    confirmed = {"j1": R3, "j2": R3}
    lost = check(seed=1, confirmed=confirmed, accepted=[acc("j1", 1.0)], rate_per_s=10, burst=20)
    assert lost.lost == 3 and not lost.ok
    dup = check(seed=1, confirmed=confirmed, accepted=[acc("j1", 1.0), acc("j2", 1.1), acc("j2", 5.0, 2000)],
                rate_per_s=10, burst=20)
    assert len(dup.unexplained) == 3 and not dup.ok
    burst = [acc(f"b{i}", 50 + i * 0.01) for i in range(31)]
    fast = check(seed=1, confirmed={a.job_id: R3 for a in burst}, accepted=burst, rate_per_s=10, burst=20)
    assert not fast.ok and "31 transactions in 1 s" in fast.violations()[0]
    stray = check(seed=1, confirmed={"j1": R3}, accepted=[acc("j1", 1.0), acc("zz", 2.0)],
                  rate_per_s=10, burst=20)
    assert not stray.ok and stray.unexpected == ["zz"]
    noted = check(seed=1, confirmed={}, accepted=[], rate_per_s=10, burst=20, notes=["did not drain"])
    assert noted.violations() == ["did not drain"]


def test_a_dead_letter_is_a_violation_only_where_nothing_refuses_mail_for_good() -> None:
    confirmed = {"j1": R3, "j2": R3}
    dead = [Dead("j2", (), "expired after 3 attempt(s)")]
    allowed = check(seed=1, confirmed=confirmed, accepted=[acc("j1", 1.0)], dead=dead, rate_per_s=10, burst=20)
    assert allowed.ok and allowed.failed == 3
    refused = check(seed=1, confirmed=confirmed, accepted=[acc("j1", 1.0)], dead=dead, rate_per_s=10, burst=20,
                    failed_is_violation=True)
    assert not refused.ok and refused.lost == 0
    assert refused.violations() == ["3 recipients dead-lettered where nothing refuses mail for good: "
                                    "{'expired after 3 attempt(s)': 1}"]
