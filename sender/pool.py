"""Connections to each server, shared by every batch in flight for it, and reused."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable

from mailpipe.errors import RedisUnavailable, ServerPaused, SmtpError
from mailpipe.lanes import process_token
from mailpipe.pushback import ConnectionLeases
from mailpipe.servers import ServerConfig
from sender.mx import MxResolver
from sender.smtp import Connection, open_connection

log = logging.getLogger(__name__)

# A reused connection idle longer than this is probed with NOOP first: servers close idle
# sessions (often after 60 s to 5 min) and a mail should not be deferred for that.
PROBE_AFTER_S = 5.0
LEASE_POLL_S = 0.5  # a connection waiting for a place under the cap asks again this often
# A connection's lease in Redis lasts this long and is renewed by the reaper (every 5 s,
# sender/stage.py REAP_EVERY_S) while the connection lives: a sender killed with its connections
# open frees their places under the cap within this, not after the idle timeout and a window.
LEASE_S = 20.0
SUSPECTS_KEPT = 10_000  # recipients refused as if the server were broken, remembered per server
_TOKEN = process_token()  # this process's name in the connection leases
_LEASES = itertools.count(1)


class ServerPool:
    """Up to ``size`` connections to one server, shared by every batch in flight for it, and with
    ``leases``, within the server's connection cap, which every sender replica shares
    (mailpipe/pushback.py: lowered when the server says too many connections).

    ``acquire()`` waits for a free slot (and a lease), then reuses an idle healthy connection or
    opens a fresh one. A connection is retired after ``max_mails_per_connection`` mails, after
    ``idle_timeout_s`` unused, and at once after a protocol error; its lease ends with it.

    Until the server has taken a mail from this process (at first, and again once it said it is
    broken for us: ``broken()``), one connection at a time is on trial; the others wait for its
    verdict (``proven()``, or ``trial_over()``) rather than all knock with the same wrong
    password. A trial asks first whether the server was paused meanwhile (``ServerPaused``: the
    batch goes back). ``acquire()`` raising ``SmtpError`` leaves its trial on until the caller
    has reported the reply (so that the next trial sees the server's pace after it) and calls
    ``trial_over()``.
    """

    def __init__(self, server: ServerConfig, *, size: int, timeout_s: float, idle_timeout_s: float,
                 local_hostname: str | None = None, resolver: MxResolver | None = None,
                 leases: ConnectionLeases | None = None) -> None:
        self.server = server
        self.resolver = resolver
        self.size = size
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.local_hostname = local_hostname
        self.leases = leases
        self._slots = asyncio.Semaphore(size)
        self._idle: list[Connection] = []
        self._quitting: set[asyncio.Task[None]] = set()
        self._leased: set[str] = set()  # the leases of this pool's open connections
        self._closed = False
        # The cap every replica shares, as last heard. Below our size (the server said too many
        # connections), a connection is not kept idle: its place may be what another waits for.
        self._cap = size
        self._proven = False
        self._last_good = float("-inf")  # monotonic: the server last took a mail from us
        # Recipients it refused as if broken for us (relaying denied) at RCPT, by "job-id
        # recipient": when first, whether it was proven then, and how many such refusals (of
        # any recipient) there had been. The oldest is dropped past SUSPECTS_KEPT.
        self._suspects: dict[str, tuple[float, bool, int]] = {}
        self._refusals = 0
        self._on_trial: object | None = None  # the connection on trial (a token while it opens)
        self._verdict = asyncio.Event()  # set, and replaced, whenever a trial ends

    async def acquire(self, give_up: Callable[[], bool] = lambda: False) -> Connection | None:
        """A connection, or None when ``give_up()`` says so after a wait for a trial's verdict."""
        await self._slots.acquire()
        try:
            trial = await self._trial()
            if give_up():
                if trial is not None:
                    self.trial_over()
                self._slots.release()
                return None
            try:
                conn = await self._connection()
            except SmtpError:
                raise  # the trial, if any, ends with trial_over(), once what the server said is reported
            except BaseException:
                if trial is not None and self._on_trial is trial:
                    self.trial_over()
                raise
            if trial is not None and self._on_trial is trial:
                self._on_trial = conn
            return conn
        except BaseException:
            self._slots.release()
            raise

    async def _connection(self) -> Connection:
        while self._idle:
            conn = self._idle.pop()
            if await self._usable(conn):
                await self._renew(conn)
                return conn
        lease = await self._lease()
        try:
            conn = await open_connection(self.server, timeout_s=self.timeout_s, resolver=self.resolver,
                                         local_hostname=self.local_hostname)
        except BaseException:
            self._unlease(lease, clean=False)
            raise
        conn.lease = lease
        if lease is not None:
            self._leased.add(lease)
        return conn

    async def _trial(self) -> object | None:
        """Wait while another connection is on trial; a token when this one is, None when the
        server is proven."""
        while not self._proven and self._on_trial is not None:
            await self._verdict.wait()
        if self._proven:
            return None
        self._on_trial = token = object()
        try:
            paused = self.leases is not None and await self.leases.paused(self.server.name)
        except RedisUnavailable:
            paused = False  # the claims will say so in a moment
        except BaseException:  # cancelled: the cutoff came
            self.trial_over()
            raise
        if paused:
            self.trial_over()
            raise ServerPaused(f"{self.server.name} is paused")
        return token

    def trial_over(self) -> None:
        """The connection on trial gave no verdict (it failed to open, or was given back): the
        next waiting connection tries."""
        self._on_trial = None
        self._verdict.set()
        self._verdict = asyncio.Event()

    def proven(self) -> None:
        """The server took a mail (or refused one for the recipient's sake): no more trials."""
        self._last_good = time.monotonic()
        if not self._proven:
            self._proven = True
            self.trial_over()

    def refused_alone(self, job_id: str, recipient: str) -> bool:
        """The server refused ``recipient`` as if broken for us (relaying denied) at RCPT: is the
        refusal the recipient's rather than the server's? Yes when it refused this recipient
        before and has taken a mail since; or when it had been taking mail up to that first
        refusal and has refused nobody else so since (a server that breaks refuses every mail
        in flight). Otherwise the refusal is remembered, and the answer is no."""
        key = f"{job_id} {recipient}"
        seen = self._suspects.get(key)
        self._refusals += 1
        if seen is not None:
            first, was_proven, refusals = seen
            if self._last_good > first or (was_proven and self._refusals == refusals + 2):
                del self._suspects[key]
                return True
            return False
        if len(self._suspects) >= SUSPECTS_KEPT:
            del self._suspects[next(iter(self._suspects))]
        self._suspects[key] = (time.monotonic(), self._proven, self._refusals - 1)
        return False

    def broken(self) -> None:
        """The server said it is broken for us: the next connections go one at a time again."""
        self._proven = False

    async def _lease(self) -> str | None:
        """A place within the server's connection cap, waited for (the caller bounds the wait by
        the batch's cutoff). Without Redis, none: nothing is claimed then, so nothing is sent."""
        if self.leases is None:
            return None
        lease = f"{_TOKEN}/{next(_LEASES)}"
        while True:
            try:
                wait_us, self._cap = await self.leases.open(self.server.name, self.size, lease)
            except RedisUnavailable:
                return None
            if not wait_us:
                return lease
            await asyncio.sleep(min(wait_us / 1_000_000, LEASE_POLL_S))

    async def _renew(self, conn: Connection) -> None:
        if self.leases is not None and conn.lease is not None:
            with contextlib.suppress(RedisUnavailable):
                _, self._cap = await self.leases.open(self.server.name, self.size, conn.lease)

    def _unlease(self, lease: str | None, clean: bool) -> None:
        """End a connection's lease (in the background: closing never waits for Redis)."""
        if self.leases is None or lease is None:
            return
        self._leased.discard(lease)
        task = asyncio.get_running_loop().create_task(self._close_lease(lease, clean))
        self._quitting.add(task)
        task.add_done_callback(self._quitting.discard)

    async def _close_lease(self, lease: str, clean: bool) -> None:
        assert self.leases is not None
        with contextlib.suppress(RedisUnavailable):  # its lease ends by itself
            await self.leases.close(self.server.name, self.size, lease, clean)

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
                self._unlease(conn.lease, clean=False)
                return False
        return True

    def release(self, conn: Connection) -> None:
        """Give a connection back: kept for reuse if healthy, closed otherwise."""
        if conn is self._on_trial:  # no verdict from it: the next waiting connection tries
            self.trial_over()
        try:
            if self._closed or conn.broken or not conn.is_connected:
                clean = not conn.broken
                conn.close()
                self._unlease(conn.lease, clean)
            elif conn.mails >= self.server.max_mails_per_connection or self._cap < self.size:
                task = asyncio.get_running_loop().create_task(conn.quit())
                self._quitting.add(task)  # kept referenced until done; close() waits for them
                task.add_done_callback(self._quitting.discard)
                self._unlease(conn.lease, clean=True)
            else:
                self._idle.append(conn)
        finally:
            self._slots.release()

    async def _retire(self, conn: Connection) -> None:
        clean = not conn.broken
        if conn.broken or not conn.is_connected:
            conn.close()
        else:
            await conn.quit()
        self._unlease(conn.lease, clean)

    async def reap(self) -> None:
        """Renew the leases of the open connections. Close connections idle longer than the idle
        timeout; every idle one while another
        connection (of any replica) waits for a place under the server's cap: kept idle, they
        would hold those places for the idle timeout. Busy ones are not closed for it: handing
        a place over costs a new session (TLS, AUTH) per batch, and the server's cap is in use."""
        wanted = False
        if self.leases is not None:
            with contextlib.suppress(RedisUnavailable):
                for lease in list(self._leased):  # busy or idle, they live: their places too
                    await self.leases.open(self.server.name, self.size, lease)
                if self._idle:
                    wanted = await self.leases.wanted(self.server.name)
        now = time.monotonic()
        keep = []
        for conn in self._idle:
            if wanted or now - conn.last_used > self.idle_timeout_s:
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
        for conn in idle:
            self._unlease(conn.lease, clean=True)
        await asyncio.gather(*(conn.quit() for conn in idle), *self._quitting, return_exceptions=True)


class Pools:
    """One ServerPool per server name; a changed server configuration gets a new pool."""

    def __init__(self, *, default_size: int, timeout_s: float, idle_timeout_s: float,
                 resolver: MxResolver | None = None, leases: ConnectionLeases | None = None) -> None:
        self.default_size = default_size
        self.resolver = resolver
        self.leases = leases
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
                              idle_timeout_s=self.idle_timeout_s, resolver=self.resolver, leases=self.leases)
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
