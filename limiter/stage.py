"""The limiter stage: batches -> send, at each server's rate, shared by every replica.

Read top to bottom, a batch goes: consume -> check its server and tenants are in the servers
file (else dead-letter) -> hold it, unacked, in its server's line -> when due, one Redis
decision (``gcra.lua``: apply its refund once, then ask for its mails) ->

- granted: stamp ``grant_id``, ``granted_ms`` (Redis time), ``deadline_ms`` and publish it to
  ``send``; a split publishes the granted part to ``send`` and the rest back to ``batches`` in
  the same confirmed publish; then ack.
- refused: due again after the retry-after Redis gave. A batch not due within
  ``limiter_hold_s`` (a server far behind, a tenant's cap reached for today) is parked: its
  bytes go to a delay queue that dead-letters back to ``batches``, then it is acked. Nothing
  waits unacked for long (RabbitMQ closes a channel that holds a delivery for 30 minutes).

Each server has its own line, and only the head of a line asks Redis, so a slow server never
holds up a fast one, and a big batch is not starved by smaller ones behind it in this replica.
Redis unreachable: nothing is released (fail closed), held batches stay held (or are parked
when held too long), and decisions resume with a capped backoff once Redis answers again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter as Tally
from collections import deque
from dataclasses import dataclass, field

import redis
from prometheus_client import Counter, Gauge, Histogram

from limiter.gcra import (
    US,
    Ask,
    Decision,
    Limits,
    RedisLimiter,
    TenantAsk,
    connect,
    derived_id,
    local_midnights,
)
from mailpipe import metrics
from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.codec import decode_batch, decode_job, encode_batch
from mailpipe.errors import ConfigError, InvalidMessage, LimiterUnavailable
from mailpipe.model import Batch
from mailpipe.servers import Config, ConfigWatcher
from mailpipe.settings import Settings
from mailpipe.stage import Stage

log = logging.getLogger(__name__)

RELEASED = Counter("mailpipe_limiter_released_mails_total", "Mails the limiter released to send.",
                   ["server"])
DECISIONS = Counter("mailpipe_limiter_decisions_total", "Rate limit decisions, by outcome.",
                    ["server", "outcome"])
GRANT_WAIT = Histogram("mailpipe_limiter_grant_wait_seconds",
                       "From the batch's creation to its grant (Redis time).", ["server"],
                       buckets=(0.1, 1, 5, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 86400))
FAILING_CLOSED = Gauge("mailpipe_limiter_failing_closed",
                       "1 while Redis is unreachable: nothing is released.")
HELD = Gauge("mailpipe_limiter_held_batches", "Batches held unacked, waiting for their turn.", ["server"])
PRIORITY = Counter("mailpipe_limiter_high_priority_total",
                   "High-priority batches: ahead of the line, or rationed (above the tenants' share).",
                   ["server", "outcome"])
PARKED = Counter("mailpipe_limiter_parked_total", "Batches sent through the delay queue to wait.",
                 ["server", "reason"])

# A round asks Redis for up to this many due batches of each line in one round trip.
ROUND_PER_LINE = 32
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0  # recover within seconds of Redis coming back


@dataclass(eq=False)  # a held batch is itself: line.remove() and ``in`` go by identity
class Held:
    delivery: Delivery
    batch: Batch
    tenants: dict[str, int]
    since: float  # monotonic
    due: float  # monotonic: when to ask Redis
    ahead: bool = False  # transactional mail within its tenants' share: ahead of the line


@dataclass
class Round:
    """What one round of decisions publishes, and the deliveries it acks once that is confirmed."""

    outgoing: list[Outgoing] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)
    released: list[tuple[Batch, int]] = field(default_factory=list)  # (granted batch, wait ms)

    def flush(self, broker: Broker, stage: str) -> None:
        broker.publish(self.outgoing)
        broker.ack_all(self.acks)
        for out in self.outgoing:
            metrics.MESSAGES_OUT.labels(stage, out.routing_key).inc()
        for batch, wait_ms in self.released:
            RELEASED.labels(batch.server).inc(batch.mails)
            GRANT_WAIT.labels(batch.server).observe(max(0, wait_ms) / 1000)


class LimiterStage(Stage):
    name = "limiter"

    def __init__(self, settings: Settings, redis_client: redis.Redis | None = None) -> None:
        super().__init__(settings)
        self.watcher = ConfigWatcher(settings.servers_path)
        # Short timeouts, no retries: a dead Redis must not stall the loop that serves RabbitMQ.
        self.redis = redis_client or connect(settings.redis_url)
        self.limiter = RedisLimiter(self.redis, settings.namespace)
        self.lines: dict[str, deque[Held]] = {}
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
                tenants = tenant_counts(batch)
            except InvalidMessage as exc:
                self._dead(out, delivery, exc.reason, "invalid")
                continue
            problem = unknown_names(batch, tenants, config)
            if problem:
                self._dead(out, delivery, problem, "config", server=batch.server)
                continue
            line = self.lines.setdefault(batch.server, deque())
            held = Held(delivery, batch, tenants, since=now, due=now)
            if batch.priority == "high" and self._ahead(batch, tenants, config):
                # Transactional mail goes ahead of every normal batch of its server: it is the
                # next to ask for tokens, however much bulk mail waits.
                held.ahead = True
                line.insert(sum(1 for h in line if h.ahead), held)
            else:
                line.append(held)
        self._decide_due(out, config, now)
        out.flush(broker, self.name)
        self._gauge()

    def tick(self, broker: Broker) -> None:
        now = time.monotonic()
        if not self.lines:
            if not self.redis_ok and now >= self.redis_retry_at:
                self._check_redis()  # keep ready() true to Redis even when idle
            return
        out = Round()
        self._decide_due(out, self.watcher.current(), now)
        out.flush(broker, self.name)
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
        for server, line in list(self.lines.items()):
            self._park_far_turns(out, line, config, now)
            if not line:
                del self.lines[server]

    def _round(self, out: Round, config: Config, now: float) -> bool:
        """One round trip to Redis: the due batches at the front of every line, each line in
        order. True when a line moved and its new head may be due: another round then."""
        asked: list[tuple[Held, Ask, list[str]]] = []
        for line in self.lines.values():
            for held in list(line)[:ROUND_PER_LINE]:
                if held.due > now:
                    break
                problem = unknown_names(held.batch, held.tenants, config)  # the file may have changed
                if problem is None:
                    try:
                        asked.append((held, *self._ask(held, config)))
                        continue
                    except ConfigError as exc:
                        problem = exc.reason
                line.remove(held)
                self._dead(out, held.delivery, problem, "config", server=held.batch.server)
        if not asked:
            return False
        try:
            decisions = self.limiter.acquire_many([ask for _, ask, _ in asked])
        except LimiterUnavailable as exc:
            self._redis_failed(exc, now)
            self._park_overdue(out, now)
            return False
        self._redis_worked()
        moved = False
        for (held, _, names), decision in zip(asked, decisions, strict=True):
            line = self.lines[held.batch.server]
            if decision.skipped or held not in line:
                continue
            if decision.granted:
                self._release(out, held, decision, names)
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
        """Within its tenants' share of the server for high priority? Above it, or while Redis
        does not answer, the batch waits in line as normal mail."""
        try:
            limits = Limits.of(config.servers[batch.server], self.settings)
            ahead = self.limiter.ration_high(batch.server, tenants, limits, self.settings.high_priority_share)
        except (ConfigError, LimiterUnavailable):
            ahead = False
        PRIORITY.labels(batch.server, "ahead" if ahead else "rationed").inc()
        return ahead

    def _ask(self, held: Held, config: Config) -> tuple[Ask, list[str]]:
        """The request for a held batch, and its tenants in the order of the grant."""
        batch = held.batch
        limits = Limits.of(config.servers[batch.server], self.settings)
        wall = time.time()  # only to offer the days around now; Redis time picks today
        names = sorted(held.tenants.keys() | batch.refund_tenants.keys())
        asks = [TenantAsk(n, held.tenants.get(n, 0), config.tenants[n].daily_limit,
                          local_midnights(config.tenants[n].timezone, wall), batch.refund_tenants.get(n, 0))
                for n in names]
        homes = [config.tenants[n].server for n in names]
        return Ask(batch.server, batch.id, batch.mails, limits, batch.refund, asks, homes,
                   batch.refund_of or ""), names

    def _release(self, out: Round, held: Held, decision: Decision, names: list[str]) -> None:
        batch = held.batch
        grant = dict(zip(names, decision.tenant_grants, strict=True)) if names else {}
        stamp = {"grant_id": derived_id(batch.id, f"grant:{decision.now_us}"),
                 "granted_ms": decision.now_ms,
                 "deadline_ms": decision.now_ms + int(self.settings.window_s * 1000), "refund": 0,
                 "refund_of": None, "refund_tenants": {}}
        if decision.granted >= batch.mails:
            granted = dataclasses.replace(batch, **stamp)  # type: ignore[arg-type]
            out.outgoing.append(Outgoing(self.topology.send, encode_batch(granted), message_id=granted.id))
            DECISIONS.labels(batch.server, "granted").inc()
            log.debug("batch %s: %d mails granted", batch.id, batch.mails)
        else:
            granted, rest = split(batch, grant)
            granted = dataclasses.replace(granted, **stamp)  # type: ignore[arg-type]
            out.outgoing.append(Outgoing(self.topology.send, encode_batch(granted), message_id=granted.id))
            out.outgoing.append(Outgoing(self.topology.batches, encode_batch(rest), message_id=rest.id))
            DECISIONS.labels(batch.server, "split").inc()
            log.info("batch %s split: %d of %d mails granted, the rest is %s", batch.id, granted.mails,
                     batch.mails, rest.id, extra={"server": batch.server})
        out.acks.append(held.delivery.tag)
        out.released.append((granted, decision.now_ms - batch.created_ms))

    # -- waiting, failing, giving back --------------------------------------------------------

    def _park(self, out: Round, held: Held, wait_s: float, reason: str) -> None:
        delays = self.topology.park_delays_s
        delay = max([d for d in delays if d <= wait_s], default=delays[0])
        out.outgoing.append(Outgoing(self.topology.park_queue(delay), held.delivery.body, message_id=held.batch.id))
        out.acks.append(held.delivery.tag)
        PARKED.labels(held.batch.server, reason).inc()

    def _park_far_turns(self, out: Round, line: deque[Held], config: Config, now: float) -> None:
        """Behind the head, each batch's turn comes at the earliest when the mails ahead of it
        have been paced out; one whose turn is beyond ``limiter_hold_s`` (or beyond this
        server's share of the window) waits in a delay queue instead of holding a slot."""
        server = config.servers.get(line[0].batch.server) if line else None
        if server is None or server.unlimited:
            return
        step_s = 3600 / server.rate_per_hour
        turn = max(line[0].due, now)
        kept = 1
        for held in list(line)[1:]:
            turn += held.batch.mails * step_s
            if turn - now > self.settings.limiter_hold_s or kept >= self.per_server_hold:
                line.remove(held)
                self._park(out, held, turn - now, "turn")
            else:
                kept += 1

    def _park_overdue(self, out: Round, now: float) -> None:
        """While Redis is away, a batch held too long goes to the delay queue, not stays unacked."""
        for server, line in list(self.lines.items()):
            for held in [h for h in line if now - h.since > self.settings.limiter_hold_s]:
                line.remove(held)
                self._park(out, held, self.settings.limiter_park_s, "redis")
            if not line:
                del self.lines[server]

    def _dead(self, out: Round, delivery: Delivery, reason: str, category: str, **headers: str) -> None:
        out.outgoing.append(self.dead_letter(delivery.body, reason, category, **headers))
        out.acks.append(delivery.tag)

    def _redis_failed(self, exc: LimiterUnavailable, now: float) -> None:
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
        except LimiterUnavailable as exc:
            self._redis_failed(exc, time.monotonic())
            return
        self._redis_worked()

    def _gauge(self) -> None:
        self._gauged |= set(self.lines)
        for server in self._gauged:
            HELD.labels(server).set(len(self.lines.get(server, ())))

    def drain(self, broker: Broker, deadline: float) -> None:
        """Stopping: hand every held batch back to ``batches`` as it came, for another replica."""
        out = Round()
        for line in self.lines.values():
            for held in line:
                out.outgoing.append(Outgoing(self.topology.batches, held.delivery.body,
                                             message_id=held.batch.id))
                out.acks.append(held.delivery.tag)
        self.lines.clear()
        out.flush(broker, self.name)

    def busy(self) -> bool:
        return bool(self.lines)

    def ready(self) -> bool:
        return self.redis_ok

    def close(self) -> None:
        self.redis.close()


# -- pure helpers -----------------------------------------------------------------------------

def tenant_counts(batch: Batch) -> dict[str, int]:
    """Mails per tenant, counted from the jobs themselves: this also proves every job decodes,
    so a split later cannot fail on one (the packer's map is not trusted for that)."""
    return dict(Tally(decode_job(job).tenant for job in batch.jobs))


def unknown_names(batch: Batch, tenants: dict[str, int], config: Config) -> str | None:
    """Why this batch cannot be limited: a server or tenant the servers file does not name."""
    if batch.server not in config.servers:
        return f"unknown server {batch.server!r}: not in the servers file"
    missing = sorted(t for t in tenants.keys() | batch.refund_tenants.keys() if t not in config.tenants)
    if missing:
        return f"unknown tenant(s) {', '.join(repr(t) for t in missing)}: not in the servers file"
    return None


def split(batch: Batch, grant: dict[str, int]) -> tuple[Batch, Batch]:
    """The first ``grant[tenant]`` jobs of each tenant, and the rest (with a stable new id)."""
    taken: Tally[str] = Tally()
    keep: list[bytes] = []
    rest: list[bytes] = []
    keep_bytes = rest_bytes = 0
    rest_tenants: Tally[str] = Tally()
    for raw in batch.jobs:
        job = decode_job(raw)
        if taken[job.tenant] < grant.get(job.tenant, 0):
            taken[job.tenant] += 1
            keep.append(raw)
            keep_bytes += job.size
        else:
            rest.append(raw)
            rest_bytes += job.size
            rest_tenants[job.tenant] += 1
    first = dataclasses.replace(batch, jobs=tuple(keep), mails=len(keep), bytes=keep_bytes,
                                tenants=dict(taken))
    second = Batch(id=derived_id(batch.id, "rest"), server=batch.server, jobs=tuple(rest), mails=len(rest),
                   bytes=rest_bytes, created_ms=batch.created_ms, tenants=dict(rest_tenants))
    return first, second
