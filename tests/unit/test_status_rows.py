"""``mailpipe status``'s fair-share rows, without Redis: what ``limiter.status.share_rows`` makes
of one server's keys, and how ``mailpipe.status.share_lines`` prints them."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from limiter.status import FairState, released_since, share_rows
from mailpipe.status import share_lines

NOW_S = 1_700_000_005
NOW_US = NOW_S * 1_000_000 + 250_000
LATER = NOW_US + 3_600_000_000  # an hour from now


def ring(*buckets: tuple[int, int]) -> dict[str, str]:
    """A released ring holding (seconds ago, mails) per 10 s bucket."""
    out: dict[str, str] = {}
    for ago_s, mails in buckets:
        bucket = (NOW_S - ago_s) // 10
        out |= {f"b{bucket % 361}": str(bucket), f"c{bucket % 361}": str(mails)}
    return out


def state(tags: Mapping[str, float] | None = None, off: Mapping[str, float] | None = None,
          backlog: Mapping[str, int] | None = None, released: Mapping[str, str] | None = None,
          tenant_released: Mapping[str, Mapping[str, str]] | None = None) -> FairState:
    """``backlog``: mails in a tenant's lane (a tenth more held by a limiter)."""
    lanes = {f"m:n:{t}": str(n) for t, n in (backlog or {}).items()}
    lanes |= {f"hmt:n:{t}": str(n // 10) for t, n in (backlog or {}).items()}
    return FairState({"v": "12.5"}, tags or {}, off or {}, lanes, released or {}, tenant_released or {})


def by_tenant(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["tenant"]: r for r in rows}


def test_released_since_counts_whole_buckets_and_skips_stale_slots() -> None:
    buckets = ring((0, 5), (65, 7), (1800, 11))
    stale = (NOW_S - 3620) // 10  # its slot came round again without releases
    buckets |= {f"b{stale % 361}": str(stale), f"c{stale % 361}": "1000"}
    assert released_since(buckets, NOW_S - 60) == 5 + 7  # 65 s ago shares a bucket with 60 s ago
    assert released_since(buckets, NOW_S - 3600) == 5 + 7 + 11
    assert released_since({}, NOW_S - 3600) == 0


def test_waiting_tenants_come_in_turn_order_with_their_backlog_and_weight() -> None:
    rows = share_rows("own", state(tags={"acme": 20.0, "beta": 12.5, "zed": 12.5},
                                   backlog={"acme": 300, "beta": 70}),
                      {"acme": 3.0, "beta": 1.0}, NOW_US)
    assert [(r["tenant"], r["turn"]) for r in rows] == [("beta", 1), ("zed", 2), ("acme", 3)]
    assert all(r["kind"] == "share" and r["server"] == "own" and r["waiting"] for r in rows)
    assert [r["backlog"] for r in rows] == [77, 0, 330]  # in the lane and held
    assert [r["weight"] for r in rows] == [1.0, None, 3.0], "zed is not in the servers file"


def test_a_tenant_held_off_is_listed_with_its_backlog_but_holds_no_turn() -> None:
    rows = by_tenant(share_rows("own", state(tags={"beta": 2.0}, off={"acme": LATER, "past": NOW_US},
                                             backlog={"acme": 5000}), {}, NOW_US))
    assert {t: (r["waiting"], r["turn"], r["held_off_until"]) for t, r in rows.items()} == {
        "acme": (False, None, LATER // 1_000_000), "beta": (True, 1, None)}
    assert rows["acme"]["backlog"] == 5500


def test_shares_are_of_the_servers_releases_and_none_when_it_released_nothing() -> None:
    rows = by_tenant(share_rows(
        "own",
        state(tags={"acme": 1.0},
              released=ring((5, 40), (1800, 60)),
              tenant_released={"acme": ring((5, 30), (1800, 20)), "beta": ring((5, 10)),
                               "gamma": ring((1800, 40)), "idle": ring((3700, 9))}),
        {}, NOW_US))
    assert set(rows) == {"acme", "beta", "gamma"}, "idle released over an hour ago and does not wait"
    shares = {t: (r["share_last_minute"], r["share_last_hour"]) for t, r in rows.items()}
    assert shares == {"acme": (0.75, 0.5), "beta": (0.25, 0.1), "gamma": (0.0, 0.4)}
    assert [r["tenant"] for r in rows.values()] == ["acme", "gamma", "beta"], "then the busiest first"

    nothing = share_rows("own", state(tags={"acme": 1.0}), {}, NOW_US)
    assert (nothing[0]["share_last_minute"], nothing[0]["share_last_hour"]) == (None, None)


def test_share_lines_print_a_table_per_server_with_blanks_for_none() -> None:
    rows = [
        {"kind": "share", "server": "own", "tenant": "acme", "waiting": True, "turn": 1, "backlog": 300,
         "weight": 3.0, "share_last_minute": 0.75, "share_last_hour": 0.5},
        {"kind": "share", "server": "own", "tenant": "gamma-long-name", "waiting": False, "turn": None,
         "backlog": 0, "weight": None, "share_last_minute": None, "share_last_hour": 0.4},
        {"kind": "share", "server": "bulk", "tenant": "beta", "waiting": True, "turn": 1, "backlog": 7,
         "weight": 0.5, "share_last_minute": None, "share_last_hour": None},
    ]
    lines = share_lines(rows)
    assert lines.index("fair share on own") < lines.index("fair share on bulk")
    own = lines[lines.index("fair share on own") + 1: lines.index("fair share on own") + 4]
    assert own[0].split() == ["tenant", "waiting", "turn", "backlog", "weight", "share", "1", "min", "share", "1", "h"]
    assert own[1].split() == ["acme", "yes", "1", "300", "3", "0.75", "0.50"]
    assert own[2].split() == ["gamma-long-name", "no", "0", "0.40"]
    assert len({len(line) for line in own}) == 1, "the columns line up"
    assert share_lines([]) == []


def test_paused_tenants_come_right_after_the_servers_with_why() -> None:
    from mailpipe.status import paused_lines

    assert paused_lines({}) == []
    lines = paused_lines({"acme": "bulk mail to shared servers paused: 10.4% hard bounces"})
    assert "mailpipe tenants resume" in lines[1] and "acme: bulk mail" in lines[2]


def test_the_servers_come_first_with_their_state_effective_rate_and_why() -> None:
    from mailpipe.settings import Settings
    from mailpipe.status import queue_lines, server_lines

    def server(name: str, state: str, effective: float, **extra: Any) -> dict[str, Any]:
        return {"kind": "server", "name": name, "state": state, "rate_per_hour": 6000,
                "effective_rate_per_hour": effective, "connection_cap": 2, "connections_open": 1, "backlog": 40_000,
                "released_last_minute": 12, "released_last_hour": 700, "paused_until": None,
                "paused_by_hand": False, "last_change": {}, **extra}

    lines = server_lines([
        server("platform", "active", 6000.0),
        server("acme-smtp", "active", 1500.0, held_back_until=NOW_S + 20,
               last_change={"reason": "throttled", "rule": "rate-limited", "reply": "451 4.7.1 Rate limited"}),
        server("globex", "paused", 6000.0, paused_until=NOW_S + 900,
               last_change={"reason": "broken", "rule": "auth-failed", "reply": "535 5.7.8 Authentication failed"}),
    ])
    assert lines[0] == "servers" and lines[1].split()[:4] == ["server", "state", "rate/h", "effective/h"]
    assert lines[2].split()[:4] == ["platform", "active", "6000", "6000"] and "40000" in lines[2]
    held_to = time.strftime("%H:%M:%S", time.localtime(NOW_S + 20))
    assert lines[3].split()[:5] == ["acme-smtp", "throttled,", "held", "to", held_to]
    assert lines[3].split()[5:7] == ["6000", "1500"]
    assert "throttled (rate-limited): 451 4.7.1 Rate limited" in lines[4]
    assert lines[5].split()[:4] == ["globex", "paused,", "probe", "at"]
    assert "broken (auth-failed): 535 5.7.8" in lines[6] and "mailpipe servers resume globex" in lines[7]
    queues = queue_lines(Settings(namespace="ns"), {"ns.jobs": 3, "ns.retry.60s": 5, "ns.retry.120s": 2,
                                                    "ns.lane.s.a": 7, "ns.lane.s.b": 1}, all_queues=False)
    assert [line.split()[:2] for line in queues[2:]] == [["ns.jobs", "3"], ["ns.retry.*", "(2"], ["ns.lanes.*", "(2"]]
    assert queues[3].split()[-1] == "7" and queues[4].split()[-1] == "8"
    assert len(queue_lines(Settings(namespace="ns"), {"ns.retry.60s": 5, "ns.lane.s.a": 7}, all_queues=True)) == 4
