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
    broker = Broker(settings.amqp_url, client_name="mailpipe-status").connect()
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


def show_status(settings: Settings, limits: list[dict[str, Any]], as_json: bool = False) -> int:
    depths = queue_depths(settings)
    dead = dead_by_reason(settings)
    if as_json:
        print(json.dumps({"queues": depths, "limits": limits, "dead_by_reason": dead}))
        return 0
    print(f"{'queue':40} {'ready':>8}")
    for queue, depth in depths.items():
        print(f"{queue:40} {depth:>8}")
    if dead:
        print("\ndead letters by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(dead.items())))
    if limits:
        columns = list(limits[0])
        print()
        print("  ".join(f"{c:>14}" for c in columns))
        for row in limits:
            print("  ".join(f"{row.get(c, '')!s:>14}" for c in columns))
    return 0
