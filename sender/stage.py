"""The sender stage: granted batches from ``send`` are delivered over SMTP inside their window.

Read top to bottom, a batch goes:
1. ``handle``: decode it; its delivery starts on the SMTP event loop (a second thread), so
   several batches are in flight and connections persist across batches.
2. ``deliver`` (sender/delivery.py) claims its recipients in Redis (one holder per recipient;
   Redis time says whether the batch is late) and sends its jobs until done or the deadline.
   A batch picked up at or after its deadline sends nothing (a backlog never bursts above the
   rate).
3. ``tick`` collects finished deliveries and, for each batch, publishes every output with ONE
   confirmed ``broker.publish`` call, then releases its claims, then acks the batch:
   - events to the ``events`` exchange, routing key ``<outcome>.<tenant>``;
   - refused recipients as ``mailpipe/retry.py``'s ``retry_step`` decides: a copy of the job
     (attempt + 1) to its retry queue, or to the dead-letter queue as ``expired`` or with the
     category of the server's reply;
   - mail not sent under this grant back to ``batches``, refunding the tokens of the jobs
     nobody touched under it (the limiter returns only what the grant still owes).
Accepted recipients were marked "sent" right after their 250, before the next mail on their
connection, so any other holder skips them.

After a lost broker connection, the deliveries it started are fenced before consuming again:
they start no more mail, finish what is on the wire, and release their claims as touched
under their grant; the redelivered batch then skips what they sent and hands the rest back.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import redis
import redis.asyncio

from mailpipe import codec, redis_client, suppression
from mailpipe import metrics as kernel_metrics
from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.errors import ConfigError, InvalidMessage, RedisUnavailable
from mailpipe.model import Batch, Category, Event, Job, Outcome, now_ms
from mailpipe.retry import Expire, Retry, RetryPolicy, retry_step
from mailpipe.servers import ConfigWatcher, ServerConfig
from mailpipe.settings import Settings
from mailpipe.stage import Stage
from sender import metrics
from sender.claims import Claims
from sender.delivery import US, BatchDelivery, Hold, JobOutcome, deliver
from sender.mx import MxResolver
from sender.replies import SENT_REPLY, Reply, ReplyCategory
from sender.smtp import Pools

log = logging.getLogger(__name__)


T = TypeVar("T")
REAP_EVERY_S = 5.0


@dataclass
class _InFlight:
    delivery: Delivery
    batch: Batch
    raws: list[bytes]  # the valid jobs' bytes, in the order of ``jobs``
    jobs: list[Job]
    server: ServerConfig
    owner: str  # this delivery's name in its claims
    future: Future[BatchDelivery]
    stopping: bool = False  # set to fence it: it starts no more mail


class SenderStage(Stage):
    name = "sender"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.watcher = ConfigWatcher(settings.servers_path)
        self.retry_policy = RetryPolicy.from_settings(settings)
        self._in_flight: list[_InFlight] = []
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pools: Pools | None = None
        self._redis: redis.asyncio.Redis | None = None
        self._claims: Claims | None = None
        self._sync_redis: redis.Redis | None = None  # for suppression, from the main thread
        self._last_reap = time.monotonic()

    @property
    def input_queue(self) -> str:
        return self.topology.send

    @property
    def prefetch(self) -> int:
        return self.settings.send_prefetch

    # -- the SMTP event loop, in its own thread -------------------------------------------------

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
        self._redis = redis_client.connect_async(s, timeout_s=5.0)
        self._claims = Claims(self._redis, s.namespace, s.sent_mark_ttl_s, wait_replicas=s.redis_wait_replicas)

    def _submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._ensure_loop())

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    # -- the Stage hooks ------------------------------------------------------------------------

    def start(self, broker: Broker) -> None:
        self._ensure_loop()
        self._fence(broker)
        self._stopping = False

    def _fence(self, broker: Broker) -> None:
        """Deliveries of a lost connection: their batches are being redelivered, so they start
        no more mail, finish what is on the wire, and release their claims as touched under
        their grant (their outcomes cannot be acked any more: the redelivery hands them back).
        Only then does the stage consume again: it never runs two generations of one batch."""
        fenced, self._in_flight = self._in_flight, []
        for flight in fenced:
            flight.stopping = True
        give_up = time.monotonic() + self.settings.smtp_timeout_s + 5
        while any(not f.future.done() for f in fenced) and time.monotonic() < give_up:
            broker.sleep(0.05)  # keeps the new connection's heartbeats going
        for flight in fenced:
            try:
                result = flight.future.result(0)
            except Exception:  # its claims end with their lease instead
                log.exception("fencing batch %s: its delivery did not end cleanly", flight.batch.id)
                continue
            touched = [(o.job, r, f"a {flight.batch.grant_id}") for o in result.outcomes
                       for r in (*o.deferred, *o.failed, *o.back)]
            self._release(flight.owner, touched)
        if fenced:
            log.info("fenced %d delivery(ies) of the lost connection", len(fenced))

    def handle(self, broker: Broker, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            self._take(broker, delivery)
        kernel_metrics.IN_FLIGHT.labels(self.name).set(len(self._in_flight))

    def _take(self, broker: Broker, delivery: Delivery) -> None:
        try:
            batch = codec.decode_batch(delivery.body)
            server = self.watcher.current().server(batch.server)
        except (InvalidMessage, ConfigError) as exc:
            category = Category.INVALID if isinstance(exc, InvalidMessage) else Category.CONFIG
            broker.publish([self.dead_letter(delivery.body, exc.reason, category)])
            broker.ack(delivery.tag)
            return
        raws, jobs, outputs = [], [], []
        for raw in batch.jobs:
            try:
                jobs.append(codec.decode_job(raw, self.settings.max_message_bytes))
                raws.append(raw)
            except InvalidMessage as exc:
                outputs.append(self.dead_letter(raw, exc.reason, Category.INVALID,
                                                **{"x-mailpipe-batch-id": batch.id}))
        if batch.deadline_ms is None or batch.grant_id is None or not jobs:
            # Never granted: send nothing, hand every mail back for a grant.
            if jobs:
                outputs.append(self._give_back(batch, raws, jobs, "ungranted", "", refund=0))
            broker.publish(outputs)
            broker.ack(delivery.tag)
            return
        if outputs:  # the invalid jobs' dead letters go now; the batch is acked after delivery
            broker.publish(outputs)
        flight = _InFlight(delivery, batch, raws, jobs, server, _owner(), Future())
        hold = Hold(self._claims_or_fail(), flight.owner, batch.grant_id, batch.deadline_ms * 1000,
                    int(self.settings.smtp_timeout_s * US))
        flight.future = self._submit(self._deliver(flight, hold))
        self._in_flight.append(flight)

    def _claims_or_fail(self) -> Claims:
        if self._claims is None:
            raise RedisUnavailable("the SMTP event loop is not running")
        return self._claims

    async def _deliver(self, flight: _InFlight, hold: Hold) -> BatchDelivery:
        assert self._pools is not None
        return await deliver(flight.jobs, flight.server, self._pools.get(flight.server), 0.0, hold=hold,
                             margin_s=self.settings.send_margin_s,
                             stop=lambda: self._stopping or flight.stopping)

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
        if self._loop is None or self._claims is None:
            return False
        try:
            return self._call(self._claims.ping(), timeout_s=3.0)
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
            # its claims are held until their lease ends, so no other holder sends them meanwhile.
            log.exception("delivering batch %s failed", batch.id)
            broker.requeue(flight.delivery.tag)
            return
        outputs: list[Outgoing] = []
        for outcome in result.outcomes:
            outputs.extend(self._outputs(outcome, batch))
        back = [i for i, o in enumerate(result.outcomes) if o.back]
        if back:
            outputs.append(self._give_back(
                batch, [self._with_recipients(flight.raws[i], result.outcomes[i]) for i in back],
                [replace(flight.jobs[i], recipients=tuple(result.outcomes[i].back)) for i in back],
                result.stopped_by or "deadline", flight.owner,
                refund=sum(1 for i in back if result.outcomes[i].refundable),
                refund_tenants=Counter(flight.jobs[i].tenant for i in back if result.outcomes[i].refundable)))
        self._suppress(result.outcomes)
        ended_ms = now_ms()
        if batch.granted_ms is not None:
            used_s = max(0, ended_ms - batch.granted_ms) / 1000
            metrics.WINDOW_USED_SECONDS.labels(batch.server).observe(used_s)
        if batch.deadline_ms is not None and ended_ms > batch.deadline_ms:
            metrics.WINDOW_OVERRUNS.labels(batch.server).inc()
            log.warning("batch %s: delivery ended %.1f s after its deadline", batch.id,
                        (ended_ms - batch.deadline_ms) / 1000)
        broker.publish(outputs)
        # Only now that the outcomes are confirmed: a holder that dies before this leaves its
        # claims to expire, and the next holder hands them back rather than send them again.
        self._release(flight.owner, result.releases(batch.grant_id or ""))
        broker.ack(flight.delivery.tag)
        log.info("batch %s: %d mail(s) attempted in %.1f s, %d given back", batch.id,
                 sum(1 for o in result.outcomes if o.attempted), result.ended - result.started, len(back),
                 extra={"batch_id": batch.id, "server": batch.server, "mails": batch.mails,
                        "given_back": len(back)})

    def _release(self, owner: str, released: list[tuple[Job, str, str]]) -> None:
        if not released:
            return
        try:
            self._call(self._claims_or_fail().release(owner, released))
        except (RedisUnavailable, TimeoutError) as exc:
            # Harmless: the claims end with their lease, and a later holder hands them back.
            log.warning("cannot release %d claim(s): %s", len(released), exc)

    @staticmethod
    def _with_recipients(raw: bytes, outcome: JobOutcome) -> bytes:
        """The job's bytes as they came, or re-encoded for the recipients still to send."""
        if list(outcome.back) == list(outcome.job.recipients):
            return raw
        return codec.encode_job(replace(outcome.job, recipients=tuple(outcome.back)))

    def _suppress(self, outcomes: list[JobOutcome]) -> None:
        """Recipients the server says do not exist are suppressed for their tenant: the intake
        fails later mail to them at once (mailpipe/suppression.py). Best effort: without Redis
        the next mail to them is simply refused by the server again."""
        bad = [(o.job.tenant, r, reply) for o in outcomes for r, reply in o.failed.items()
               if reply.category == ReplyCategory.BAD_RECIPIENT]
        if not bad:
            return
        if self._sync_redis is None:
            self._sync_redis = redis_client.connect(self.settings, timeout_s=2.0)
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
        if sent:  # already_sent too: an event lost with the holder that sent it is not lost
            out.append(self._event(job, batch, "sent", sent, SENT_REPLY, at_ms))
            metrics.MAILS.labels(job.server, "sent", "").inc(len(outcome.sent))
        for reply, recipients in _group({**outcome.deferred, **outcome.failed}):
            step = retry_step(job, tuple(recipients), reply, at_ms, self.retry_policy)
            if isinstance(step, Retry):
                body = codec.encode_job(step.job)  # a large job waits and comes back on jobs.large
                out.append(Outgoing(self.topology.retry_queue(step.job.attempt, len(body)), body,
                                    message_id=f"{job.id}:{step.job.attempt}", expiration_ms=step.expiration_ms))
                metrics.RETRIES.labels(job.server, str(min(step.job.attempt, 10))).inc(len(recipients))
                outcome_name, category = Outcome.DEFERRED, reply.category
            elif isinstance(step, Expire):
                out.append(self._dead(step.job, reply, Category.EXPIRED, step.reason))
                outcome_name, category = Outcome.EXPIRED, reply.category
            else:
                out.append(self._dead(step.job, reply, step.category, step.reason))
                outcome_name, category = Outcome.FAILED, step.category
            out.append(self._event(job, batch, outcome_name, recipients, reply, at_ms))
            metrics.MAILS.labels(job.server, outcome_name, category).inc(len(recipients))
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

    def _give_back(self, batch: Batch, raws: list[bytes], jobs: list[Job], reason: str, owner: str, *,
                   refund: int, refund_tenants: dict[str, int] | None = None) -> Outgoing:
        """Mail not sent under this grant, as a new ungranted batch; ``refund`` of its jobs give
        their tokens back to this batch's grant (the limiter applies that once per grant)."""
        back = Batch(id=hashlib.sha256(f"{batch.id}:{batch.grant_id}:{owner}:back".encode()).hexdigest()[:32],
                     server=batch.server, jobs=tuple(raws), mails=len(raws),
                     bytes=sum(job.size for job in jobs), created_ms=batch.created_ms,
                     refund=refund, tenants=dict(Counter(job.tenant for job in jobs)),
                     refund_of=batch.id if refund else None, refund_tenants=dict(refund_tenants or {}))
        metrics.REFUNDS.labels(batch.server, reason).inc(len(raws))
        return Outgoing(self.topology.batches, codec.encode_batch(back), message_id=back.id)


def _owner() -> str:
    """A holder's name in its claims: host, process and this delivery, so no two are alike."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


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
