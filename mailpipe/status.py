"""``mailpipe status``: the servers (state, effective rate, backlog), the tenants and their turns,
the queues and the dead letters."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from mailpipe.amqp import Broker
from mailpipe.settings import Settings
from mailpipe.topology import Topology


def queue_depths(settings: Settings, lanes: Iterable[str] = ()) -> dict[str, int]:
    """Messages ready in every queue of the namespace, and in ``lanes`` (those that still exist)."""
    topology = Topology.from_settings(settings)
    broker = Broker(settings.amqp_endpoints, client_name="mailpipe-status").connect()
    try:
        topology.declare(broker.channel())
        depths = {q: broker.channel().queue_declare(q, passive=True).method.message_count
                  for q in topology.all_queues}
        for lane in sorted(lanes):
            count = broker.message_count(lane)
            if count is not None:
                depths[lane] = count
        return depths
    finally:
        broker.close()


def dead_by_reason(settings: Settings, limit: int = 10_000) -> dict[str, int]:
    """Dead letters counted by category (the first ``limit``; they stay in the queue)."""
    from mailpipe.dead import DeadQueue

    with DeadQueue(settings) as dead:
        return dict(Counter(d.category or "unknown" for d in dead.letters(limit)))


def show_status(settings: Settings, limits: list[dict[str, Any]], as_json: bool = False,
                paused: dict[str, str] | None = None, lanes: Iterable[str] = (), all_queues: bool = False) -> int:
    """What an operator asks first: the servers (state, effective rate, backlog), the tenants
    held back, each server's tenants and their turns; then the queues, the retry, scheduled and
    lane queues folded into one line each unless ``all_queues``; then the dead letters."""
    depths = queue_depths(settings, lanes)
    dead = dead_by_reason(settings)
    paused = paused or {}
    servers = [row for row in limits if row.get("kind") == "server"]
    tenants = [row for row in limits if row.get("kind") == "tenant"]
    shares = [row for row in limits if row.get("kind") == "share"]
    if as_json:
        print(json.dumps({"servers": servers, "tenants": tenants, "shares": shares, "queues": depths,
                          "limits": limits, "dead_by_reason": dead, "paused_tenants": paused}))
        return 0
    lines = [*server_lines(servers), *paused_lines(paused), *tenant_lines(tenants), *share_lines(shares), "",
             *queue_lines(settings, depths, all_queues)]
    problems = [row for row in limits if "limiter" in row]
    lines += [f"limiter: {row['limiter']}" for row in problems]
    if dead:
        lines += ["", "dead letters by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(dead.items()))]
    print("\n".join(lines))
    return 0


SERVER_COLUMNS = ("server", "state", "rate/h", "effective/h", "conns", "backlog", "sent 1 min", "sent 1 h")


def server_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per server: its state, configured and effective rate, connections (open of the
    cap), the mails waiting for it, its releases; under a server that is not at full pace, why."""
    if not rows:
        return []
    cells = [(r["name"], _state(r), str(r["rate_per_hour"]), _rate(r["effective_rate_per_hour"]),
              f"{r['connections_open']}/{r['connection_cap']}", str(r["backlog"]), str(r["released_last_minute"]),
              str(r["released_last_hour"])) for r in rows]
    lines = _table(SERVER_COLUMNS, cells)
    out = ["servers"]
    for row, line in zip(rows, lines[1:], strict=True):
        out.append(line)
        change = row.get("last_change") or {}
        slowed = isinstance(row["effective_rate_per_hour"], float | int) and row["rate_per_hour"] != "unlimited" \
            and row["effective_rate_per_hour"] < row["rate_per_hour"]
        if (row["state"] != "active" or slowed) and change.get("reason"):
            reply = f": {change['reply']}" if change.get("reply") else ""
            out.append(f"      {change['reason']} ({change.get('rule') or 'no rule'}){reply}")
            if row["state"] != "active":
                out.append(f"      `mailpipe servers resume {row['name']}` once it is fixed")
    return [out[0], lines[0], *out[1:]]


def _state(row: dict[str, Any]) -> str:
    if row["state"] == "paused" and row.get("paused_until"):
        return "paused, probe at " + time.strftime("%H:%M", time.localtime(row["paused_until"]))
    if row["state"] == "paused" and row.get("paused_by_hand"):
        return "paused by hand"
    if row["state"] == "active" and row.get("held_back_until"):
        return "throttled, held to " + time.strftime("%H:%M:%S", time.localtime(row["held_back_until"]))
    return str(row["state"])


def _rate(value: object) -> str:
    return f"{value:g}" if isinstance(value, float | int) else str(value)


def tenant_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    cells = [(r["name"], str(r["today"]), str(r["daily_limit"])) for r in rows]
    return ["", "tenants", *_table(("tenant", "sent today", "daily limit"), cells)]


def queue_lines(settings: Settings, depths: dict[str, int], all_queues: bool) -> list[str]:
    """The queues with their ready messages; retry, scheduled and lane queues folded into one
    line each (their count and total) unless ``all_queues`` (``mailpipe status --queues``)."""
    ns = settings.namespace
    folds = {"retry": f"{ns}.retry.", "scheduled": f"{ns}.scheduled.", "lanes": f"{ns}.lane."}
    rows: list[tuple[str, str]] = []
    folded: dict[str, list[int]] = {name: [] for name in folds}
    for queue, depth in depths.items():
        fold = next((name for name, prefix in folds.items() if queue.startswith(prefix)), None)
        if fold is None or all_queues:
            rows.append((queue, str(depth)))
        else:
            folded[fold].append(depth)
    for name, counts in folded.items():
        if counts:
            rows.append((f"{ns}.{name}.* ({len(counts)} queues)", str(sum(counts))))
    return ["queues (ready messages)" + ("" if all_queues else "; all of them: --queues"),
            *_table(("queue", "ready"), rows)]


def _table(columns: tuple[str, ...], cells: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(c) for c in column) for column in zip(columns, *cells, strict=True)]
    return ["  " + "  ".join([line[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(line[1:], widths[1:],
                                                                                     strict=True))])
            for line in (columns, *cells)]


def paused_lines(paused: dict[str, str]) -> list[str]:
    """Tenants whose bulk mail to shared servers waits, and why (mailpipe/reputation.py): first,
    since it is what an operator must act on."""
    if not paused:
        return []
    lines = ["", "tenants paused: their bulk mail to shared servers waits (`mailpipe tenants resume NAME`)"]
    lines += [f"  {tenant}: {why}" for tenant, why in sorted(paused.items())]
    return lines


SHARE_COLUMNS = ("tenant", "waiting", "turn", "backlog", "weight", "share 1 min", "share 1 h")


def share_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The limiter's "share" rows as one table per server, in the rows' order (turn order)."""
    if not rows:
        return []
    lines = ["", "tenants waiting for each server, in turn order, then the others with mail for it or that "
                 "released on it in the last hour (share: the tenant's part of the server's releases)"]
    for server in dict.fromkeys(row["server"] for row in rows):
        cells = [(row["tenant"], _waiting(row), _blank(row["turn"]), str(row["backlog"]),
                  _blank(row["weight"], "g"), _blank(row["share_last_minute"], ".2f"),
                  _blank(row["share_last_hour"], ".2f"))
                 for row in rows if row["server"] == server]
        widths = [max(len(c) for c in column) for column in zip(SHARE_COLUMNS, *cells, strict=True)]
        lines += ["", f"fair share on {server}"]
        for line in (SHARE_COLUMNS, *cells):
            lines.append("  " + "  ".join([line[0].ljust(widths[0]),
                                           *(c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True))]))
    return lines


def _waiting(row: dict[str, Any]) -> str:
    if row["waiting"]:
        return "yes"
    if row.get("held_off_until"):
        return "held off to " + time.strftime("%H:%M", time.localtime(row["held_off_until"]))
    return "no"


def _blank(value: float | int | None, spec: str = "") -> str:
    return "" if value is None else format(value, spec)
