"""The limiter stage: batches -> send, at each server's rate, shared by every replica.

Read top to bottom, a batch goes: consume -> check its server and tenants are in the servers
file (else dead-letter) -> hold it, unacked, in its server's line -> when due, one Redis
decision (``gcra.lua``: apply its refund once, then ask for its mails) ->

- granted: stamp ``grant_id``, ``granted_ms`` (Redis time), ``deadline_ms`` and publish it to
  ``send``, confirmed, then ack. A grant of part of the batch (a turn of the fair share, a
  burst, a daily cap) publishes that part to ``send`` and keeps the rest held, to ask again:
  its parts have ids derived from the batch's and the offset, so a redelivered batch gets the
  same parts with the same grants.
- refused: due again after the retry-after Redis gave. A batch not due within
  ``limiter_hold_s`` (a server far behind, a tenant's cap reached for today) is parked: its
  bytes go to a delay queue that dead-letters back to ``batches``, then it is acked. Nothing
  waits unacked for long (RabbitMQ closes a channel that holds a delivery for 30 minutes).

Batches are held in lines per (server, tenant), and only the head of a line asks Redis, so a
slow server never holds up a fast one, and a big batch is not starved by smaller ones behind it.
Whose turn it is on a server is decided in Redis (``gcra.lua``'s fair share), the same for every
replica; a batch that arrives holding several tenants' mails is first split into one per tenant.
Redis unreachable: nothing is released (fail closed), held batches stay held (or are parked
when held too long), and decisions resume with a capped backoff once Redis answers again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import redis
from prometheus_client import Counter, Gauge, Histogram

from limiter.gcra import (
    US,
    Ask,
    Decision,
    Fair,
    Limits,
    RedisLimiter,
    TenantAsk,
    local_midnights,
)
from mailpipe import metrics, redis_client
from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.codec import decode_batch, decode_job, encode_batch
from mailpipe.errors import ConfigError, InvalidMessage, RedisUnavailable
from mailpipe.model import Batch, Category, derived_id
from mailpipe.servers import Config, ConfigWatcher
from mailpipe.settings import Settings
from mailpipe.stage import Stage

log = logging.getLogger(__name__)

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
HELD = Gauge("mailpipe_limiter_held_batches", "Batches held unacked, waiting for their turn.", ["server"])
PRIORITY = Counter("mailpipe_limiter_high_priority_total",
                   "High-priority batches: ahead of the line, or rationed (above the tenants' share).",
                   ["server", "outcome"])
PARKED = Counter("mailpipe_limiter_parked_total", "Batches sent through the delay queue to wait.",
                 ["server", "reason"])
# Per tenant only with MAILPIPE_METRICS_TENANT_LABEL=true: a series per tenant and server.
TENANT_RELEASED = Counter("mailpipe_limiter_tenant_released_mails_total",
                          "Mails the limiter released to send, per tenant.", ["server", "tenant"])
TENANT_GRANT_WAIT = Histogram("mailpipe_limiter_tenant_grant_wait_seconds",
                              "From the batch's creation to the grant of each of its parts, per tenant.",
                              ["server", "tenant"], buckets=GRANT_WAIT_BUCKETS)

# Redis calls of the limiter fail after at most this: a dead Redis must not stall the loop
# that also serves RabbitMQ (heartbeats, deliveries).
LIMITER_REDIS_TIMEOUT_S = 1.0
# A round asks Redis for up to this many due batches of each line in one round trip.
ROUND_PER_LINE = 32
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0  # recover within seconds of Redis coming back


Line = tuple[str, str]  # (server, tenant)


@dataclass(eq=False)  # a held batch is itself: line.remove() and ``in`` go by identity
class Held:
    """A batch of one tenant (none for a bare refund), held unacked; ``offset`` of its jobs are
    granted already (published to send as parts)."""

    delivery: Delivery
    batch: Batch
    tenant: str
    sizes: list[int]  # each job's message bytes
    since: float  # monotonic
    due: float  # monotonic: when to ask Redis
    ahead: bool = False  # transactional mail within its tenant's share: ahead of the line
    offset: int = 0

    @property
    def line(self) -> Line:
        return self.batch.server, self.tenant

    @property
    def remaining(self) -> int:
        return self.batch.mails - self.offset

    @property
    def part_id(self) -> str:
        """The id of the part asked for next: the batch's own for the first."""
        return self.batch.id if self.offset == 0 else derived_id(self.batch.id, f"from:{self.offset}")


@dataclass
class Round:
    """What one round of decisions publishes, and the deliveries it acks once that is confirmed."""

    outgoing: list[Outgoing] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    released: list[tuple[Batch, int]] = field(default_factory=list)  # (granted part, wait ms)
    left: set[Line] = field(default_factory=set)  # lines emptied by parking: their tenants leave
    parts: list[tuple[str, str]] = field(default_factory=list)  # (server, part id) published in send

    def flush(self, broker: Broker, per_tenant: bool) -> None:
        broker.publish(self.outgoing)
        broker.ack_all(self.acks)
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
        self.limiter = RedisLimiter(self.redis, settings.namespace, fair_lease_s=settings.fair_lease_s,
                                    wait_replicas=settings.redis_wait_replicas)
        self.lines: dict[Line, deque[Held]] = {}
        self._config = self.watcher.config
        self._gauged: set[str] = set()
        self.redis_ok = True
        self.redis_retry_at = 0.0
        self.backoff_s = BACKOFF_MIN_S

    @property
    def input_queue(self) -> str:
        return self.topology.batches

    @property
    def prefetch(self) -> int:
        return self.settings.limiter_prefetch

    @property
    def per_server_hold(self) -> int:
        # A quarter of the window stays free for other servers' deliveries.
        return max(1, self.prefetch * 3 // 4)

    def start(self, broker: Broker) -> None:
        self.lines.clear()  # whatever was held is being redelivered
        HELD.clear()
        self._check_redis()

    # -- the flow ---------------------------------------------------------------------------------

    def handle(self, broker: Broker, deliveries: list[Delivery]) -> None:
        now = time.monotonic()
        config = self.watcher.current()
        out = Round()
        for delivery in deliveries:
            try:
                batch = decode_batch(delivery.body)
                jobs = [decode_job(job) for job in batch.jobs]  # every job decodes: a part never fails
            except InvalidMessage as exc:
                self._dead(out, delivery, exc.reason, Category.INVALID)
                continue
            tenants = Tally(job.tenant for job in jobs)
            problem = unknown_names(batch, tenants, config)
            if problem:
                self._dead(out, delivery, problem, Category.CONFIG, server=batch.server)
                continue
            if len(tenants) > 1:  # from an older packer: one batch per tenant, then their turns
                out.outgoing += [Outgoing(self.topology.batches, encode_batch(b), message_id=b.id)
                                 for b in by_tenant(batch)]
                out.acks.append(delivery.tag)
                continue
            tenant = next(iter(tenants), "")
            held = Held(delivery, batch, tenant, [job.size for job in jobs], since=now, due=now)
            line = self.lines.setdefault(held.line, deque())
            if batch.priority == "high" and self._ahead(batch, dict(tenants), config):
                # Transactional mail goes ahead of its tenant's normal batches, and does not
                # wait for the tenant's turn on the server (within its share for high priority).
                held.ahead = True
                line.insert(sum(1 for h in line if h.ahead), held)
            else:
                line.append(held)
        self._decide_due(out, config, now)
        self._flush(broker, out)

    def tick(self, broker: Broker) -> None:
        now = time.monotonic()
        if not self.lines:
            if not self.redis_ok and now >= self.redis_retry_at:
                self._check_redis()  # keep ready() true to Redis even when idle
            return
        out = Round()
        self._decide_due(out, self.watcher.current(), now)
        self._flush(broker, out)

    def _flush(self, broker: Broker, out: Round) -> None:
        out.flush(broker, self.settings.metrics_tenant_label)
        self._mark_published(out.parts)
        self._leave(out.left)
        self._gauge()

    def _decide_due(self, out: Round, config: Config, now: float) -> None:
        if config is not self._config:  # the servers file changed: a new rate may let them go now
            self._config = config
            for line in self.lines.values():
                line[0].due = now
        if not self.redis_ok and now < self.redis_retry_at:
            self._park_overdue(out, now)
            return
        while self._round(out, config, now):
            pass
        if not self.redis_ok:
            return
        for key, line in list(self.lines.items()):
            self._park_far_turns(out, line, config, now)
            self._renew_long_held(out, line, now)
            if not line:
                del self.lines[key]
        self._park_over_hold(out, now)

    def _round(self, out: Round, config: Config, now: float) -> bool:
        """One round trip to Redis: the due batches at the front of every line, each line in
        order. True when a line moved and its new head may be due: another round then."""
        asked: list[tuple[Held, Ask, list[str], float]] = []
        for line in self.lines.values():
            for held in list(line)[:ROUND_PER_LINE]:
                if held.due > now:
                    break
                problem = unknown_names(held.batch, {held.tenant: held.remaining} if held.tenant else {},
                                        config)  # the file may have changed
                if problem is None:
                    try:
                        asked.append((held, *self._ask(held, line, config)))
                        continue
                    except ConfigError as exc:
                        problem = exc.reason
                line.remove(held)
                self._dead(out, held.delivery, problem, Category.CONFIG, server=held.batch.server)
        if not asked:
            return False
        try:
            decisions = self.limiter.acquire_many([ask for _, ask, _, _ in asked])
        except RedisUnavailable as exc:
            self._redis_failed(exc, now)
            self._park_overdue(out, now)
            return False
        self._redis_worked()
        moved = False
        for (held, _, names, step_s), decision in zip(asked, decisions, strict=True):
            line = self.lines[held.line]
            if decision.skipped or held not in line:
                continue
            if decision.granted:
                self._release(out, held, decision, names)
                if held.remaining:
                    held.due = now + step_s  # the rest: its next turn is a mail's time away at least
                    continue
            elif held.batch.mails == 0:  # a bare refund: applied, nothing to send
                out.acks.append(held.delivery.tag)
            else:
                DECISIONS.labels(held.batch.server, "refused").inc()
                held.due = now + decision.retry_after_us / US
                if held.due - now <= self.settings.limiter_hold_s:
                    continue  # the head of its line, due again soon
                self._park(out, held, held.due - now, "wait")
            line.remove(held)
            moved = True
        return moved

    def _ahead(self, batch: Batch, tenants: dict[str, int], config: Config) -> bool:
        """Within its tenant's share of the server for high priority? Above it, or while Redis
        does not answer, the batch waits in line as normal mail."""
        try:
            limits = Limits.of(config.servers[batch.server], self.settings)
            ahead = self.limiter.ration_high(batch.server, tenants, limits, self.settings.high_priority_share)
        except (ConfigError, RedisUnavailable):
            ahead = False
        PRIORITY.labels(batch.server, "ahead" if ahead else "rationed").inc()
        return ahead

    def _ask(self, held: Held, line: deque[Held], config: Config) -> tuple[Ask, list[str], float]:
        """The request for what is left of a held batch, its tenants in the order of the grant,
        and the server's time per mail (s)."""
        batch = held.batch
        limits = Limits.of(config.servers[batch.server], self.settings)
        wall = time.time()  # only to offer the days around now; Redis time picks today
        first = held.offset == 0  # a give-back's refund comes with the first part's ask
        refund_tenants = batch.refund_tenants if first else {}
        counts = {held.tenant: held.remaining} if held.tenant else {}
        names = sorted(counts.keys() | refund_tenants.keys())
        asks = [TenantAsk(n, counts.get(n, 0), config.tenants[n].daily_limit,
                          local_midnights(config.tenants[n].timezone, wall), refund_tenants.get(n, 0))
                for n in names]
        homes = [config.tenants[n].server for n in names]
        fair = None
        if held.tenant:
            backlog = sum(h.remaining for h in line)
            fair = Fair(held.tenant, config.tenants[held.tenant].weight, backlog, held.ahead)
        ask = Ask(batch.server, held.part_id, held.remaining, limits, batch.refund if first else 0, asks, homes,
                  (batch.refund_of or "") if first else "", fair, held.tenant)
        return ask, names, limits.interval_us / US

    def _release(self, out: Round, held: Held, decision: Decision, names: list[str]) -> None:
        """Publish the granted part (all that is left, or its first ``granted`` mails), unless
        it is in the send queue already (a redelivered batch whose part was confirmed there)."""
        batch = held.batch
        start, end = held.offset, held.offset + min(decision.granted, held.remaining)
        part_id = held.part_id
        if decision.published:
            held.offset = end
            if not held.remaining:
                out.acks.append(held.delivery.tag)
            return
        part = dataclasses.replace(
            batch, id=part_id, jobs=batch.jobs[start:end], mails=end - start, bytes=sum(held.sizes[start:end]),
            tenants={held.tenant: end - start} if held.tenant else {},
            grant_id=derived_id(part_id, f"grant:{decision.now_us}"), granted_ms=decision.now_ms,
            deadline_ms=decision.now_ms + int(self.settings.window_s * 1000), refund=0, refund_of=None,
            refund_tenants={})
        out.outgoing.append(Outgoing(self.topology.send, encode_batch(part), message_id=part.id))
        out.released.append((part, decision.now_ms - batch.created_ms))
        out.parts.append((batch.server, part_id))
        held.offset = end
        whole = start == 0 and end == batch.mails
        DECISIONS.labels(batch.server, "granted" if whole else "split").inc()
        if not held.remaining:
            out.acks.append(held.delivery.tag)
        log.debug("batch %s: %d of %d mails granted (%s)", batch.id, end - start, batch.mails, part.id)

    # -- waiting, failing, giving back --------------------------------------------------------

    def _park(self, out: Round, held: Held, wait_s: float, reason: str) -> None:
        delays = self.topology.park_delays_s
        delay = max([d for d in delays if d <= wait_s], default=delays[0])
        self._hand_back(out, held, self.topology.park_queue(delay))
        PARKED.labels(held.batch.server, reason).inc()

    def _hand_back(self, out: Round, held: Held, queue: str) -> None:
        """What is left of a held batch goes to ``queue``, then the batch is acked."""
        if held.offset == 0:
            out.outgoing.append(Outgoing(queue, held.delivery.body, message_id=held.batch.id))
        else:
            rest = rest_of(held.batch, held.tenant, held.offset, sum(held.sizes[held.offset:]))
            out.outgoing.append(Outgoing(queue, encode_batch(rest), message_id=rest.id))
        out.acks.append(held.delivery.tag)
        if held.tenant and all(h is held for h in self.lines.get(held.line, ())):
            out.left.add(held.line)

    def _park_far_turns(self, out: Round, line: deque[Held], config: Config, now: float) -> None:
        """Behind the head, each batch's turn comes at the earliest when the mails ahead of it
        have been paced out; one whose turn is beyond ``limiter_hold_s`` waits in a delay queue
        instead of holding a slot."""
        server = config.servers.get(line[0].batch.server) if line else None
        if server is None or server.unlimited:
            return
        step_s = 3600 / server.rate_per_hour
        turn = max(line[0].due, now) + line[0].remaining * step_s
        for held in list(line)[1:]:
            if turn - now > self.settings.limiter_hold_s:
                line.remove(held)
                self._park(out, held, turn - now, "turn")
            turn += held.batch.mails * step_s

    def _renew_long_held(self, out: Round, line: deque[Held], now: float) -> None:
        """A batch granted part by part (its tenant's turns on a shared server) may take longer
        than RabbitMQ lets a delivery stay unacked: after ``limiter_hold_s`` what is left goes
        back to ``batches`` as a new message. Its tenant keeps its place: the place is its
        finish tag in Redis, not the message."""
        for held in [h for h in line if now - h.since > self.settings.limiter_hold_s]:
            self._hand_back(out, held, self.topology.batches)
            line.remove(held)
            PARKED.labels(held.batch.server, "renewed").inc()

    def _park_over_hold(self, out: Round, now: float) -> None:
        """At most ``per_server_hold`` batches of a server: the heads of its lines stay (they are
        its tenants' turns); the latest behind them wait in a delay queue."""
        servers: dict[str, list[Held]] = {}
        for line in self.lines.values():
            for held in list(line)[1:]:
                servers.setdefault(held.batch.server, []).append(held)
        for server, behind in servers.items():
            heads = sum(1 for (name, _) in self.lines if name == server)
            extra = heads + len(behind) - self.per_server_hold
            for held in sorted(behind, key=lambda h: h.since)[max(0, len(behind) - extra):]:
                self.lines[held.line].remove(held)
                self._park(out, held, self.settings.limiter_park_s, "turn")

    def _park_overdue(self, out: Round, now: float) -> None:
        """While Redis is away, a batch held too long goes to the delay queue, not stays unacked."""
        for key, line in list(self.lines.items()):
            for held in [h for h in line if now - h.since > self.settings.limiter_hold_s]:
                self._park(out, held, self.settings.limiter_park_s, "redis")
                line.remove(held)
            if not line:
                del self.lines[key]

    def _mark_published(self, parts: list[tuple[str, str]]) -> None:
        _per_server(parts, self.limiter.published)

    def _leave(self, lines: set[Line]) -> None:
        """Tenants whose every batch here was parked no longer wait for their server; if Redis
        does not answer, their lease ends the wait instead."""
        _per_server([(s, t) for s, t in lines if not self.lines.get((s, t))], self.limiter.leave)

    def _dead(self, out: Round, delivery: Delivery, reason: str, category: str, **headers: str) -> None:
        out.outgoing.append(self.dead_letter(delivery.body, reason, category, **headers))
        out.acks.append(delivery.tag)

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
        held = Tally(server for (server, _), line in self.lines.items() for _ in line)
        self._gauged |= set(held)
        for server in self._gauged:
            HELD.labels(server).set(held[server])

    def drain(self, broker: Broker, deadline: float) -> None:
        """Stopping: hand every held batch (what is left of it) back to ``batches``, for another replica."""
        out = Round()
        for line in self.lines.values():
            for held in line:
                self._hand_back(out, held, self.topology.batches)
        self.lines.clear()
        self._flush(broker, out)

    def busy(self) -> bool:
        return bool(self.lines)

    def ready(self) -> bool:
        return self.redis_ok

    def close(self) -> None:
        self.redis.close()


def _per_server(pairs: list[tuple[str, str]], call: Callable[[str, list[str]], None]) -> None:
    """``call(server, names)`` once per server; best effort: a Redis that does not answer
    leaves it to the leases and the next redelivery."""
    servers: dict[str, list[str]] = {}
    for server, name in pairs:
        servers.setdefault(server, []).append(name)
    for server, names in servers.items():
        try:
            call(server, names)
        except RedisUnavailable as exc:
            log.debug("%s", exc.reason)


# -- pure helpers -----------------------------------------------------------------------------

def unknown_names(batch: Batch, tenants: Mapping[str, int], config: Config) -> str | None:
    """Why this batch cannot be limited: a server or tenant the servers file does not name."""
    if batch.server not in config.servers:
        return f"unknown server {batch.server!r}: not in the servers file"
    missing = sorted(t for t in tenants.keys() | batch.refund_tenants.keys() if t not in config.tenants)
    if missing:
        return f"unknown tenant(s) {', '.join(repr(t) for t in missing)}: not in the servers file"
    return None


def by_tenant(batch: Batch) -> list[Batch]:
    """One batch per tenant, jobs in their order, with stable ids (the same on a redelivery);
    the first carries the batch's refund."""
    jobs: dict[str, list[bytes]] = {}
    sizes: Tally[str] = Tally()
    for raw in batch.jobs:
        job = decode_job(raw)
        jobs.setdefault(job.tenant, []).append(raw)
        sizes[job.tenant] += job.size
    parts = [Batch(id=derived_id(batch.id, f"tenant:{tenant}"), server=batch.server, jobs=tuple(raws),
                   mails=len(raws), bytes=sizes[tenant], created_ms=batch.created_ms, tenants={tenant: len(raws)},
                   priority=batch.priority) for tenant, raws in jobs.items()]
    parts[0] = dataclasses.replace(parts[0], refund=batch.refund, refund_of=batch.refund_of,
                                   refund_tenants=batch.refund_tenants)
    return parts


def rest_of(batch: Batch, tenant: str, offset: int, rest_bytes: int) -> Batch:
    """The jobs of one tenant's ``batch`` from ``offset`` on, as a batch of its own (a stable new id)."""
    jobs = batch.jobs[offset:]
    return Batch(id=derived_id(batch.id, f"rest:{offset}"), server=batch.server, jobs=jobs, mails=len(jobs),
                 bytes=rest_bytes, created_ms=batch.created_ms, tenants={tenant: len(jobs)},
                 priority=batch.priority)
