"""The limiter stage: lanes -> send, at each server's rate, shared by its tenants by weight, the
same for every replica.

Batches wait in lanes, one queue per (server, tenant, priority) (``mailpipe/lanes.py``), and
Redis knows every tenant that has mail anywhere for a server. Read top to bottom, a batch goes:

1. route: a batch on the ``batches`` queue (a sender's give-back, a batch from an older packer,
   or one the packer put there while Redis was away) gets its refund applied (``refund``, once
   per grant), is split per tenant, published into its lane(s), then acked.
2. plan: per server with mail, Redis says which lanes to take from: those of the tenants first
   in turn order (``taking.lua``), every lane of transactional mail, or, on an unlimited server,
   the oldest.
3. take: a hold registered in Redis (leased), then ``basic.get`` from the lane; the batch is held
   unacked. An empty lane is no longer present, unless a publish landed meanwhile.
4. decide: one Redis decision per due held batch (``decide.lua``: caps, turn, rate, minute) ->
   granted: the part (all that is left, or its first mails) is stamped with ``grant_id``,
   ``granted_ms`` (Redis time) and ``deadline_ms``, published to ``send``, confirmed; once all of
   the batch is granted it is acked and its hold released. Refused: due again after the
   retry-after Redis gave.
5. give back: a batch not due within ``limiter_hold_s`` (a far turn, a tenant capped for today)
   or held that long goes back into its lane as its rest, acked: nothing stays unacked for long
   (RabbitMQ closes a channel that holds a delivery for 30 minutes), and the tenant's place is
   in Redis, not in the message.

Redis unreachable: nothing is released (fail closed); a batch held too long goes back through
``batches``; decisions resume with a capped backoff once Redis answers. Idle lanes are deleted
and lanes rediscovered after Redis lost its memory by ``limiter/housekeeping.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import redis
from prometheus_client import Counter, Gauge, Histogram

from limiter.decide import Decision, Fair, TenantAsk
from limiter.gcra import US, Limits, local_midnights
from limiter.holding import Budget, Held, by_tenant, choose_takes, lines_of, rest_of, unknown_names
from limiter.housekeeping import Housekeeping
from limiter.redis_limiter import Ask, RedisLimiter
from mailpipe import metrics, redis_client
from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.codec import decode_batch, decode_job, encode_batch
from mailpipe.errors import ConfigError, InvalidMessage, RedisUnavailable
from mailpipe.lanes import LaneBatch, LanePublisher, lane_id, queue_name, tenant_of
from mailpipe.model import Batch, Category, derived_id
from mailpipe.pushback import Policy, Pushback, fingerprint
from mailpipe.servers import Config, ConfigWatcher
from mailpipe.settings import Settings
from mailpipe.stage import Stage

log = logging.getLogger(__name__)
T = TypeVar("T")

RELEASED = Counter("mailpipe_limiter_released_mails_total", "Mails the limiter released to send.",
                   ["server"])
DECISIONS = Counter("mailpipe_limiter_decisions_total", "Rate limit decisions, by outcome.",
                    ["server", "outcome"])
GRANT_WAIT_BUCKETS = (0.1, 1, 5, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 86400)
GRANT_WAIT = Histogram("mailpipe_limiter_grant_wait_seconds",
                       "From the batch's creation to its grant (Redis time).", ["server"],
                       buckets=GRANT_WAIT_BUCKETS)
FAILING_CLOSED = Gauge("mailpipe_limiter_failing_closed",
                       "1 while Redis is unreachable: nothing is released.")
HELD = Gauge("mailpipe_limiter_held_batches", "Batches held unacked, taken from their lanes.", ["server"])
TAKEN = Counter("mailpipe_limiter_taken_total", "basic.get from a lane: a batch, or the lane was empty.",
                ["server", "outcome"])
PRIORITY = Counter("mailpipe_limiter_high_priority_total",
                   "High-priority batches: ahead of the line, or rationed (above the tenants' share).",
                   ["server", "outcome"])
HANDED_BACK = Counter("mailpipe_limiter_handed_back_total",
                      "Held batches whose rest went back into their lane (or batches while Redis is away).",
                      ["server", "reason"])
ROUTED = Counter("mailpipe_limiter_routed_batches_total",
                 "Batches from the batches queue published into their lanes (give-backs, older packers).")
# Per tenant only with MAILPIPE_METRICS_TENANT_LABEL=true: a series per tenant and server.
TENANT_RELEASED = Counter("mailpipe_limiter_tenant_released_mails_total",
                          "Mails the limiter released to send, per tenant.", ["server", "tenant"])
TENANT_GRANT_WAIT = Histogram("mailpipe_limiter_tenant_grant_wait_seconds",
                              "From the batch's creation to the grant of each of its parts, per tenant.",
                              ["server", "tenant"], buckets=GRANT_WAIT_BUCKETS)

# Redis calls of the limiter fail after at most this: a dead Redis must not stall the loop
# that also serves RabbitMQ (heartbeats, deliveries).
LIMITER_REDIS_TIMEOUT_S = 1.0
ROUND_PER_LINE = 32  # due batches of one line asked for in one round trip
PLAN_TENANTS = 8  # tenants per server, first in turn order, whose lanes a replica takes from
ROUTE_PREFETCH = 4  # batches from the batches queue held at once (each up to 80 MB)
HOLD_MARGIN_S = 60.0  # a hold's lease: the longest a batch is held, and this
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0  # recover within seconds of Redis coming back


@dataclass
class Round:
    """What one round publishes, the deliveries it acks once that is confirmed, and the holds it
    ends then."""

    outgoing: list[Outgoing] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    released: list[tuple[Batch, int]] = field(default_factory=list)  # (granted part, wait ms)
    parts: list[tuple[str, str]] = field(default_factory=list)  # (server, part id) published in send
    back: list[Held] = field(default_factory=list)  # handed back into their lanes
    ended: list[Held] = field(default_factory=list)  # acked: their holds end

    def metrics(self, per_tenant: bool) -> None:
        for batch, wait_ms in self.released:
            RELEASED.labels(batch.server).inc(batch.mails)
            GRANT_WAIT.labels(batch.server).observe(max(0, wait_ms) / 1000)
            if per_tenant:
                for tenant, mails in batch.tenants.items():
                    TENANT_RELEASED.labels(batch.server, tenant).inc(mails)
                    TENANT_GRANT_WAIT.labels(batch.server, tenant).observe(max(0, wait_ms) / 1000)


class LimiterStage(Stage):
    name = "limiter"

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        super().__init__(settings)
        self.watcher = ConfigWatcher(settings.servers_path)
        self.redis = client or redis_client.connect(settings, min(LIMITER_REDIS_TIMEOUT_S, settings.redis_timeout_s))
        self.limiter = RedisLimiter(self.redis, settings.namespace,
                                    hold_lease_s=settings.limiter_hold_s + HOLD_MARGIN_S,
                                    wait_replicas=settings.redis_wait_replicas)
        self.lanes = LanePublisher(self.redis, settings.namespace, self.topology,
                                   wait_replicas=settings.redis_wait_replicas)
        total = max(1, settings.limiter_prefetch - self.prefetch)
        self.budget = Budget(total=total, per_server=max(1, total * 3 // 4))
        self.housekeeping = Housekeeping(self.limiter, self.lanes, settings)
        self.held: list[Held] = []
        self.incoming: list[Delivery] = []  # from batches, not routed yet
        self.unfit: list[tuple[Held, str, str]] = []  # taken, to dead-letter: (held, reason, category)
        self.empty_at: dict[tuple[str, str], int] = {}  # (server, lane) -> version it was found empty at
        # (server, lane) -> (when its batch handed back is due, refused for a turn): not taken
        # again before (a batch taken only to be handed back each round would churn), unless a
        # turn it waited for comes sooner.
        self.not_before: dict[tuple[str, str], tuple[float, bool]] = {}
        self.checked: set[str] = set()  # lane queues seen to exist by this process
        self.candidates = False  # the last plan had lanes to take from (burst mode waits for them)
        self._config = self.watcher.config
        self._credentials_seen = False  # noted in Redis since the servers file was last read
        self._holds = 0
        self._gauged: set[str] = set()
        self.redis_ok = True
        self.redis_retry_at = 0.0
        self.backoff_s = BACKOFF_MIN_S

    @property
    def input_queue(self) -> str:
        return self.topology.batches

    @property
    def prefetch(self) -> int:
        return max(1, min(ROUTE_PREFETCH, self.settings.limiter_prefetch // 4))

    def start(self, broker: Broker) -> None:
        # What was held is back in its lanes (the broker requeued it): say so, then forget it.
        if self.held:
            self._best_effort(self.limiter.release, _per_server((h.batch.server, (h.member, True)) for h in self.held))
        self.held.clear()
        self.incoming.clear()
        self.checked.clear()
        HELD.clear()
        self._check_redis()

    # -- the flow ---------------------------------------------------------------------------------

    def handle(self, broker: Broker, deliveries: list[Delivery]) -> None:
        self.incoming += deliveries
        self.tick(broker)

    def tick(self, broker: Broker) -> None:
        now = time.monotonic()
        config = self.watcher.current()
        if config is not self._config:  # the servers file changed: a new rate may let them go now
            self._config = config
            self._credentials_seen = False
            for held in self.held:
                held.due = now
        if not self.redis_ok and now < self.redis_retry_at:
            self._hand_back_overdue(broker, now)
            return
        try:
            if not self._credentials_seen:
                self._note_credentials(config)
            self.housekeeping.run(broker, config, now)
            self._route(broker, config)
            self.lanes.mark_pending()
            self._take(broker, config, now)
            self._decide(broker, config, now)
        except RedisUnavailable as exc:
            self._redis_failed(exc, now)
            self._hand_back_overdue(broker, now)
            return
        self._redis_worked()
        self._gauge()

    def _note_credentials(self, config: Config) -> None:
        """A server paused for being broken resumes once its credentials change in the servers
        file (its tenant fixed the password): every replica notes them, the first to see a change
        resumes it."""
        pace = Pushback(self.redis, self.settings.namespace)
        for name, server in sorted(config.servers.items()):
            for change in pace.credentials(name, Policy.of(server, self.settings), fingerprint(server)):
                log.warning("server %s resumed: its credentials changed in the servers file (%s -> %s mails/h)",
                            name, f"{change.before:g}", f"{change.after:g}")
        self._credentials_seen = True

    # 1. route ------------------------------------------------------------------------------------

    def _route(self, broker: Broker, config: Config) -> None:
        if not self.incoming:
            return
        todo, self.incoming = self.incoming, []
        dead: list[Outgoing] = []
        into_lanes: list[LaneBatch] = []
        acks: list[int] = []
        dead_acks: list[int] = []
        try:
            for delivery in todo:
                try:
                    batch = decode_batch(delivery.body)
                    tenants = Tally(decode_job(job).tenant for job in batch.jobs)
                except InvalidMessage as exc:
                    dead.append(self.dead_letter(delivery.body, exc.reason, Category.INVALID))
                    dead_acks.append(delivery.tag)
                    continue
                problem = unknown_names(batch, tenants, config)
                if problem:
                    dead.append(self.dead_letter(delivery.body, problem, Category.CONFIG, server=batch.server))
                    dead_acks.append(delivery.tag)
                    continue
                if batch.refund and batch.refund_of:
                    self.limiter.refund(batch.server, batch.refund_of, batch.refund, Limits.of(
                        config.servers[batch.server], self.settings), sorted(batch.refund_tenants.items()))
                parts = by_tenant(batch) if batch.jobs else []
                into_lanes += [LaneBatch(p.server, lane_id(next(iter(p.tenants)), p.priority), p.mails,
                                         encode_batch(p), p.id) for p in parts]
                acks.append(delivery.tag)
        except (RedisUnavailable, ConfigError):
            self.incoming = todo  # all of them again (a refund is applied once per grant)
            raise
        broker.publish(dead)
        broker.ack_all(dead_acks)
        try:
            self.lanes.publish(broker, into_lanes)
        except RedisUnavailable:
            self.incoming = [d for d in todo if d.tag not in dead_acks]  # kept, routed again later
            raise
        broker.ack_all(acks)
        ROUTED.inc(len(into_lanes))

    # 2 and 3. plan, take -------------------------------------------------------------------------

    def _take(self, broker: Broker, config: Config, now: float) -> None:
        servers = sorted(set(self.limiter.active_servers()) | {h.batch.server for h in self.held})
        if not servers:
            self.candidates = False
            return
        fair = [_is_fair(config, s) for s in servers]
        plans = self.limiter.plan(list(zip(servers, fair, strict=True)), PLAN_TENANTS)
        self.candidates = any(lanes for _, lanes in plans)
        # What these remember holds only while true: a lane found empty until its version moves,
        # a lane handed back until its batch is due.
        listed = {(server, lane): version for server, (_, lanes) in zip(servers, plans, strict=True)
                  for lane, version in lanes}
        self.empty_at = {key: v for key, v in self.empty_at.items() if listed.get(key) == v}
        self.not_before = {key: value for key, value in self.not_before.items() if value[0] > now}
        holds: dict[str, list[str]] = {}
        for server, is_fair, (_, lanes) in zip(servers, fair, plans, strict=True):
            mine = [h for h in self.held if h.batch.server == server]
            first = tenant_of(lanes[0][0]) if is_fair and lanes else None
            if first is not None:  # a batch that waited for another tenant's turn asks once its own comes
                for h in mine:
                    if h.turn and h.tenant == first:
                        h.due = min(h.due, now)
            empty_at = {lane: v for (s, lane), v in self.empty_at.items() if s == server}
            waiting = {h.lane for h in mine if h.due > now}
            waiting |= {lane for (s, lane), (due, turn) in self.not_before.items()
                        if s == server and due > now and not (turn and tenant_of(lane) == first)}
            for lane in choose_takes(lanes, Tally(h.lane for h in mine), waiting, len(mine),
                                     len(self.held) + sum(map(len, holds.values())), self.budget, is_fair, empty_at):
                self._holds += 1
                holds.setdefault(server, []).append(f"{self.lanes.token}/{self._holds} {lane}")
        if not holds:
            return
        versions = self.limiter.hold(holds)
        results: dict[str, list[tuple[str, int, int]]] = {}
        taken: list[Held] = []
        for server, members in holds.items():
            for member, version in zip(members, versions[server], strict=True):
                if version < 0:
                    continue  # being deleted
                held = self._get(broker, config, server, member, now)
                results.setdefault(server, []).append((member, version, held.batch.mails if held else 0))
                if held is None:
                    self.empty_at[(server, member.split(" ", 1)[1])] = version
                else:
                    taken.append(held)
        self.held += taken
        self.limiter.got(results)
        self._dead_on_arrival(broker)

    def _get(self, broker: Broker, config: Config, server: str, member: str, now: float) -> Held | None:
        lane = member.split(" ", 1)[1]
        queue = queue_name(self.settings.namespace, server, lane)
        if queue not in self.checked:
            if broker.message_count(queue) is None:
                return None  # never declared, or deleted: nothing in it
            self.checked.add(queue)
        delivery = broker.get(queue)
        if delivery is None:
            TAKEN.labels(server, "empty").inc()
            return None
        TAKEN.labels(server, "batch").inc()
        tenant = tenant_of(lane)
        problem, category = "", Category.CONFIG
        try:
            batch = decode_batch(delivery.body)
            problem = unknown_names(batch, {tenant: batch.mails}, config) or (
                "" if batch.mails else "batch.jobs: empty")
        except InvalidMessage as exc:
            batch = Batch(id=delivery.message_id or "", server=server, jobs=(), mails=0, bytes=0, created_ms=0)
            problem, category = exc.reason, Category.INVALID
        held = Held(delivery, batch, tenant, lane, member, since=now, due=now)
        if problem:
            self.unfit.append((held, problem, category))
        elif batch.priority == "high":
            held.ahead = self._ahead(batch, tenant, config)
        return held

    def _dead_on_arrival(self, broker: Broker) -> None:
        """Batches taken that cannot be limited (they do not decode, or name a server or tenant
        the servers file lacks): dead letters with the reason, acked, their holds released."""
        if not self.unfit:
            return
        out = Round()
        for held, problem, category in self.unfit:
            out.outgoing.append(self.dead_letter(held.delivery.body, problem, category, server=held.batch.server))
            out.acks.append(held.delivery.tag)
            out.ended.append(held)
        self.unfit.clear()
        self._flush(broker, out)

    def _ahead(self, batch: Batch, tenant: str, config: Config) -> bool:
        """Within its tenant's share of the server for high priority? Above it, or while Redis
        does not answer, the batch waits for its turn as normal mail."""
        try:
            limits = Limits.of(config.servers[batch.server], self.settings)
            ahead = self.limiter.ration_high(batch.server, {tenant: batch.mails}, limits,
                                             self.settings.high_priority_share)
        except (KeyError, ConfigError, RedisUnavailable):
            ahead = False
        PRIORITY.labels(batch.server, "ahead" if ahead else "rationed").inc()
        return ahead

    # 4 and 5. decide, give back ------------------------------------------------------------------

    def _decide(self, broker: Broker, config: Config, now: float) -> None:
        out = Round()
        asked: list[tuple[Held, Ask, float]] = []
        for line in lines_of(self.held).values():
            for held in list(line)[:ROUND_PER_LINE]:
                if held.due > now:
                    break
                try:
                    ask, step_s = self._ask(held, config)
                except (KeyError, ConfigError) as exc:  # the servers file changed under it
                    reason = exc.reason if isinstance(exc, ConfigError) else f"unknown server or tenant {exc}"
                    out.outgoing.append(self.dead_letter(held.delivery.body, reason, Category.CONFIG,
                                                         server=held.batch.server))
                    out.acks.append(held.delivery.tag)
                    out.ended.append(held)
                    continue
                asked.append((held, ask, step_s))
        if asked:
            decisions = self.limiter.decide_many([ask for _, ask, _ in asked], uuid.uuid4().hex)
            for (held, _, step_s), decision in zip(asked, decisions, strict=True):
                self._decided(out, held, decision, step_s, now)
        for held in self.held:
            if held not in out.ended and held not in out.back and (
                    now - held.since > self.settings.limiter_hold_s or held.due - now > self.settings.limiter_hold_s):
                out.back.append(held)
                self.not_before[(held.batch.server, held.lane)] = (held.due, held.turn)
                HANDED_BACK.labels(held.batch.server, "held" if now - held.since > self.settings.limiter_hold_s
                                   else "far").inc()
        self._flush(broker, out)

    def _ask(self, held: Held, config: Config) -> tuple[Ask, float]:
        batch = held.batch
        limits = Limits.of(config.servers[batch.server], self.settings)
        tenant = config.tenants[held.tenant]
        wall = time.time()  # only to offer the days around now; Redis time picks today
        ask = Ask(batch.server, held.part_id, held.remaining, limits,
                  [TenantAsk(held.tenant, held.remaining, tenant.daily_limit, local_midnights(tenant.timezone, wall))],
                  Fair(held.tenant, tenant.weight, held.ahead), held.member, held.lane, held.tenant)
        return ask, limits.interval_us / US

    def _decided(self, out: Round, held: Held, decision: Decision, step_s: float, now: float) -> None:
        server = held.batch.server
        if decision.skipped:
            return
        if decision.granted:
            held.turn = False
            self._release(out, held, decision)
            if held.remaining:
                held.due = now + step_s  # the rest: its next turn is a mail's time away at least
            else:
                out.acks.append(held.delivery.tag)
                out.ended.append(held)
            return
        DECISIONS.labels(server, "refused").inc()
        held.due = now + decision.retry_after_us / US
        held.turn = decision.turn

    def _release(self, out: Round, held: Held, decision: Decision) -> None:
        """Publish the granted part (all that is left, or its first ``granted`` mails), unless
        it is in the send queue already (a redelivered batch whose part was confirmed there)."""
        batch = held.batch
        start, end = held.offset, held.offset + min(decision.granted, held.remaining)
        part_id = held.part_id
        held.offset = end
        if decision.published:
            return
        part = dataclasses.replace(
            batch, id=part_id, jobs=batch.jobs[start:end], mails=end - start, bytes=held.bytes_of(start, end),
            tenants={held.tenant: end - start}, grant_id=derived_id(part_id, f"grant:{decision.now_us}"),
            granted_ms=decision.now_ms, deadline_ms=decision.now_ms + int(self._window_s(batch.server) * 1000),
            refund=0, refund_of=None, refund_tenants={})
        out.outgoing.append(Outgoing(self.topology.send, encode_batch(part), message_id=part.id))
        out.released.append((part, decision.now_ms - batch.created_ms))
        out.parts.append((batch.server, part_id))
        DECISIONS.labels(batch.server, "granted" if start == 0 and end == batch.mails else "split").inc()
        log.debug("batch %s: %d of %d mails granted (%s)", batch.id, end - start, batch.mails, part.id)

    def _window_s(self, server: str) -> float:
        config = self._config.servers.get(server)
        if config is not None and config.per_minute:
            return min(self.settings.window_s, self.settings.minute_window_s)
        return self.settings.window_s

    def _flush(self, broker: Broker, out: Round) -> None:
        """Publish the round (parts to send, dead letters), confirmed; hand the rests back into
        their lanes; ack; then end the holds in Redis."""
        back = [h for h in out.back if h in self.held]
        broker.publish(out.outgoing)
        rests = [self._rest(h) for h in back if h.remaining]
        try:
            self.lanes.publish(broker, rests)
        except RedisUnavailable:  # through ``batches`` (no Redis needed), routed again later
            broker.publish([Outgoing(self.topology.batches, r.body, message_id=r.message_id) for r in rests])
        broker.ack_all([*out.acks, *(h.delivery.tag for h in back)])
        out.metrics(self.settings.metrics_tenant_label)
        gone = {id(h) for h in (*out.ended, *back)}
        self.held = [h for h in self.held if id(h) not in gone]
        self._best_effort(self.limiter.published, _per_server(out.parts))
        self._best_effort(self.limiter.release, _per_server(
            (h.batch.server, (h.member, False)) for h in (*out.ended, *back)))

    def _rest(self, held: Held) -> LaneBatch:
        rest = held.batch if held.offset == 0 else rest_of(held.batch, held.tenant, held.offset,
                                                            held.bytes_of(held.offset, held.batch.mails))
        body = held.delivery.body if held.offset == 0 else encode_batch(rest)
        return LaneBatch(rest.server, held.lane, rest.mails, body, rest.id)

    # -- while Redis is away -------------------------------------------------------------------

    def _hand_back_overdue(self, broker: Broker, now: float) -> None:
        """A batch held too long goes to ``batches`` (no Redis needed): routed into its lane again
        once Redis answers. Its hold ends with its lease, which marks its lane present again."""
        overdue = [h for h in self.held if now - h.since > self.settings.limiter_hold_s]
        if not overdue:
            return
        rests = [(h, self._rest(h)) for h in overdue if h.remaining]
        broker.publish([Outgoing(self.topology.batches, rest.body, message_id=rest.message_id) for _, rest in rests])
        broker.ack_all(h.delivery.tag for h in overdue)
        for h in overdue:
            HANDED_BACK.labels(h.batch.server, "redis").inc()
        gone = {id(h) for h in overdue}
        self.held = [h for h in self.held if id(h) not in gone]

    def _best_effort(self, call: Callable[[dict[str, list[T]]], object], per_server: dict[str, list[T]]) -> None:
        """A call that may fail without harm: the holds' leases and the next redelivery cover it."""
        if not per_server:
            return
        try:
            call(per_server)
        except RedisUnavailable as exc:
            log.debug("%s", exc.reason)

    def _redis_failed(self, exc: RedisUnavailable, now: float) -> None:
        if self.redis_ok:
            log.warning("failing closed, nothing is released: %s", exc.reason)
        self.redis_ok = False
        FAILING_CLOSED.set(1)
        self.redis_retry_at = now + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, BACKOFF_MAX_S)

    def _redis_worked(self) -> None:
        if not self.redis_ok:
            log.info("Redis answers again: releasing")
            metrics.RECONNECTS.labels(self.name, "redis").inc()
        self.redis_ok = True
        FAILING_CLOSED.set(0)
        self.backoff_s = BACKOFF_MIN_S

    def _check_redis(self) -> None:
        try:
            self.limiter.ping()
        except RedisUnavailable as exc:
            self._redis_failed(exc, time.monotonic())
            return
        self._redis_worked()

    def _gauge(self) -> None:
        held = Tally(h.batch.server for h in self.held)
        self._gauged |= set(held)
        for server in self._gauged:
            HELD.labels(server).set(held[server])

    def drain(self, broker: Broker, deadline: float) -> None:
        """Stopping: route what came in, and hand every held batch (what is left of it) back
        into its lane (through ``batches`` if Redis does not answer), for another replica."""
        out = Round(back=list(self.held))
        try:
            self._route(broker, self._config)
            self._flush(broker, out)
        except RedisUnavailable:
            self._hand_back_overdue(broker, float("inf"))

    def busy(self) -> bool:
        return bool(self.held or self.incoming or self.candidates)

    def ready(self) -> bool:
        return self.redis_ok

    def close(self) -> None:
        self.redis.close()


def _is_fair(config: Config, server: str) -> bool:
    """A server whose rate its tenants share by turns (an unlimited one has no rate to share)."""
    known = config.servers.get(server)
    return known is not None and not known.unlimited


def _per_server(pairs: Iterable[tuple[str, T]]) -> dict[str, list[T]]:
    out: dict[str, list[T]] = {}
    for server, item in pairs:
        out.setdefault(server, []).append(item)
    return out
