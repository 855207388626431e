"""Connections to each server, shared by every batch in flight for it, and reused."""

from __future__ import annotations

import asyncio
import logging
import time

from mailpipe.servers import ServerConfig
from sender.mx import MxResolver
from sender.smtp import Connection, open_connection

log = logging.getLogger(__name__)

# A reused connection idle longer than this is probed with NOOP first: servers close idle
# sessions (often after 60 s to 5 min) and a mail should not be deferred for that.
PROBE_AFTER_S = 5.0


class ServerPool:
    """Up to ``size`` connections to one server, shared by every batch in flight for it.

    ``acquire()`` waits for a free slot, then reuses an idle healthy connection or opens a
    fresh one. A connection is retired after ``max_mails_per_connection`` mails, after
    ``idle_timeout_s`` unused, and at once after a protocol error.
    """

    def __init__(self, server: ServerConfig, *, size: int, timeout_s: float, idle_timeout_s: float,
                 local_hostname: str | None = None, resolver: MxResolver | None = None) -> None:
        self.server = server
        self.resolver = resolver
        self.size = size
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.local_hostname = local_hostname
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Connection] = []
        self._quitting: set[asyncio.Task[None]] = set()
        self._closed = False

    async def acquire(self) -> Connection:
        await self._slots.acquire()
        try:
            while self._idle:
                conn = self._idle.pop()
                if await self._usable(conn):
                    return conn
            return await open_connection(self.server, timeout_s=self.timeout_s, resolver=self.resolver,
                                         local_hostname=self.local_hostname)
        except BaseException:
            self._slots.release()
            raise

    async def _usable(self, conn: Connection) -> bool:
        idle = time.monotonic() - conn.last_used
        if conn.broken or not conn.is_connected or idle > self.idle_timeout_s:
            await self._retire(conn)
            return False
        if idle > PROBE_AFTER_S:
            try:
                if not (await conn.session.command(b"NOOP\r\n", min(self.timeout_s, 5.0))).ok:
                    raise ConnectionResetError("NOOP refused")
            except (ConnectionError, TimeoutError):
                conn.close()
                return False
        return True

    def release(self, conn: Connection) -> None:
        """Give a connection back: kept for reuse if healthy, closed otherwise."""
        try:
            if self._closed or conn.broken or not conn.is_connected:
                conn.close()
            elif conn.mails >= self.server.max_mails_per_connection:
                task = asyncio.get_running_loop().create_task(conn.quit())
                self._quitting.add(task)  # kept referenced until done; close() waits for them
                task.add_done_callback(self._quitting.discard)
            else:
                self._idle.append(conn)
        finally:
            self._slots.release()

    async def _retire(self, conn: Connection) -> None:
        if conn.broken or not conn.is_connected:
            conn.close()
        else:
            await conn.quit()

    async def reap(self) -> None:
        """Close connections idle longer than the idle timeout."""
        now = time.monotonic()
        keep = []
        for conn in self._idle:
            if now - conn.last_used > self.idle_timeout_s:
                await self._retire(conn)
            else:
                keep.append(conn)
        self._idle = keep

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(conn.quit() for conn in idle), *self._quitting, return_exceptions=True)


class Pools:
    """One ServerPool per server name; a changed server configuration gets a new pool."""

    def __init__(self, *, default_size: int, timeout_s: float, idle_timeout_s: float,
                 resolver: MxResolver | None = None) -> None:
        self.default_size = default_size
        self.resolver = resolver
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._pools: dict[str, ServerPool] = {}
        self._retired: list[ServerPool] = []

    def get(self, server: ServerConfig) -> ServerPool:
        pool = self._pools.get(server.name)
        if pool is None or pool.server != server:
            if pool is not None:  # the old one finishes its mails, then its connections close
                pool._closed = True
                self._retired.append(pool)
            pool = ServerPool(server, size=server.concurrency or self.default_size, timeout_s=self.timeout_s,
                              idle_timeout_s=self.idle_timeout_s, resolver=self.resolver)
            self._pools[server.name] = pool
        return pool

    async def reap(self) -> None:
        for pool in list(self._pools.values()):
            await pool.reap()
        retired, self._retired = self._retired, []
        for pool in retired:
            await pool.close()

    async def close(self) -> None:
        pools, self._pools = [*self._pools.values(), *self._retired], {}
        self._retired = []
        await asyncio.gather(*(pool.close() for pool in pools), return_exceptions=True)
