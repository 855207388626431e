"""The sender's SMTP event loop, in a thread of its own, and what lives on it: the connection
pools, the asyncio Redis client and the claims. The stage's own thread serves RabbitMQ and
hands deliveries over with ``submit``; several batches are then in flight at once, and SMTP
connections outlive the batches that opened them."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import redis.asyncio

from mailpipe import redis_client
from mailpipe.errors import RedisUnavailable
from mailpipe.pushback import ConnectionLeases
from mailpipe.settings import Settings
from sender.claims import Claims
from sender.mx import MxResolver
from sender.pool import LEASE_S, Pools

log = logging.getLogger(__name__)

T = TypeVar("T")


class LoopHost:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.pools: Pools | None = None
        self.pace: ConnectionLeases | None = None  # the servers' pace: connection caps, pauses
        self._redis: redis.asyncio.Redis | None = None
        self._claims: Claims | None = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self) -> asyncio.AbstractEventLoop:
        """Start the loop and open what lives on it, once."""
        if self._loop is None:
            loop = new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="sender-smtp", daemon=True)
            self._thread.start()
            self._loop = loop
            self.call(self._open())
        return self._loop

    async def _open(self) -> None:
        s = self.settings
        self._redis = redis_client.connect_async(s)
        leases = ConnectionLeases(self._redis, s.namespace, LEASE_S)  # renewed by the reaper
        self.pools = Pools(default_size=s.send_concurrency, timeout_s=s.smtp_timeout_s,
                           idle_timeout_s=s.smtp_idle_timeout_s, resolver=MxResolver(), leases=leases)
        self.pace = leases
        self._claims = Claims(self._redis, s.namespace, s.sent_mark_ttl_s, wait_replicas=s.redis_wait_replicas)

    @property
    def claims(self) -> Claims:
        if self._claims is None:
            raise RedisUnavailable("the SMTP event loop is not running")
        return self._claims

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.start())

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def shut() -> None:
            if self.pools is not None:
                await self.pools.close()
            if self._redis is not None:
                await self._redis.aclose()

        try:
            asyncio.run_coroutine_threadsafe(shut(), loop).result(10)
        except Exception:  # closing is best effort: the process is going away
            log.exception("closing SMTP connections failed")
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        loop.close()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed: its transports cost a fraction of asyncio's, and the
    SMTP loop is most of the sender's time (the pipeline bench: 1,300 -> 1,800 mails/s)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
