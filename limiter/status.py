"""What the limiter knows, for ``mailpipe status``: per server and per tenant, from Redis.

Read-only: the keys ``gcra.lua`` writes (see its header), read with Redis ``TIME``, so the
rows agree with what the next decision would see. Batches waiting are in RabbitMQ (the
``batches`` queue and the limiter's park queues), which ``mailpipe status`` lists itself.
"""

from __future__ import annotations

from typing import Any

import redis

from limiter.gcra import (
    US,
    Limits,
    day_of,
    local_midnights,
    rescale,
    server_prefix,
    tenant_day_key,
    tokens_available,
)
from mailpipe.servers import Config
from mailpipe.settings import Settings

BUCKET_S = 10
SLOTS = 361


def snapshot(redis_client: redis.Redis, namespace: str, config: Config,
             settings: Settings | None = None) -> list[dict[str, Any]]:
    """One row per server, then one per tenant; the limits as ``settings`` (default: the defaults) make them."""
    settings = settings or Settings()
    seconds, micros = _time(redis_client)
    now_us = seconds * US + micros
    rows: list[dict[str, Any]] = []
    for name, server in sorted(config.servers.items()):
        p = server_prefix(namespace, name)
        limits = Limits.of(server, settings)
        released = _hash(redis_client, f"{p}:released")
        tokens: int | str = "unlimited"
        if limits.interval_us:
            rate = _hash(redis_client, f"{p}:tat")
            tat = rescale(_int(rate.get("tat")), _int(rate.get("step")), now_us, limits.interval_us)
            tokens = tokens_available(tat, now_us, limits.interval_us, limits.burst)
        rows.append({
            "kind": "server", "name": name,
            "rate_per_hour": "unlimited" if server.unlimited else server.rate_per_hour,
            "per_minute": server.per_minute or "",
            "released_last_minute": released_since(released, seconds - 60),
            "released_last_hour": released_since(released, seconds - 3600),
            "tokens_available": tokens, "today": "", "daily_limit": "",
        })
    for name, tenant in sorted(config.tenants.items()):
        day = _hash(redis_client, tenant_day_key(namespace, tenant.server, name))
        today, _ = day_of(local_midnights(tenant.timezone, seconds), seconds)
        count = _int(day.get("n")) if _int(day.get("day")) == today else 0
        rows.append({
            "kind": "tenant", "name": name, "rate_per_hour": "", "per_minute": "",
            "released_last_minute": "", "released_last_hour": "", "tokens_available": "",
            "today": count or 0, "daily_limit": tenant.daily_limit,
        })
    return rows


def released_since(buckets: dict[str, str], since_s: int) -> int:
    """Mails in the 10 s buckets from the one holding ``since_s`` to the current one (so "the
    last minute" is 60 to 70 s, in whole buckets).

    The ring holds ``b<slot>`` = bucket number and ``c<slot>`` = mails; a slot holding an older
    bucket number is stale (its 10 s came round again without releases) and counts nothing.
    """
    first = since_s // BUCKET_S
    total = 0
    for slot in range(SLOTS):
        bucket = _int(buckets.get(f"b{slot}"))
        if bucket is not None and bucket >= first:
            total += _int(buckets.get(f"c{slot}")) or 0
    return total


def _time(client: redis.Redis) -> tuple[int, int]:
    reply: Any = client.time()
    return int(reply[0]), int(reply[1])


def _hash(client: redis.Redis, key: str) -> dict[str, str]:
    raw: Any = client.hgetall(key)
    return {(k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in raw.items()}


def _int(value: str | None) -> int | None:
    return None if value is None else int(float(value))
