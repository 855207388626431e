"""Redis clients for every stage: one Redis, or the primary that Redis Sentinel names.

``MAILPIPE_REDIS_SENTINELS`` set: the client asks the Sentinels for the primary of
``MAILPIPE_REDIS_MASTER`` and asks again after a failover; ``MAILPIPE_REDIS_URL`` then gives
only the database, user, password and TLS. While no primary answers, every call fails at once
(redis-py's own retries are off): each stage fails closed and backs off itself.

Replication is asynchronous, so a failover can lose the primary's last writes. With
``MAILPIPE_REDIS_WAIT_REPLICAS`` = n, the limiter's grants and the sender's claims and marks are
followed, on the same connection, by ``WAIT n``: they are used only once n replicas hold them,
and a promoted replica knows every grant and claim that was used (``not_replicated``).

Redis Cluster is not supported: a decision's keys (a server's rate and fair queue, and its
tenants' daily counts, which live under their home server's hash tag) are read and written by
one script, so they must live on one primary.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from mailpipe.errors import ConfigError
from mailpipe.settings import Settings

# How long WAIT blocks for the replicas before the write counts as not replicated.
WAIT_TIMEOUT_MS = 500


def sentinels(settings: Settings) -> list[tuple[str, int]]:
    """The Sentinels' addresses from ``MAILPIPE_REDIS_SENTINELS`` ("host:port,host:port")."""
    out: list[tuple[str, int]] = []
    for item in (i.strip() for i in settings.redis_sentinels.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"MAILPIPE_REDIS_SENTINELS: {item!r} is not host:port")
        out.append((host.strip("[]"), int(port)))
    return out


def _options(settings: Settings, timeout_s: float) -> dict[str, Any]:
    """What the URL says besides the host: database, user, password, TLS; and the timeouts."""
    parts = urlsplit(settings.redis_url)
    db = parts.path.lstrip("/")
    options: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                               "db": int(db) if db.isdigit() else 0}
    if parts.username:
        options["username"] = unquote(parts.username)
    if parts.password:
        options["password"] = unquote(parts.password)
    if parts.scheme == "rediss":
        options["ssl"] = True
    return options


def connect(settings: Settings, timeout_s: float | None = None) -> redis.Redis:
    """A client that fails fast (after ``timeout_s``, by default ``MAILPIPE_REDIS_TIMEOUT_S``):
    redis-py's own retries (with backoff, about 8 s against a refused port) would stall a
    stage's loop; the stage backs off itself and fails closed."""
    timeout_s = settings.redis_timeout_s if timeout_s is None else timeout_s
    addresses = sentinels(settings)
    if not addresses:
        return redis.Redis.from_url(settings.redis_url, socket_timeout=timeout_s,
                                    socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
    options = _options(settings, timeout_s)
    watch = redis.sentinel.Sentinel(addresses, sentinel_kwargs={  # type: ignore[no-untyped-call]
        "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s})
    client: redis.Redis = watch.master_for(  # type: ignore[no-untyped-call]
        settings.redis_master, retry=Retry(NoBackoff(), 0), **options)
    return client


def connect_async(settings: Settings) -> redis.asyncio.Redis:
    """The same, for the sender's event loop."""
    timeout_s = settings.redis_timeout_s
    addresses = sentinels(settings)
    if not addresses:
        return redis.asyncio.Redis.from_url(settings.redis_url, socket_timeout=timeout_s,
                                            socket_connect_timeout=timeout_s)
    options = _options(settings, timeout_s)
    watch = redis.asyncio.sentinel.Sentinel(addresses, sentinel_kwargs={  # type: ignore[no-untyped-call]
        "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s})
    client: redis.asyncio.Redis = watch.master_for(settings.redis_master, **options)
    return client


def not_replicated(acked: int, wanted: int, what: str) -> str | None:
    """Why a write followed by ``WAIT wanted`` (which answered ``acked``) may not be used, or
    None when enough replicas hold it."""
    if acked < wanted:
        return f"Redis: {what} reached {acked} of the {wanted} replica(s) it must (WAIT)"
    return None
