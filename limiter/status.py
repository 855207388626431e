"""What the limiter knows, for ``mailpipe status``: per server and per tenant, from Redis.

Read-only: the keys ``gcra.lua`` writes (see its header), read with Redis ``TIME``, so the
rows agree with what the next decision would see. Batches waiting are in RabbitMQ (the
``batches`` queue and the limiter's park queues), which ``mailpipe status`` lists itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import redis

from limiter.gcra import US, Limits, rescale, tokens_available
from limiter.redis_limiter import day_key, server_prefix
from mailpipe.pushback import Pushback
from mailpipe.servers import Config
from mailpipe.settings import Settings

BUCKET_S = 10


def snapshot(redis_client: redis.Redis, namespace: str, config: Config,
             settings: Settings | None = None) -> list[dict[str, Any]]:
    """One row per server, then one per tenant; the limits as ``settings`` (default: the defaults) make them."""
    settings = settings or Settings()
    seconds, micros = _time(redis_client)
    now_us = seconds * US + micros
    rows: list[dict[str, Any]] = []
    paces = Pushback(redis_client, namespace).state(sorted(config.servers))
    for name, server in sorted(config.servers.items()):
        p = server_prefix(namespace, name)
        limits = Limits.of(server, settings)
        pace = paces[name]
        released = _hash(redis_client, f"{p}:released")
        lanes = _hash(redis_client, f"{p}:lanes")
        tokens: int | str = "unlimited"
        effective: float | str = "unlimited"
        if limits.interval_us:
            eff = float(pace.get("eff") or server.rate_per_hour)
            effective = min(eff, float(server.rate_per_hour))
            interval_us = limits.interval_us if effective >= server.rate_per_hour else math.ceil(US * 3600 / effective)
            rate = _hash(redis_client, f"{p}:tat")
            tat = rescale(_int(rate.get("tat")), _int(rate.get("step")), now_us, interval_us)
            tokens = tokens_available(tat, now_us, interval_us, limits.burst)
        hold_until = _int(pace.get("hold_until")) or 0
        backoff_until = _int(pace.get("backoff_until")) or 0
        rows.append({
            "kind": "server", "name": name,
            "rate_per_hour": "unlimited" if server.unlimited else server.rate_per_hour,
            "effective_rate_per_hour": effective if isinstance(effective, str) else round(effective, 1),
            "state": pace.get("state") or "active",
            "paused_until": None if pace.get("manual") == "1" or hold_until <= now_us else hold_until // US,
            "paused_by_hand": pace.get("manual") == "1",
            "held_back_until": backoff_until // US if backoff_until > now_us else None,
            "connection_cap": int(pace.get("cap") or server.concurrency or settings.send_concurrency),
            "connections_open": int(pace.get("open_connections") or 0),
            "last_change": {"reason": pace.get("reason", ""), "rule": pace.get("rule", ""),
                            "reply": pace.get("sample", ""), "at": (_int(pace.get("last_change")) or 0) // US},
            "backlog": sum(_int(v) or 0 for k, v in lanes.items() if k.startswith(("m:", "hmt:"))),
            "per_minute": server.per_minute or "",
            "released_last_minute": released_since(released, seconds - 60),
            "released_last_hour": released_since(released, seconds - 3600),
            "tokens_available": tokens, "today": "", "daily_limit": "",
        })
    for name, tenant in sorted(config.tenants.items()):
        day = _hash(redis_client, day_key(namespace, name))
        start, end = _int(day.get("day")), _int(day.get("end"))
        count = _int(day.get("n")) if start is not None and end is not None and start <= seconds < end else 0
        rows.append({
            "kind": "tenant", "name": name, "rate_per_hour": "", "per_minute": "",
            "released_last_minute": "", "released_last_hour": "", "tokens_available": "",
            "today": count or 0, "daily_limit": tenant.daily_limit,
        })
    return rows


def released_since(buckets: Mapping[str, str], since_s: int) -> int:
    """Mails in the 10 s buckets from the one holding ``since_s`` to the current one (so "the
    last minute" is 60 to 70 s, in whole buckets).

    The ring holds ``b<slot>`` = bucket number and ``c<slot>`` = mails; a slot holding an older
    bucket number is stale (its 10 s came round again without releases) and counts nothing.
    """
    first = since_s // BUCKET_S
    total = 0
    # Only the slots present: a tenant's ring is mostly empty, and status reads one per tenant.
    for field, bucket in buckets.items():
        if field.startswith("b") and int(float(bucket)) >= first:
            total += _int(buckets.get("c" + field[1:])) or 0
    return total


@dataclass(frozen=True)
class FairState:
    """One server's lanes and fair queue as Redis holds them (mailpipe/lanes_common.lua)."""

    fair: Mapping[str, str]  # v = virtual time, f:<tenant> = finish tag
    tags: Mapping[str, float]  # tenant -> start tag; the lowest goes next
    off: Mapping[str, float]  # tenant -> held off until (us): capped for today, paused
    lanes: Mapping[str, str]  # m:<lane> mails in the lane, hmt:<lane> mails of it held by limiters
    released: Mapping[str, str]  # the server's ring
    tenant_released: Mapping[str, Mapping[str, str]]  # tenant -> its ring on this server

    def backlog(self, tenant: str, prefix: str = "") -> int:
        """Mails of ``tenant`` for this server in its lanes and held by limiters (about: a crash
        may count a batch twice until its lane is found empty)."""
        lanes = [f"{p}:{tenant}" for p in (prefix,) if p] or [f"n:{tenant}", f"h:{tenant}"]
        return sum(_int(self.lanes.get(f"{kind}:{lane}")) or 0 for lane in lanes for kind in ("m", "hmt"))


def fair_rows(redis_client: redis.Redis, namespace: str, config: Config) -> list[dict[str, Any]]:
    """Rows of kind "share", per server: the tenants with mail for it, in turn order, then those
    held off and those that released on it in the last hour (see ``share_rows``).

    Two round trips whatever the number of servers and tenants: Redis TIME with every
    server's lanes and fair-share keys, then every candidate tenant's ring.
    """
    pipe = redis_client.pipeline(transaction=False)
    pipe.time()
    for name in sorted(config.servers):
        p = server_prefix(namespace, name)
        pipe.hgetall(f"{p}:fair")
        pipe.zrange(f"{p}:fair:tags", 0, -1, withscores=True)
        pipe.zrange(f"{p}:fair:off", 0, -1, withscores=True)
        pipe.hgetall(f"{p}:lanes")
        pipe.hgetall(f"{p}:released")
    replies: list[Any] = pipe.execute()
    seconds, micros = (int(x) for x in replies[0])
    now_us = seconds * US + micros

    may_use: dict[str, set[str]] = {name: set() for name in config.servers}
    for tenant_config in config.tenants.values():
        for server in config.allowed_servers(tenant_config):
            may_use.setdefault(server, set()).add(tenant_config.name)
    read: list[tuple[str, FairState, list[str]]] = []
    pipe = redis_client.pipeline(transaction=False)
    for i, name in enumerate(sorted(config.servers)):
        fair, tags, off, lanes, released = replies[1 + 5 * i: 6 + 5 * i]
        state = FairState(_decoded(fair), _scores(tags), _scores(off), _decoded(lanes), _decoded(released), {})
        # Redis may know tenants the servers file no longer routes here (a route changed
        # within the hour): they used the server all the same.
        in_lanes = {field.split(":", 2)[2] for field in state.lanes if field.startswith(("m:", "hmt:"))}
        in_fair = {field[2:] for field in state.fair if field.startswith("f:")}
        candidates = sorted(may_use[name] | state.tags.keys() | state.off.keys() | in_fair | in_lanes)
        p = server_prefix(namespace, name)
        for tenant in candidates:
            pipe.hgetall(f"{p}:released:{tenant}")
        read.append((name, state, candidates))
    rings = iter(pipe.execute())

    weights = {name: tenant_config.weight for name, tenant_config in config.tenants.items()}
    rows: list[dict[str, Any]] = []
    for name, state, candidates in read:
        state = replace(state, tenant_released={t: _decoded(next(rings)) for t in candidates})
        rows += share_rows(name, state, weights, now_us)
    return rows


def share_rows(server: str, state: FairState, weights: Mapping[str, float], now_us: int) -> list[dict[str, Any]]:
    """The tenants of one server that have mail for it (waiting, or held off), or used it within
    the hour. Waiting tenants come first in turn order (``turn`` 1 goes next), then the others,
    the busiest first. ``backlog`` is every mail of the tenant for this server: in its lanes and
    held by limiters, however large. A share is the tenant's part of the server's releases, None
    when the server released nothing in that time; weight is None for a tenant the servers file
    lacks."""
    seconds = now_us // US
    server_minute = released_since(state.released, seconds - 60)
    server_hour = released_since(state.released, seconds - 3600)
    rows: list[dict[str, Any]] = []
    for tenant in sorted(state.tags.keys() | state.off.keys() | state.tenant_released.keys()
                         | {f.split(":", 2)[2] for f in state.lanes if f.startswith(("m:", "hmt:"))}):
        ring = state.tenant_released.get(tenant, {})
        minute, hour = released_since(ring, seconds - 60), released_since(ring, seconds - 3600)
        backlog = state.backlog(tenant)
        off = state.off.get(tenant, 0)
        if not (tenant in state.tags or hour or backlog or off > now_us):
            continue
        rows.append({
            "kind": "share", "server": server, "tenant": tenant, "waiting": tenant in state.tags, "turn": None,
            "backlog": backlog, "backlog_high": state.backlog(tenant, "h"),
            "held_off_until": int(off // US) if off > now_us else None, "weight": weights.get(tenant),
            "released_last_minute": minute, "released_last_hour": hour,
            "share_last_minute": minute / server_minute if server_minute else None,
            "share_last_hour": hour / server_hour if server_hour else None,
        })
    # As ZRANGE orders the set: by start tag, then by name.
    rows.sort(key=lambda r: (0, state.tags[r["tenant"]], r["tenant"]) if r["waiting"]
              else (1, -r["backlog"], -r["released_last_hour"], r["tenant"]))
    for turn, row in enumerate((r for r in rows if r["waiting"]), start=1):
        row["turn"] = turn
    return rows


def _time(client: redis.Redis) -> tuple[int, int]:
    reply: Any = client.time()
    return int(reply[0]), int(reply[1])


def _hash(client: redis.Redis, key: str) -> dict[str, str]:
    raw: Any = client.hgetall(key)
    return _decoded(raw)


def _decoded(raw: dict[Any, Any]) -> dict[str, str]:
    return {_str(k): _str(v) for k, v in raw.items()}


def _scores(raw: list[tuple[Any, float]]) -> dict[str, float]:
    return {_str(member): float(score) for member, score in raw}


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: str | None) -> int | None:
    return None if value is None else int(float(value))
