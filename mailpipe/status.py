"""``mailpipe status``: queue depths and, where the limiter reports them, rates and caps."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from mailpipe.amqp import Broker
from mailpipe.settings import Settings
from mailpipe.topology import Topology


def queue_depths(settings: Settings) -> dict[str, int]:
    topology = Topology.from_settings(settings)
    broker = Broker(settings.amqp_endpoints, client_name="mailpipe-status").connect()
    try:
        topology.declare(broker.channel())
        return {q: broker.channel().queue_declare(q, passive=True).method.message_count
                for q in topology.all_queues}
    finally:
        broker.close()


def dead_by_reason(settings: Settings, limit: int = 10_000) -> dict[str, int]:
    """Dead letters counted by category (the first ``limit``; they stay in the queue)."""
    from mailpipe.dead import DeadQueue

    with DeadQueue(settings) as dead:
        return dict(Counter(d.category or "unknown" for d in dead.letters(limit)))


def show_status(settings: Settings, limits: list[dict[str, Any]], as_json: bool = False,
                paused: dict[str, str] | None = None) -> int:
    depths = queue_depths(settings)
    dead = dead_by_reason(settings)
    paused = paused or {}
    if as_json:
        print(json.dumps({"queues": depths, "limits": limits, "dead_by_reason": dead, "paused_tenants": paused}))
        return 0
    for line in paused_lines(paused):
        print(line)
    print(f"{'queue':40} {'ready':>8}")
    for queue, depth in depths.items():
        print(f"{queue:40} {depth:>8}")
    if dead:
        print("\ndead letters by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(dead.items())))
    table = [row for row in limits if row.get("kind") != "share"]
    if table:
        columns = list(table[0])
        print()
        print("  ".join(f"{c:>14}" for c in columns))
        for row in table:
            print("  ".join(f"{row.get(c, '')!s:>14}" for c in columns))
    for line in share_lines([row for row in limits if row.get("kind") == "share"]):
        print(line)
    return 0


def paused_lines(paused: dict[str, str]) -> list[str]:
    """Tenants whose bulk mail to shared servers waits, and why (mailpipe/reputation.py): first,
    since it is what an operator must act on."""
    if not paused:
        return []
    lines = ["tenants paused: their bulk mail to shared servers waits (`mailpipe tenants resume NAME`)"]
    lines += [f"  {tenant}: {why}" for tenant, why in sorted(paused.items())]
    return [*lines, ""]


SHARE_COLUMNS = ("tenant", "waiting", "turn", "backlog", "weight", "share 1 min", "share 1 h")


def share_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The limiter's "share" rows as one table per server, in the rows' order (turn order)."""
    if not rows:
        return []
    lines = ["", "tenants waiting for each server, in turn order, then the others that released on it in the "
                 "last hour (share: the tenant's part of the server's releases)"]
    for server in dict.fromkeys(row["server"] for row in rows):
        cells = [(row["tenant"], "yes" if row["waiting"] else "no", _blank(row["turn"]), str(row["backlog"]),
                  _blank(row["weight"], "g"), _blank(row["share_last_minute"], ".2f"),
                  _blank(row["share_last_hour"], ".2f"))
                 for row in rows if row["server"] == server]
        widths = [max(len(c) for c in column) for column in zip(SHARE_COLUMNS, *cells, strict=True)]
        lines += ["", f"fair share on {server}"]
        for line in (SHARE_COLUMNS, *cells):
            lines.append("  " + "  ".join([line[0].ljust(widths[0]),
                                           *(c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True))]))
    return lines


def _blank(value: float | int | None, spec: str = "") -> str:
    return "" if value is None else format(value, spec)
