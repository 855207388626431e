"""One holder per recipient: claims in Redis, taken before a mail is sent.

Before it sends, the sender claims each (job, attempt, recipient) for itself, with a lease
that ends after the batch's deadline plus the SMTP timeout; a 250 turns the claim into "sent";
a 4xx is recorded as "deferred" in the claim before its retry copy (attempt + 1) is published,
so that no holder ever sends this attempt again once the next one may exist; a refusal or a
give-back releases it, naming the grant it was released under. A second holder
(a redelivered batch whose first holder still runs, a copy of the job in the same or another
batch, a re-packed batch, a second copy of a granted batch) skips what is sent, waits for
what is held, and never sends under a grant what another holder of that grant has already
touched. What is left are the two duplicates SMTP cannot rule out: a 250 received just before
its holder died (its lease expires, unmarked), and a 250 lost on the wire.

The states are documented in ``claims.lua``; every claim of a batch is one round trip, and it
answers with Redis time, which is the only clock a deadline is judged by.

Keys: ``{<namespace>:<server>}:claim:<tenant>:<job id>:<created_ms>:<attempt>`` (one hash per
mail and attempt, one field per recipient), under the server's hash tag, so one batch's keys
share a Redis Cluster slot; the tenant in the key keeps one tenant's job ids apart from
another's. A mail is named by its tenant, id and ``created_ms`` (docs/wire-format.md, 2.8): a
tenant that reuses an id (an order number) for a second mail has it sent, not skipped as sent;
the same request read twice (rendered twice, with another MIME boundary or DKIM timestamp, so
never by a digest of its bytes) is still one mail. It costs nothing per mail: both are fields.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, cast

import redis.asyncio
import redis.asyncio.connection
import redis.exceptions

from mailpipe import redis_client
from mailpipe.errors import RedisUnavailable
from mailpipe.model import Job
from sender import metrics

MARKS_IDLE_CHECK_S = 1.0  # the marks' connection is checked before use after this long unused


class Claim(IntEnum):
    MINE = 1  # claimed by this holder now (or, past the cutoff, claimable)
    SENT = 2  # accepted by the server before
    HELD = 3  # a live holder has it: ask again later
    TOUCHED = 4  # handled under this grant by a holder that is gone: not sent under it again
    DONE = 5  # another holder of this grant released it and published its outcome
    # Deferred by a holder whose lease is over: its retry copy may never have been published.
    # Now this holder's ("D"): it publishes the copy again; it never sends this attempt.
    RETRY = 6


@dataclass(frozen=True)
class Snapshot:
    """What one claim call found: Redis time and a code per recipient of each job."""

    now_us: int
    codes: list[dict[str, Claim]]


def claim_key(namespace: str, job: Job) -> str:
    """The hash of one mail's attempt: its tenant, id and created_ms name the mail."""
    return f"{{{namespace}:{job.server}}}:claim:{job.tenant}:{job.id}:{job.created_ms}:{job.attempt}"


def _command(*parts: bytes | str) -> bytes:
    """One command in RESP (what redis-py sends), text as UTF-8 as redis-py encodes it."""
    encoded = [p.encode() if isinstance(p, str) else p for p in parts]
    return b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in encoded)


def _script(name: str) -> bytes:
    return importlib.resources.files("sender").joinpath(name).read_bytes()


class Claims:
    """The claims of one process; ``owner`` names this holder in every lease it takes."""

    def __init__(self, client: redis.asyncio.Redis, namespace: str, ttl_s: int, *, wait_replicas: int = 0) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        # Replicas that must hold a claim or mark before it counts (WAIT): a Redis failover
        # then cannot forget who holds a recipient, nor that it was sent.
        self.wait_replicas = wait_replicas
        self._claim = client.register_script(_script("claims.lua"))
        self._release = client.register_script(_script("release.lua"))
        self._pending: list[tuple[str, Sequence[str], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        # The sent marks' own connection (``_write_marks``): taken from the client's pool (its
        # address, Sentinel, TLS, AUTH and timeouts) and never given back, so that the marks
        # alone use it; closing the client closes it.
        self._marks: redis.asyncio.connection.AbstractConnection | None = None
        self._marks_used = 0.0  # time.monotonic() of its last round trip

    def key(self, job: Job) -> str:
        return claim_key(self.namespace, job)

    async def claim(self, owner: str, grant: str, jobs: Sequence[Job], recipients: Sequence[Sequence[str]],
                    lease_until_us: int, cutoff_us: int) -> Snapshot:
        """Claim ``recipients[i]`` of ``jobs[i]`` for ``owner`` under ``grant``, all in one round
        trip; past ``cutoff_us`` (Redis time) nothing is claimed, only classified."""
        args: list[str | int] = [owner, grant, lease_until_us, cutoff_us, self.ttl_s]
        for rcpts in recipients:
            args += [len(rcpts), *rcpts]
        keys = [self.key(j) for j in jobs]
        try:
            if self.wait_replicas:
                async with self.client.pipeline(transaction=False) as pipe:
                    await self._claim(keys=keys, args=args, client=pipe)
                    reply = cast("list[int]", (await self._execute(pipe, "claims"))[0])
            else:  # one round trip: a script in a pipeline costs a SCRIPT EXISTS first
                reply = cast("list[int]", await self._claim(keys=keys, args=args))
        except (redis.exceptions.RedisError, OSError) as exc:
            metrics.MARK_ERRORS.labels("claim").inc()
            raise RedisUnavailable(f"Redis: claiming recipients failed: {exc}") from exc
        codes = iter(reply[1:])
        return Snapshot(int(reply[0]), [{r: Claim(int(next(codes))) for r in rcpts} for rcpts in recipients])

    async def release(self, owner: str, released: Sequence[tuple[Job, str, str]]) -> list[bool]:
        """Set (job, recipient, new state) where ``owner`` still holds it; per entry, whether it
        did (``release.lua`` says which changes a holder may make)."""
        if not released:
            return []
        return await self._settle(owner, released, "release", "releasing claims")

    async def defer(self, owner: str, grant: str, until_us: int, deferred: Sequence[tuple[Job, str]]) -> list[bool]:
        """Record (job, recipient) as deferred by ``owner`` under ``grant``, before its retry copy
        is published (state ``D``, leased until ``until_us`` like the claim); per entry, whether
        it was still this holder's. One round trip for a batch."""
        if not deferred:
            return []
        state = f"D {owner} {until_us} {grant}"
        return await self._settle(owner, [(job, rcpt, state) for job, rcpt in deferred], "defer",
                                  "recording deferrals")

    async def _settle(self, owner: str, changes: Sequence[tuple[Job, str, str]], operation: str,
                      what: str) -> list[bool]:
        keys = [self.key(job) for job, _, _ in changes]
        args: list[str | int] = [owner, self.ttl_s, *(f"{rcpt}\n{state}" for _, rcpt, state in changes)]
        try:
            if self.wait_replicas:
                async with self.client.pipeline(transaction=False) as pipe:
                    await self._release(keys=keys, args=args, client=pipe)
                    reply = (await self._execute(pipe, what))[0]
            else:
                reply = await self._release(keys=keys, args=args)
        except (redis.exceptions.RedisError, OSError) as exc:
            metrics.MARK_ERRORS.labels(operation).inc()
            raise RedisUnavailable(f"Redis: {what} failed: {exc}") from exc
        return [bool(int(done)) for done in cast("list[int]", reply)]

    def mark_sent(self, job: Job, recipients: Sequence[str]) -> asyncio.Future[None]:
        """Record ``recipients`` of ``job`` as sent; the future is done once Redis has them (or
        fails with RedisUnavailable). Group commit: marks asked for while a write is on its
        way go together in the next one, so concurrent connections share round trips."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((self.key(job), recipients, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())
        return done

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            error: RedisUnavailable | None = None
            try:
                await self._write_marks([(key, recipients) for key, recipients, _ in batch])
            except (redis.exceptions.RedisError, OSError, RedisUnavailable) as exc:
                metrics.MARK_ERRORS.labels("write").inc()
                error = RedisUnavailable(f"Redis: writing sent marks failed: {exc}")
            for _, _, done in batch:
                if done.done():
                    continue
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

    async def _write_marks(self, marks: Sequence[tuple[str, Sequence[str]]]) -> None:
        """One round trip: an HSET per mail (no EXPIRE: the claim that came before set the key's
        life), with ``wait_replicas`` a WAIT, on the marks' own connection. Packed here and read
        with redis-py's parser (hiredis): a round trip of two marks costs 58 µs of CPU where
        redis.asyncio's pipeline, which packs every argument through its encoder and takes a
        connection from the pool, costs 103 (about half a round trip per mail). Any error
        drops the connection (replies may be left unread on it); the next write opens another."""
        conn = self._marks
        if conn is None:
            conn = self._marks = await self.client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        elif time.monotonic() - self._marks_used > MARKS_IDLE_CHECK_S:
            # Idle a while: Redis may have closed it (a restart). Checked, reconnected if so, as
            # the pool does before it hands a connection out.
            await self.client.connection_pool.ensure_connection(conn)
        commands = [_command(b"HSET", key, *(part for r in recipients for part in (r, "s")))
                    for key, recipients in marks]
        if self.wait_replicas:
            commands.append(_command(b"WAIT", str(self.wait_replicas), str(redis_client.WAIT_TIMEOUT_MS)))
        try:
            await conn.send_packed_command(b"".join(commands), check_health=False)
            replies = [await conn.read_response() for _ in commands]
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        self._marks_used = time.monotonic()
        if self.wait_replicas:
            problem = redis_client.not_replicated(int(replies[-1]), self.wait_replicas, "sent marks")
            if problem:
                raise RedisUnavailable(problem)

    async def _execute(self, pipe: redis.asyncio.client.Pipeline, what: str) -> list[Any]:
        """Run ``pipe``; with ``wait_replicas``, WAIT on the same connection, and refuse the
        result (RedisUnavailable) unless enough replicas hold it."""
        if self.wait_replicas:
            pipe.execute_command("WAIT", self.wait_replicas, redis_client.WAIT_TIMEOUT_MS)
        replies: list[Any] = await pipe.execute()
        if self.wait_replicas:
            problem = redis_client.not_replicated(int(replies.pop()), self.wait_replicas, what)
            if problem:
                raise RedisUnavailable(problem)
        return replies

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())  # type: ignore[misc]
        except (redis.exceptions.RedisError, OSError):
            return False
