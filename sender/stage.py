"""The sender stage: granted batches from ``send`` are delivered over SMTP inside their window.

Read top to bottom, a batch goes:
1. ``handle``: decode it. A batch picked up at or after its deadline is not sent at all: it
   goes back to ``batches`` for a new grant, its tokens refunded (a backlog never bursts above
   the rate). Otherwise its delivery starts on the SMTP event loop (a second thread), so
   several batches are in flight and connections persist across batches.
2. ``deliver`` (sender/delivery.py) sends its jobs until done or the deadline.
3. ``tick`` collects finished deliveries and, for each batch, publishes every output with ONE
   confirmed ``broker.publish`` call, then acks the batch:
   - events to the ``events`` exchange, routing key ``<outcome>.<tenant>``;
   - deferred recipients as a copy of the job (attempt + 1) to the retry queue, or, past
     ``retry_max_age_s``, to the dead-letter queue as ``expired``;
   - failed recipients as a copy of the job to the dead-letter queue, with the server's reply;
   - mails not attempted before the deadline back to ``batches`` with ``refund`` = their count.
Accepted recipients were marked in Redis right after their 250, before the ack, so a
redelivered batch skips them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import redis
import redis.asyncio

from mailpipe import codec, suppression
from mailpipe import metrics as kernel_metrics
from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.errors import ConfigError, InvalidMessage
from mailpipe.model import Batch, Event, Job, now_ms
from mailpipe.servers import ConfigWatcher, ServerConfig
from mailpipe.settings import Settings
from mailpipe.stage import Stage
from sender import metrics
from sender.delivery import BatchDelivery, JobOutcome, SentMarks, deliver
from sender.mx import MxResolver
from sender.replies import BAD_RECIPIENT, SENT_REPLY, Reply
from sender.smtp import Pools

log = logging.getLogger(__name__)

RETRY_JITTER = 0.2  # a retry waits 80% to 100% of its delay queue's TTL

T = TypeVar("T")
REAP_EVERY_S = 5.0


@dataclass
class _InFlight:
    delivery: Delivery
    batch: Batch
    raws: list[bytes]  # the valid jobs' bytes, in the order of ``jobs``
    jobs: list[Job]
    server: ServerConfig
    future: Future[BatchDelivery]


class SenderStage(Stage):
    name = "sender"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.watcher = ConfigWatcher(settings.servers_path)
        self._in_flight: list[_InFlight] = []
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pools: Pools | None = None
        self._redis: redis.asyncio.Redis | None = None
        self._marks: SentMarks | None = None
        self._sync_redis: redis.Redis | None = None  # for suppression, from the main thread
        self._last_reap = time.monotonic()

    @property
    def input_queue(self) -> str:
        return self.topology.send

    @property
    def prefetch(self) -> int:
        return self.settings.send_prefetch

    # -- the SMTP event loop, in its own thread -------------------------------------------------

    def start_loop(self) -> None:
        """Start the SMTP event loop now (``start()`` does it on connect)."""
        self._ensure_loop()

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="sender-smtp", daemon=True)
            self._thread.start()
            self._loop = loop
            self._call(self._open())
        return self._loop

    async def _open(self) -> None:
        s = self.settings
        self._pools = Pools(default_size=s.send_concurrency, timeout_s=s.smtp_timeout_s,
                            idle_timeout_s=s.smtp_idle_timeout_s, resolver=MxResolver())
        self._redis = redis.asyncio.Redis.from_url(s.redis_url, socket_timeout=5, socket_connect_timeout=5)
        self._marks = SentMarks(self._redis, s.namespace, s.sent_mark_ttl_s)

    def _submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._ensure_loop())

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    # -- the Stage hooks ------------------------------------------------------------------------

    def start(self, broker: Broker) -> None:
        self._ensure_loop()
        # Deliveries of a lost connection are redelivered; their sent marks make the
        # redelivery skip what these (still running) deliveries get accepted.
        self._in_flight.clear()
        self._stopping = False

    def handle(self, broker: Broker, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            self._take(broker, delivery)
        kernel_metrics.IN_FLIGHT.labels(self.name).set(len(self._in_flight))

    def _take(self, broker: Broker, delivery: Delivery) -> None:
        try:
            batch = codec.decode_batch(delivery.body)
            server = self.watcher.current().server(batch.server)
        except (InvalidMessage, ConfigError) as exc:
            category = "invalid" if isinstance(exc, InvalidMessage) else "config"
            broker.publish([self.dead_letter(delivery.body, exc.reason, category)])
            broker.ack(delivery.tag)
            return
        raws, jobs, outputs = [], [], []
        for raw in batch.jobs:
            try:
                jobs.append(codec.decode_job(raw, self.settings.max_message_bytes))
                raws.append(raw)
            except InvalidMessage as exc:
                outputs.append(self.dead_letter(raw, exc.reason, "invalid",
                                                **{"x-mailpipe-batch-id": batch.id}))
        remaining_s = ((batch.deadline_ms or 0) - now_ms()) / 1000
        if batch.deadline_ms is None or remaining_s <= self.settings.send_margin_s or not jobs:
            # Late (or never granted): send nothing, hand every mail back for a new grant.
            if jobs:
                reason = "late" if batch.deadline_ms is not None else "ungranted"
                outputs.append(self._give_back(batch, raws, jobs, reason))
                log.info("batch %s picked up %.1f s after its deadline: %d mail(s) back to the limiter",
                         batch.id, -remaining_s, len(jobs))
            broker.publish(outputs)
            broker.ack(delivery.tag)
            return
        if outputs:  # the invalid jobs' dead letters go now; the batch is acked after delivery
            broker.publish(outputs)
        deadline = time.monotonic() + remaining_s
        log.debug("batch %s: %d mails, %.1f s left in its window", batch.id, len(jobs), remaining_s)
        future = self._submit(self._deliver(jobs, server, deadline))
        self._in_flight.append(_InFlight(delivery, batch, raws, jobs, server, future))

    async def _deliver(self, jobs: list[Job], server: ServerConfig, deadline: float) -> BatchDelivery:
        assert self._pools is not None
        return await deliver(jobs, server, self._pools.get(server), deadline, marks=self._marks,
                             margin_s=self.settings.send_margin_s, stop=lambda: self._stopping)

    def tick(self, broker: Broker) -> None:
        done = [f for f in self._in_flight if f.future.done()]
        for flight in done:
            self._in_flight.remove(flight)
            self._finish(broker, flight)
        if done:
            kernel_metrics.IN_FLIGHT.labels(self.name).set(len(self._in_flight))
        if time.monotonic() - self._last_reap > REAP_EVERY_S and self._pools is not None:
            self._last_reap = time.monotonic()
            self._submit(self._pools.reap())

    def busy(self) -> bool:
        return bool(self._in_flight)

    def drain(self, broker: Broker, deadline: float) -> None:
        """Start no more mails; wait for the ones in flight; give the rest back with refunds."""
        self._stopping = True
        while self._in_flight and time.monotonic() < deadline:
            self.tick(broker)
            if self._in_flight:
                broker.sleep(0.05)
        if self._in_flight:
            log.warning("%d batch(es) still in flight at shutdown: left unacked, they are redelivered",
                        len(self._in_flight))

    def ready(self) -> bool:
        if self._loop is None or self._marks is None:
            return False
        try:
            return self._call(self._marks.ping(), timeout_s=3.0)
        except (TimeoutError, RuntimeError):
            return False

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def shut() -> None:
            if self._pools is not None:
                await self._pools.close()
            if self._redis is not None:
                await self._redis.aclose()

        if self._sync_redis is not None:
            self._sync_redis.close()
        try:
            asyncio.run_coroutine_threadsafe(shut(), loop).result(10)
        except Exception:  # closing is best effort: the process is going away
            log.exception("closing SMTP connections failed")
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        loop.close()

    # -- a finished batch: outputs, one publish, then the ack -----------------------------------

    def _finish(self, broker: Broker, flight: _InFlight) -> None:
        batch = flight.batch
        try:
            result = flight.future.result()
        except Exception:
            # A bug of ours: give the batch back to its queue (the delivery limit bounds this);
            # what was accepted is marked, so the next delivery does not send it twice.
            log.exception("delivering batch %s failed", batch.id)
            broker.requeue(flight.delivery.tag)
            return
        outputs: list[Outgoing] = []
        for outcome in result.outcomes:
            if outcome.attempted:
                outputs.extend(self._outputs(outcome, batch))
        unattempted = result.unattempted
        if unattempted:
            reason = result.stopped_by or "deadline"
            outputs.append(self._give_back(batch, [flight.raws[i] for i in unattempted],
                                           [flight.jobs[i] for i in unattempted], reason))
        self._suppress([o for o in result.outcomes if o.attempted])
        ended_ms = now_ms()
        if batch.granted_ms is not None:
            used_s = max(0, ended_ms - batch.granted_ms) / 1000
            metrics.WINDOW_USED_SECONDS.labels(batch.server).observe(used_s)
        if batch.deadline_ms is not None and ended_ms > batch.deadline_ms:
            metrics.WINDOW_OVERRUNS.labels(batch.server).inc()
            log.warning("batch %s: delivery ended %.1f s after its deadline", batch.id,
                        (ended_ms - batch.deadline_ms) / 1000)
        broker.publish(outputs)
        broker.ack(flight.delivery.tag)
        log.info("batch %s: %d mail(s) attempted in %.1f s, %d given back", batch.id,
                 len(result.outcomes) - len(unattempted), result.ended - result.started, len(unattempted),
                 extra={"batch_id": batch.id, "server": batch.server, "mails": batch.mails,
                        "given_back": len(unattempted)})

    def _suppress(self, outcomes: list[JobOutcome]) -> None:
        """Recipients the server says do not exist are suppressed for their tenant: the intake
        fails later mail to them at once (mailpipe/suppression.py). Best effort: without Redis
        the next mail to them is simply refused by the server again."""
        bad = [(o.job.tenant, r, reply) for o in outcomes for r, reply in o.failed.items()
               if reply.category == BAD_RECIPIENT]
        if not bad:
            return
        if self._sync_redis is None:
            self._sync_redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=2,
                                                    socket_connect_timeout=2)
        try:
            for tenant, recipient, reply in bad:
                suppression.suppress(self._sync_redis, self.settings.namespace, tenant, recipient, str(reply),
                                     self.settings.suppress_days)
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot record %d bad recipient(s) for suppression: %s", len(bad), exc)

    def _outputs(self, outcome: JobOutcome, batch: Batch) -> list[Outgoing]:
        job = outcome.job
        at_ms = outcome.at_ms or now_ms()
        out: list[Outgoing] = []
        sent = outcome.already_sent + outcome.sent
        if sent:
            out.append(self._event(job, batch, "sent", sent, SENT_REPLY, at_ms))
            metrics.MAILS.labels(job.server, "sent", "").inc(len(outcome.sent))
        expired = outcome.deferred and at_ms - job.created_ms > self.settings.retry_max_age_s * 1000
        for reply, recipients in _group(outcome.deferred):
            if expired:
                copy = replace(job, recipients=tuple(recipients))
                out.append(self._dead(copy, reply, "expired",
                                      f"expired after {job.attempt + 1} attempt(s); last reply: {reply}"))
                out.append(self._event(job, batch, "expired", recipients, reply, at_ms))
                metrics.MAILS.labels(job.server, "expired", reply.category).inc(len(recipients))
            else:
                copy = replace(job, recipients=tuple(recipients), attempt=job.attempt + 1)
                # Jitter: each retry waits between 80% and 100% of its queue's delay, so mail
                # deferred together by a busy server does not come back all at once.
                delay_ms = self.topology.retry_delay_s(copy.attempt) * 1000
                out.append(Outgoing(self.topology.retry_queue(copy.attempt), codec.encode_job(copy),
                                    message_id=f"{job.id}:{copy.attempt}",
                                    expiration_ms=int(delay_ms * random.uniform(1 - RETRY_JITTER, 1.0))))
                metrics.RETRIES.labels(job.server, str(min(copy.attempt, 10))).inc(len(recipients))
                out.append(self._event(job, batch, "deferred", recipients, reply, at_ms))
                metrics.MAILS.labels(job.server, "deferred", reply.category).inc(len(recipients))
        for reply, recipients in _group(outcome.failed):
            copy = replace(job, recipients=tuple(recipients))
            out.append(self._dead(copy, reply, reply.category, f"refused by {job.server}: {reply}"))
            out.append(self._event(job, batch, "failed", recipients, reply, at_ms))
            metrics.MAILS.labels(job.server, "failed", reply.category).inc(len(recipients))
        return out

    def _dead(self, job: Job, reply: Reply, category: str, reason: str) -> Outgoing:
        return self.dead_letter(codec.encode_job(job), reason, category, **{
            "x-mailpipe-code": reply.code, "x-mailpipe-text": reply.text[:1000],
            "x-mailpipe-enhanced": reply.enhanced or "", "x-mailpipe-reply-category": reply.category,
            "x-mailpipe-advice": reply.advice, "x-mailpipe-tenant": job.tenant,
            "x-mailpipe-job-id": job.id, "x-mailpipe-server": job.server,
            "x-mailpipe-attempt": job.attempt})

    def _event(self, job: Job, batch: Batch, outcome: str, recipients: list[str], reply: Reply,
               at_ms: int) -> Outgoing:
        event = Event(job_id=job.id, tenant=job.tenant, server=job.server, outcome=outcome,
                      recipients=tuple(recipients), attempt=job.attempt, created_ms=job.created_ms,
                      at_ms=at_ms, code=reply.code, text=reply.text[:1000], category=reply.category,
                      advice=reply.advice, batch_id=batch.id, findings=job.findings)
        return Outgoing(f"{outcome}.{job.tenant}", codec.encode_event(event), exchange=self.topology.events,
                        mandatory=False)

    def _give_back(self, batch: Batch, raws: list[bytes], jobs: list[Job], reason: str) -> Outgoing:
        """The mails not attempted, as a new ungranted batch whose refund returns their tokens.

        Its id is derived from the batch and its grant, so that a redelivered batch hands back
        under the same id and the limiter applies the refund once.
        """
        back = Batch(id=hashlib.sha256(f"{batch.id}:{batch.grant_id}:back".encode()).hexdigest()[:32],
                     server=batch.server, jobs=tuple(raws), mails=len(raws),
                     bytes=sum(job.size for job in jobs), created_ms=batch.created_ms,
                     refund=len(raws), tenants=dict(Counter(job.tenant for job in jobs)))
        metrics.REFUNDS.labels(batch.server, reason).inc(len(raws))
        return Outgoing(self.topology.batches, codec.encode_batch(back), message_id=back.id)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed: its transports cost a fraction of asyncio's, and the
    SMTP loop is most of the sender's time (the pipeline bench: 1,300 -> 1,800 mails/s)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _group(replies: dict[str, Reply]) -> list[tuple[Reply, list[str]]]:
    """Recipients that got the same reply, together: one retry copy or dead letter per reply."""
    groups: dict[Reply, list[str]] = {}
    for recipient, reply in replies.items():
        groups.setdefault(reply, []).append(recipient)
    return list(groups.items())
