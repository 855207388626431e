"""Deliver one batch's jobs over a server's pool before the batch's deadline.

``deliver`` runs up to the pool's size of workers; each takes the next job, skips the
recipients a previous delivery of the same job already got accepted (Redis "sent" marks),
sends the rest in one SMTP transaction, and marks the accepted ones right after the 250
(written by group commit, all in Redis before ``deliver`` returns and the batch is acked).
No mail is started later than ``deadline - margin``: what is left is returned unattempted, for
the stage to hand back to the limiter with its tokens.

Per recipient: 2xx sent, 4xx deferred, 5xx failed; a connection that fails defers every
recipient of the mail it was carrying (connection failures are always transient).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import redis.asyncio
import redis.exceptions

from mailpipe.errors import SmtpError, TransientError
from mailpipe.model import Job, now_ms
from mailpipe.servers import ServerConfig
from sender import metrics
from sender.replies import DEFERRED, FAILED, SENT, Reply
from sender.smtp import Connection, ServerPool, reply_of, send_mail

log = logging.getLogger(__name__)


class MarksUnavailable(TransientError, ConnectionError):
    """Redis cannot be reached: without the sent marks a redelivered mail could go twice."""


class SentMarks:
    """Per-job, per-attempt set of recipients the server accepted: ``{ns}:sent:{job_id}:{attempt}``."""

    def __init__(self, client: redis.asyncio.Redis, namespace: str, ttl_s: int) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self._pending: list[tuple[str, Sequence[str], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.failing = False  # the last write failed: mail sent now could not be marked

    def key(self, job: Job) -> str:
        return f"{self.namespace}:sent:{job.id}:{job.attempt}"

    async def accepted(self, jobs: Sequence[Job]) -> list[set[str]]:
        """The recipients already accepted for each job, in one round trip for the batch."""
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for job in jobs:
                    pipe.smembers(self.key(job))
                found = await pipe.execute()
        except (redis.exceptions.RedisError, OSError) as exc:
            metrics.MARK_ERRORS.labels("read").inc()
            raise MarksUnavailable(f"Redis: reading sent marks failed: {exc}") from exc
        self.failing = False  # Redis answers again: this batch may try (its first mark tells)
        return [{m.decode() if isinstance(m, bytes) else str(m) for m in members} for members in found]

    def mark(self, job: Job, recipients: Sequence[str]) -> asyncio.Future[None]:
        """Mark ``recipients`` of ``job`` as accepted; the future is done once Redis has them
        (or fails with MarksUnavailable). Group commit: marks asked for while a write is on
        its way go together in the next one, so a mail costs no Redis round trip of its own."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((self.key(job), recipients, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())
        return done

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            error: MarksUnavailable | None = None
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for key, recipients, _ in batch:
                        pipe.sadd(key, *recipients)
                        pipe.expire(key, self.ttl_s)
                    await pipe.execute()
            except (redis.exceptions.RedisError, OSError) as exc:
                metrics.MARK_ERRORS.labels("write").inc()
                error = MarksUnavailable(f"Redis: writing sent marks failed: {exc}")
            self.failing = error is not None
            for _, _, done in batch:
                if done.done():
                    continue
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())  # type: ignore[misc]
        except (redis.exceptions.RedisError, OSError):
            return False


@dataclass
class JobOutcome:
    """What happened to one job of the batch (``attempted`` False: it was never started)."""

    job: Job
    attempted: bool = False
    sent: list[str] = field(default_factory=list)
    already_sent: list[str] = field(default_factory=list)  # marked by an earlier delivery
    deferred: dict[str, Reply] = field(default_factory=dict)
    failed: dict[str, Reply] = field(default_factory=dict)
    at_ms: int = 0

    def record(self, recipient: str, reply: Reply) -> None:
        if reply.outcome == SENT:
            self.sent.append(recipient)
        elif reply.outcome == FAILED:
            self.failed[recipient] = reply
        else:
            self.deferred[recipient] = reply


@dataclass
class BatchDelivery:
    outcomes: list[JobOutcome]
    started: float
    ended: float
    stopped_by: str = ""  # "", "deadline", "stop" or "redis": why mails were left unattempted

    @property
    def unattempted(self) -> list[int]:
        return [i for i, o in enumerate(self.outcomes) if not o.attempted]


async def deliver(jobs: Sequence[Job], server: ServerConfig, pool: ServerPool, deadline: float, *,
                  marks: SentMarks | None, margin_s: float = 1.0,
                  stop: Callable[[], bool] = lambda: False) -> BatchDelivery:
    """Send ``jobs`` over ``pool`` until done or ``deadline - margin_s`` (time.monotonic())."""
    outcomes = [JobOutcome(job) for job in jobs]
    started = time.monotonic()
    cutoff = deadline - margin_s
    pending = list(range(len(jobs)))
    pending.reverse()  # pop() from the end takes them in order
    state = _State()
    try:  # a redelivered batch skips what a previous delivery had accepted
        already = await marks.accepted(jobs) if marks is not None else [set() for _ in jobs]
    except MarksUnavailable as exc:
        log.warning("%s: the batch goes back unsent", exc.reason)
        return BatchDelivery(outcomes=outcomes, started=started, ended=time.monotonic(), stopped_by="redis")

    async def worker() -> None:
        conn: Connection | None = None
        try:
            while pending and not state.stopped_by:
                if stop():
                    state.stop("stop")
                elif marks is not None and marks.failing:
                    log.warning("Redis does not take the sent marks: sending stops for this batch")
                    state.stop("redis")
                elif time.monotonic() >= cutoff:
                    state.stop("deadline")
                elif conn is None:
                    got = await _acquire(pool, cutoff)
                    if isinstance(got, Reply):
                        # This worker cannot connect: the others (if any) go on with the jobs.
                        state.connect_failure = got
                        return
                    if got is None:
                        state.stop("deadline")
                    conn = got
                else:
                    index = pending.pop()
                    outcome = outcomes[index]
                    await _send_job(conn, outcome, server, marks, already[index], marking)
                    if conn.broken or conn.mails >= server.max_mails_per_connection:
                        pool.release(conn)  # retired: the next mail gets a fresh connection
                        conn = None
        finally:
            if conn is not None:
                pool.release(conn)

    marking: list[tuple[Job, asyncio.Future[None]]] = []  # accepted, being marked
    workers = max(1, min(pool.size, len(jobs)))
    await asyncio.gather(*(worker() for _ in range(workers)))
    for job, done in marking:  # the batch is acked after this: every mark is in Redis by then
        try:
            await done
        except MarksUnavailable as exc:
            # The mail is sent; only a redelivery of this batch could send it again.
            log.error("job %s sent but not marked: %s", job.id, exc.reason)
    if pending and not state.stopped_by and state.connect_failure is not None:
        # No worker could connect: the server is unreachable or refuses us. Defer the rest
        # (connection failures are transient) rather than knock again once per mail.
        for index in pending:
            outcome = outcomes[index]
            outcome.attempted = True
            outcome.at_ms = now_ms()
            for recipient in outcome.job.recipients:
                outcome.record(recipient, state.connect_failure)
    return BatchDelivery(outcomes=outcomes, started=started, ended=time.monotonic(),
                         stopped_by=state.stopped_by)


class _State:
    """What the workers of one batch share."""

    def __init__(self) -> None:
        self.stopped_by = ""
        self.connect_failure: Reply | None = None

    def stop(self, why: str) -> None:
        self.stopped_by = self.stopped_by or why


async def _acquire(pool: ServerPool, cutoff: float) -> Connection | Reply | None:
    """A connection; the reply that says why there is none; or None when the cutoff came first."""
    try:
        return await asyncio.wait_for(pool.acquire(), max(0.0, cutoff - time.monotonic()))
    except TimeoutError:
        return None
    except SmtpError as exc:
        log.warning("%s", exc.reason)
        return reply_of(exc)


async def _send_job(conn: Connection, outcome: JobOutcome, server: ServerConfig,
                    marks: SentMarks | None, already: set[str],
                    marking: list[tuple[Job, asyncio.Future[None]]]) -> None:
    job = outcome.job
    outcome.attempted = True
    outcome.already_sent = [r for r in job.recipients if r in already]
    todo = [r for r in job.recipients if r not in already]
    if outcome.already_sent:
        metrics.MAILS.labels(server.name, "skipped", "").inc(len(outcome.already_sent))
    if not todo:
        return
    try:
        result = await send_mail(conn, job.sender, todo, job.message)
    except SmtpError as exc:
        reply = reply_of(exc)
        log.info("job %s: %s", job.id, exc.reason)
        for recipient in todo:
            outcome.record(recipient, reply)
        outcome.at_ms = now_ms()
        return
    outcome.at_ms = now_ms()
    outcome.sent.extend(result.accepted)
    for recipient, reply in result.refused.items():
        outcome.record(recipient, reply)
    if result.accepted:
        metrics.LATENCY_SECONDS.labels(server.name).observe(max(0, outcome.at_ms - job.created_ms) / 1000)
        if marks is not None:
            marking.append((job, marks.mark(job, result.accepted)))


__all__ = ["DEFERRED", "BatchDelivery", "JobOutcome", "MarksUnavailable", "SentMarks", "deliver"]
