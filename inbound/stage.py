"""The inbound stage: bounces, complaints and unsubscribes come back to the tenant, and stop
the next mail (issue 23).

Three doors, each in a thread of its own, all handing raw reports to ``<ns>.reports`` through
one publisher (inbound/publisher.py), confirmed before they answer:
- SMTP for the return-path domains (inbound/receiver.py): refused at RCPT without a valid token,
  capped in size, 250 only once RabbitMQ has the report;
- the one-click unsubscribe endpoint (inbound/unsubscribe.py): the suppression at once, 202;
- (the mailto unsubscribe address is a token of the SMTP door).

Then, read top to bottom, a report goes (``_round``, on the runner's thread):
1. decode it; read it (inbound/reports.py: DSN, ARF, auto-reply, older formats);
2. resolve it against its tokens (inbound/resolve.py): findings, nothing to do, or a review;
3. apply each finding (mailpipe/feedback.py: suppression and reputation in Redis, once per
   report however often it comes) and make its events;
4. publish, in one confirmed call: the events to ``<ns>.events``, the raw report to the
   ``<ns>.reports.archive`` stream (30 days, for the tenant: ``mailpipe reports``), and what
   nothing could read or attribute to ``<ns>.reports.review`` (never dropped);
5. mark the return paths that brought their final report as spent (a replay is refused at
   RCPT), then ack.
A round of deliveries (those that came within ROUND_LINGER_S, at most half the prefetch
window) is read first, then recorded in Redis in two pipelined round trips for all of it, then
published in one confirmed call.

Redis unreachable: fail closed without losing the session (issue 21). The reports whose
findings or return paths need Redis are held unacked, as they came (``_waiting``); what needs
none still goes at once (a malformed message to dead, a report nothing can read to review, an
auto-reply ignored). Redis is asked again with a backoff (mailpipe/stage.py ``RedisOutage``: one
warning per outage, ``mailpipe_failing_closed``, not ready), then the held reports go through
as if they had just come. Recording is idempotent (suppression and reputation marks by event
id), so a round Redis failed half-way is recorded once when it is read again; its events are
published only after the whole round was recorded. Return paths Redis refused to mark spent
after their reports went out are acked and marked once it answers (meanwhile the SMTP door
answers their RCPT 451: it cannot tell a replay). Dropping the session instead had the
reports redelivered about once a second, each time counted, until the quorum queue
dead-lettered them at the delivery limit. Stopping during an outage leaves the held reports
unacked, for another replica.
"""

from __future__ import annotations

import contextlib
import logging
import time

import redis
from prometheus_client import Counter

from inbound.publisher import Publisher
from inbound.receiver import Receiver, spent_key
from inbound.reports import Report, read
from inbound.resolve import Resolved, one_click, resolve
from inbound.unsubscribe import UnsubscribeServer
from inbound.wire import HTTP, RawReport, decode_report
from mailpipe import feedback, redis_client, reputation, suppression
from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.errors import InvalidMessage, RedisUnavailable
from mailpipe.feedback import encode_feedback
from mailpipe.model import Category
from mailpipe.servers import Config, ConfigWatcher
from mailpipe.settings import Settings
from mailpipe.stage import RedisOutage, Stage
from mailpipe.verp import Invalid, Signer, Token

log = logging.getLogger(__name__)

REPORTS = Counter("mailpipe_inbound_reports_total", "Reports read, by kind and what became of them.",
                  ["kind", "result"])
GAUGE_EVERY_S = 10.0
# Reports are read and recorded in rounds: a round's Redis round trips and its confirm are shared,
# and a thread that wakes for a few reports pays for its cold caches each time (py-spy: about
# 1.8 ms a round besides 0.6 ms a report). A report waits at most this long for others.
ROUND_LINGER_S = 0.1
# Redis calls of this stage fail after at most this (as the limiter's and the producer's): a
# frozen Redis must not stall the loop that also serves RabbitMQ's heartbeats.
INBOUND_REDIS_TIMEOUT_S = 1.0
HOLDING = "reports held unacked"  # what the outage's warning says the stage does


class InboundStage(Stage):
    name = "inbound"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.signer = Signer.from_settings(settings)
        if self.signer is None:
            log.warning("inbound: no MAILPIPE_VERP_KEYS: every return path is refused at RCPT")
        self.config = ConfigWatcher(settings.servers_path)
        self.redis = redis_client.connect(settings, min(INBOUND_REDIS_TIMEOUT_S, settings.redis_timeout_s))
        self.policy = suppression.Policy.from_settings(settings)
        self.thresholds = reputation.Thresholds.from_settings(settings)
        self.publisher = Publisher(settings, self.topology)
        self.receiver = Receiver(settings, self.topology, self.signer, self.publisher)
        self.http = UnsubscribeServer(settings, self.topology, self.signer, self.publisher, self.redis)
        self._gauge_at = 0.0
        self._held: list[Delivery] = []  # fresh reports waiting for their round
        self._held_since = 0.0
        # While Redis does not answer: the reports that need it, unacked, as they came; and the
        # return paths of reports published whose spent mark it refused.
        self.outage = RedisOutage(self.name)
        self._waiting: list[Delivery] = []
        self._unspent: list[str] = []
        self._tenants_of: Config | None = None
        self._tenant_names: tuple[str, ...] = ()
        # Per tenant (MAILPIPE_METRICS_TENANT_LABEL): the ratios of the tenants this replica weighs
        # reports for, as they are now (read again while exported, as the sender's are).
        self.ratios = (feedback.RatioGauges(self.redis, settings.namespace, self.thresholds)
                       if settings.metrics_tenant_label else None)

    @property
    def input_queue(self) -> str:
        return self.topology.reports

    @property
    def prefetch(self) -> int:
        return min(self.settings.prefetch, 100)  # reports are up to inbound_max_bytes each

    def start(self, broker: Broker) -> None:
        self._held = []  # what a lost connection held is being redelivered
        self._waiting = []
        self.outage.holding(0)
        # The doors open once the queues exist (the runner has declared them) and stay open
        # across reconnects of this connection: they publish through their own.
        self.publisher.start()
        self.receiver.start()
        self.http.start()

    def handle(self, broker: Broker, deliveries: list[Delivery]) -> None:
        """Fresh reports wait for their round (ROUND_LINGER_S, or half the prefetch window);
        a redelivered one is taken alone at once, as the runner hands it (so that a report that
        crashes the stage every time is the one dead-lettered)."""
        if any(d.redelivered for d in deliveries):
            self._round(broker, deliveries)
            return
        if not self._held:
            self._held_since = time.monotonic()
        self._held += deliveries
        if len(self._held) >= max(1, self.prefetch // 2):
            self._flush(broker)

    def _flush(self, broker: Broker) -> None:
        held, self._held = self._held, []
        self._round(broker, held)

    def _round(self, broker: Broker, deliveries: list[Delivery]) -> None:
        out: list[Outgoing] = []
        read_ones: list[tuple[Delivery, RawReport, str, Resolved]] = []
        for delivery in deliveries:
            try:
                raw = decode_report(delivery.body, self.settings.inbound_max_bytes)
            except InvalidMessage as exc:
                REPORTS.labels("invalid", "dead").inc()
                out.append(self.dead_letter(delivery.body, exc.reason, Category.INVALID))
                continue
            read_ones.append((delivery, raw, *self.understand(raw)))
        done = read_ones
        if self.outage.ask():
            try:
                out += self.apply(read_ones)  # raises before anything is counted or published
            except RedisUnavailable as exc:
                self.outage.failed(exc, HOLDING)
        if not self.outage.ask():  # Redis is away: what needs it waits, as it came
            done = [r for r in read_ones if not needs_redis(r[3])]
            out += self.apply(done)
            self._waiting += [delivery for delivery, *_, resolved in read_ones if needs_redis(resolved)]
        broker.publish(out)
        self.mark_spent([token.id for *_, resolved in done for token in resolved.spent])
        waiting = {d.tag for d in self._waiting}
        broker.ack_all([d.tag for d in deliveries if d.tag not in waiting])
        self.outage.holding(len(self._waiting))

    def mark_spent(self, token_ids: list[str]) -> None:
        """Mark the return paths spent, their reports published: a replay is refused at RCPT.
        Redis away, they are marked once it answers (the reports are out: acked all the same)."""
        if not token_ids:
            return
        if self.outage.ask():
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for token_id in token_ids:
                        pipe.set(spent_key(self.settings.namespace, token_id), b"1",
                                 ex=(self.settings.verp_valid_days + 2) * 86400)
                    pipe.execute()
                return
            except redis.RedisError as exc:
                self.outage.failed(RedisUnavailable(f"Redis: cannot mark return paths as used: {exc}"), HOLDING)
        self._unspent += token_ids

    def understand(self, raw: RawReport) -> tuple[str, Resolved]:
        """What a report is and what it means (pure but for the servers file)."""
        if raw.source == HTTP:
            return "http", self._one_click(raw)
        report = read(raw.data)
        return report.kind, self._resolve(raw, report)

    def apply(self, read_ones: list[tuple[Delivery, RawReport, str, Resolved]]) -> list[Outgoing]:
        """Record every finding of a round (two Redis round trips for all) and return the outputs:
        events, archive copies, reviews."""
        findings = [finding for *_, resolved in read_ones for finding in resolved.findings]
        try:
            applied = iter(feedback.apply_many(self.redis, self.settings.namespace, findings, self.policy,
                                               self.thresholds))
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: cannot record reports: {exc}") from exc
        if self.ratios is not None:
            self.ratios.note(f.tenant for f in findings if feedback.weighs(f))
        out: list[Outgoing] = []
        for delivery, raw, kind, resolved in read_ones:
            out.append(self._archived(raw, kind, resolved.tenant))
            for _ in resolved.findings:
                for event in next(applied):
                    out.append(Outgoing(event.routing_key, encode_feedback(event), exchange=self.topology.events,
                                        mandatory=False, message_id=event.id))
                    feedback.count(event, tenant_label=self.settings.metrics_tenant_label,
                                   suppression_kind=feedback.suppression_kind_of(event))
            if resolved.review:
                REPORTS.labels(kind, "review").inc()
                log.info("report %s to review: %s", raw.id, resolved.review, extra={"report_id": raw.id})
                out.append(Outgoing(self.topology.reports_review, delivery.body, message_id=raw.id, headers={
                    "x-mailpipe-reason": resolved.review[:1000], "x-mailpipe-report-id": raw.id,
                    "x-mailpipe-tenant": resolved.tenant}))
            elif resolved.ignored:
                REPORTS.labels(kind, "ignored").inc()
                log.debug("report %s ignored: %s", raw.id, resolved.ignored)
            else:
                REPORTS.labels(kind, "applied").inc()
        return out

    def _resolve(self, raw: RawReport, report: Report) -> Resolved:
        tenants = self._tenants()
        if self.signer is None:
            return Resolved(review="no keys configured (MAILPIPE_VERP_KEYS): nothing can be attributed")
        tokens = [t for t in (self.signer.verify(rcpt.rpartition("@")[0], tenants) for rcpt in raw.rcpts)
                  if isinstance(t, Token)]
        return resolve(report, report_id=raw.id, at_ms=raw.received_ms, rcpt_tokens=tokens, mail_from=raw.mail_from,
                       signer=self.signer, tenants=tenants)

    def _tenants(self) -> tuple[str, ...]:
        """The servers file's tenants, one tuple per loaded file (the signer indexes it once)."""
        config = self.config.current()
        if config is not self._tenants_of:
            self._tenants_of, self._tenant_names = config, tuple(config.tenants)
        return self._tenant_names

    def _one_click(self, raw: RawReport) -> Resolved:
        token = self.signer.verify_link(raw.link) if self.signer is not None else Invalid("no keys")
        if isinstance(token, Invalid):
            return Resolved(review=f"one-click unsubscribe with a link no longer valid: {token.reason}")
        return Resolved(findings=(one_click(token, raw.id, raw.received_ms),), tenant=token.tenant)

    def _archived(self, raw: RawReport, kind: str, tenant: str) -> Outgoing:
        return Outgoing(self.topology.reports_archive, raw.data or raw.link.encode(), message_id=raw.id, headers={
            "x-mailpipe-report-id": raw.id, "x-mailpipe-tenant": tenant, "x-mailpipe-kind": kind,
            "x-mailpipe-received-ms": raw.received_ms, "x-mailpipe-mail-from": raw.mail_from[:500],
            "x-mailpipe-peer": raw.peer})

    def tick(self, broker: Broker) -> None:
        if self.outage.retry():
            self.try_redis_again(broker)
        now = time.monotonic()
        if self._held and now - self._held_since >= ROUND_LINGER_S:
            self._flush(broker)
        if self.outage.down:
            return  # the gauges wait for Redis
        if self.ratios is not None:
            self.ratios.tick()
        if now - self._gauge_at < GAUGE_EVERY_S:
            return
        self._gauge_at = now
        with contextlib.suppress(redis.RedisError):  # the gauge waits for the next tick
            feedback.PAUSED_TENANTS.set(len(reputation.paused_tenants(self.redis, self.settings.namespace)))

    def try_redis_again(self, broker: Broker) -> None:
        """Redis did not answer: ask again (PING, then the spent marks it refused), then hand
        the held reports over again, a round at a time."""
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            self.outage.failed(RedisUnavailable(f"Redis: {exc}"), HOLDING)
            return
        unspent, self._unspent = self._unspent, []
        self.mark_spent(unspent)
        if not self.outage.ask():  # it failed again
            return
        waiting, self._waiting = self._waiting, []
        size = max(1, self.prefetch // 2)
        for at in range(0, len(waiting), size):
            self._round(broker, waiting[at:at + size])
        self.outage.holding(len(self._waiting))
        self.outage.tried(f"{len(waiting) - len(self._waiting)} held report(s) recorded")

    def drain(self, broker: Broker, deadline: float) -> None:
        """The reports held for their round are done; no new SMTP session or POST; what they took
        is published before the publisher stops. Reports held until Redis answers are left
        unacked: the broker gives them back to another replica."""
        if self._held:
            self._flush(broker)
        if self._waiting:
            log.info("%d report(s) held until Redis answers left unacked, for another replica",
                     len(self._waiting))
        if self._unspent:
            log.warning("%d return path(s) not marked spent (Redis did not answer): a replay of one "
                        "is taken, and recorded once all the same", len(self._unspent))
        self._waiting.clear()
        self.outage.holding(0)
        self.receiver.stop()
        self.http.stop()
        self.publisher.stop(max(0.1, deadline - time.monotonic()))

    def busy(self) -> bool:
        return bool(self._held or self._waiting)

    def ready(self) -> bool:
        if self.outage.down:
            return False
        try:
            return bool(self.redis.ping()) and self.receiver.running
        except redis.RedisError:
            return False

    def close(self) -> None:
        self.receiver.stop()
        self.http.stop()
        self.publisher.stop(1.0)
        self.redis.close()


def needs_redis(resolved: Resolved) -> bool:
    """Whether recording a report needs Redis: findings to apply, or return paths to mark spent."""
    return bool(resolved.findings or resolved.spent)
