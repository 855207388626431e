"""The sender stage: granted batches from ``send`` are delivered over SMTP inside their window.

Read top to bottom, a batch goes:
1. ``handle``: decode it; its delivery starts on the SMTP event loop (``sender/loop.py``: a
   second thread, with the connection pools and the claims), so several batches are in
   flight and connections persist across batches.
2. ``deliver`` (sender/delivery.py) claims its recipients in Redis (one holder per recipient;
   Redis time says whether the batch is late) and sends its jobs until done or the deadline.
   A batch picked up at or after its deadline sends nothing (a backlog never bursts above the
   rate).
3. ``tick`` collects finished deliveries and, for each batch, publishes every output
   (``sender/outputs.py`` decides them) with ONE confirmed ``broker.publish`` call, then
   releases its claims (on the SMTP loop, retried while Redis refuses), then acks the batch:
   - events to the ``events`` exchange, routing key ``<outcome>.<tenant>``;
   - refused recipients as ``mailpipe/retry.py``'s ``retry_step`` decides: a copy of the job
     (attempt + 1) to its retry queue, or to the dead-letter queue as ``expired`` or with the
     category of the server's reply;
   - mail not sent under this grant back to ``batches``, refunding the tokens of the jobs
     nobody touched under it (the limiter returns only what the grant still owes).
Accepted recipients were marked "sent" right after their 250, before the next mail on their
connection, so any other holder skips them; deferred ones were recorded as deferred before the
delivery ended (sender/delivery.py), so their retry copies are published only once no holder of
their attempt can send them again.

After a lost broker connection, the deliveries it started are fenced before consuming again:
they start no more mail, finish what is on the wire, and release their claims as touched
under their grant; the redelivered batch then skips what they sent and hands the rest back.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass

import redis

from mailpipe import codec, redis_client
from mailpipe import metrics as kernel_metrics
from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.errors import BrokerUnavailable, ConfigError, InvalidMessage, RedisUnavailable
from mailpipe.feedback import RatioGauges
from mailpipe.model import Batch, Category, Job, Outcome, now_ms
from mailpipe.pushback import Policy, Pushback, tenant_events
from mailpipe.reputation import Thresholds
from mailpipe.retry import RetryPolicy
from mailpipe.servers import ConfigWatcher, ServerConfig
from mailpipe.settings import Settings
from mailpipe.stage import Stage
from sender import metrics
from sender.delivery import US, BatchDelivery, Hold, JobOutcome, deliver
from sender.envelope import Envelopes, aftermath
from sender.loop import LoopHost
from sender.outputs import Outputs

log = logging.getLogger(__name__)


REAP_EVERY_S = 5.0
RELEASE_AGAIN_S = 1.0  # a release Redis refused is tried again after this
MAX_UNRELEASED = 100_000  # claims kept to release again; beyond, the oldest are left to their lease


@dataclass
class _Release:
    """Claims of one finished batch to settle (sender/release.lua): in flight on the SMTP loop,
    or refused by Redis and waiting to be tried again."""

    owner: str
    changes: list[tuple[Job, str, str]]
    future: Future[list[bool]] | None = None
    again_at: float = 0.0
    failures: int = 0


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
        self.outputs = Outputs(self.topology, RetryPolicy.from_settings(settings), self.dead_letter)
        self.smtp = LoopHost(settings)
        self.envelopes = Envelopes(settings)  # VERP and DSN where the server is configured for it
        self._in_flight: list[_InFlight] = []
        self._stopping = False
        self._sync_redis: redis.Redis | None = None  # for suppression, from the main thread
        self._ratios: RatioGauges | None = None  # per tenant, with the sync client (issue 23)
        self._last_reap = time.monotonic()
        self._releases: list[_Release] = []

    @property
    def input_queue(self) -> str:
        return self.topology.send

    @property
    def prefetch(self) -> int:
        return self.settings.send_prefetch

    # -- the Stage hooks ------------------------------------------------------------------------

    def start(self, broker: Broker) -> None:
        self.smtp.start()
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
                outputs.append(self.outputs.give_back(batch, raws, jobs, "ungranted", "", refund=0))
            broker.publish(outputs)
            broker.ack(delivery.tag)
            return
        if outputs:  # the invalid jobs' dead letters go now; the batch is acked after delivery
            broker.publish(outputs)
        flight = _InFlight(delivery, batch, raws, jobs, server, _owner(), Future())
        hold = Hold(self.smtp.claims, flight.owner, batch.grant_id, batch.deadline_ms * 1000,
                    int(self.settings.smtp_timeout_s * US))
        flight.future = self.smtp.submit(self._deliver(flight, hold))
        self._in_flight.append(flight)

    async def _deliver(self, flight: _InFlight, hold: Hold) -> BatchDelivery:
        assert self.smtp.pools is not None
        return await deliver(flight.jobs, flight.server, self.smtp.pools.get(flight.server), 0.0, hold=hold,
                             plan=self.envelopes.planner(flight.server, self.watcher.current()),
                             margin_s=self.settings.send_margin_s,
                             stop=lambda: self._stopping or flight.stopping, pace=self.smtp.pace,
                             policy=Policy.of(flight.server, self.settings))

    def tick(self, broker: Broker) -> None:
        done = [f for f in self._in_flight if f.future.done()]
        for flight in done:
            # Out of _in_flight only once acked: if publishing raises (the connection dropped),
            # the fence after the reconnect still knows this delivery and settles its claims.
            self._finish(broker, flight)
            self._in_flight.remove(flight)
        if done:
            kernel_metrics.IN_FLIGHT.labels(self.name).set(len(self._in_flight))
        self._settle_releases()
        if self._ratios is not None:
            self._ratios.tick()
        if time.monotonic() - self._last_reap > REAP_EVERY_S and self.smtp.pools is not None:
            self._last_reap = time.monotonic()
            self.smtp.submit(self.smtp.pools.reap())

    def busy(self) -> bool:
        return bool(self._in_flight) or any(r.future is not None for r in self._releases)

    def drain(self, broker: Broker, deadline: float) -> None:
        """Start no more mails; wait for the ones in flight; give the rest back with refunds."""
        self._stopping = True
        while (self._in_flight or self._releases) and time.monotonic() < deadline:
            self.tick(broker)
            if self._in_flight or self._releases:
                broker.sleep(0.05)
        if self._in_flight:
            log.warning("%d batch(es) still in flight at shutdown: left unacked, they are redelivered",
                        len(self._in_flight))
        if self._releases:
            log.warning("%d claim(s) not released at shutdown: they end with their lease",
                        sum(len(r.changes) for r in self._releases))

    def ready(self) -> bool:
        if not self.smtp.running:
            return False
        try:
            return self.smtp.call(self.smtp.claims.ping(), timeout_s=3.0)
        except (TimeoutError, RuntimeError, RedisUnavailable):
            return False

    def close(self) -> None:
        if self._sync_redis is not None:
            self._sync_redis.close()
        self.smtp.close()

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
        outputs, back = self.outputs.of_delivery(batch, flight.raws, flight.jobs, result, flight.owner)
        outputs += self._suppress(flight.server, result.outcomes)
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
        # claims to expire, and the next holder hands them back rather than send them again;
        # deferred ones were recorded before the delivery ended, so none is sent again under
        # this attempt (a later holder publishes the retry copy again instead).
        self._release(flight.owner, result.releases(batch.grant_id or ""))
        broker.ack(flight.delivery.tag)
        self._report_pace(broker, flight, result)
        log.info("batch %s: %d mail(s) attempted in %.1f s, %d given back", batch.id,
                 sum(1 for o in result.outcomes if o.attempted), result.ended - result.started, back,
                 extra={"batch_id": batch.id, "server": batch.server, "mails": batch.mails,
                        "given_back": back})

    def _report_pace(self, broker: Broker, flight: _InFlight, result: BatchDelivery) -> None:
        """What the server said, to its pace in Redis (mailpipe/pushback.py): every limiter
        follows it on its next grant. A change is logged (its rule, the reply, the rate before
        and after); a pause or a resume is told to the server's tenants. Best effort: without
        Redis the next batch reports again."""
        if not (result.successes or result.signals):
            return
        server = flight.server
        if self._sync_redis is None:
            self._sync_redis = redis_client.connect(self.settings)
        changes = list(result.changes)
        try:
            changes += Pushback(self._sync_redis, self.settings.namespace).report(
                server.name, Policy.of(server, self.settings), result.successes, result.signals)
        except RedisUnavailable as exc:
            log.warning("cannot report %d signal(s) of %s: %s", len(result.signals), server.name, exc.reason)
        samples = {s.rule: s.sample for s in result.signals}
        for change in changes:
            metrics.PACE_CHANGES.labels(server.name, change.kind).inc()
            sample = samples.get(change.rule, "")
            log.warning("server %s: %s (rule %s%s): %g -> %g mails/h, %s", server.name, change.kind,
                        change.rule or "-", f", reply {sample!r}" if sample else "", change.before, change.after,
                        change.state, extra={"server": server.name, "change": change.kind, "rule": change.rule})
            if change.kind in (Outcome.PAUSED, Outcome.RESUMED):
                self._tell_tenants(broker, flight, change.kind, sample)

    def _tell_tenants(self, broker: Broker, flight: _InFlight, what: str, sample: str) -> None:
        """``paused.<tenant>`` / ``resumed.<tenant>`` to every tenant of the server: those that
        list it, and those whose mail this batch carried (a platform server's)."""
        config = self.watcher.current()
        tenants = {t.name for t in config.tenants.values() if flight.server.name in t.servers}
        tenants |= {job.tenant for job in flight.jobs}
        events = tenant_events(self.topology.events, flight.server.name, tenants, what, sample, flight.batch.id)
        try:
            broker.publish(events)
        except BrokerUnavailable as exc:
            log.warning("cannot tell %d tenant(s) that %s was %s: %s", len(events), flight.server.name, what,
                        exc.reason)

    def _release(self, owner: str, released: list[tuple[Job, str, str]]) -> None:
        """Settle ``released`` on the SMTP loop; ``tick`` sees the result (and tries again)."""
        if released:
            release = _Release(owner, released)
            self._submit_release(release)
            self._releases.append(release)
            self._bound_releases()

    def _submit_release(self, release: _Release) -> None:
        try:
            release.future = self.smtp.submit(self.smtp.claims.release(release.owner, release.changes))
        except RedisUnavailable:  # the loop is not running (shutting down): tried again later
            release.future, release.again_at = None, time.monotonic() + RELEASE_AGAIN_S

    def _settle_releases(self) -> None:
        """Releases Redis refused are tried again every second until it takes them. Meanwhile
        what they leave is safe, but slower: the claims stay held until their lease ends (the
        deadline plus the SMTP timeout), so recipients given back wait that long before a holder
        under another grant sends them, and a copy of the batch under the same grant hands them
        back again; a deferral stays recorded as deferred (sent by the next attempt only)."""
        now = time.monotonic()
        for release in list(self._releases):
            if release.future is None:
                if now >= release.again_at:
                    self._submit_release(release)
                continue
            if not release.future.done():
                continue
            try:
                release.future.result()
            except Exception as exc:  # RedisUnavailable, or the loop's own failure: try again
                release.future, release.again_at = None, now + RELEASE_AGAIN_S
                release.failures += 1
                if release.failures == 1:
                    log.warning("cannot release %d claim(s), trying again every %.0f s: %s (until then "
                                "their recipients wait for the claims' lease before another holder may "
                                "send them)", len(release.changes), RELEASE_AGAIN_S, exc)
                continue
            if release.failures:
                log.info("released %d claim(s) after %d failed attempt(s)", len(release.changes), release.failures)
            self._releases.remove(release)
        metrics.UNRELEASED.set(sum(len(r.changes) for r in self._releases))

    def _bound_releases(self) -> None:
        """Past MAX_UNRELEASED claims waiting, the oldest are left to end with their lease."""
        waiting = sum(len(r.changes) for r in self._releases)
        while waiting > MAX_UNRELEASED and self._releases[0].future is None:
            dropped = self._releases.pop(0)
            waiting -= len(dropped.changes)
            log.warning("%d claim(s) left to end with their lease: %d are waiting to be released",
                        len(dropped.changes), waiting)

    def _suppress(self, server: ServerConfig, outcomes: list[JobOutcome]) -> list[Outgoing]:
        """What the replies say about recipients and tenants (sender/envelope.py): bounces
        suppress or count, 250s reset soft bounces and count as the tenant's sends; returns the
        events. Best effort: without Redis they go unrecorded, and a bad address is refused by
        its server again next time."""
        if self._sync_redis is None:
            self._sync_redis = redis_client.connect(self.settings)
        if self._ratios is None and self.settings.metrics_tenant_label:
            self._ratios = RatioGauges(self._sync_redis, self.settings.namespace,
                                       Thresholds.from_settings(self.settings))
        try:
            return aftermath(self._sync_redis, self.settings, self.topology, server, outcomes, self._ratios)
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot record what the replies of %d mail(s) say: %s", len(outcomes), exc)
            return []


def _owner() -> str:
    """A holder's name in its claims: host, process and this delivery, so no two are alike."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
