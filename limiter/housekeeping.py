"""The lanes' upkeep, done by every limiter replica now and then: delete idle lanes, and find the
lanes again after Redis lost its memory.

**Idle lanes.** A quorum queue costs the broker memory and a little CPU even when empty (about
90 KB and 1.6 ms of CPU a second each, measured here: docs/design-notes.md, "Lanes"), so a lane
empty and untouched for ``MAILPIPE_LANE_IDLE_S`` is deleted. Quorum queues cannot be deleted
"if empty", so the limiter makes sure first, in Redis (``close_begin``): the lane is not present,
nothing of it is held, no publish into it is under way, and it is marked closing, so no publisher
may enter it and no limiter may take from it; then the queue is checked empty and deleted, and
its generation moves on (``close_end``), so publishers declare it again.

**Tenants paused for their reputation** (``mailpipe/reputation.py``: too many bounces or
complaints over their last sends on shared servers): their bulk (normal-priority) lane on every
platform server is held off, so their bulk mail waits there, takes no turn and is not taken;
their transactional mail flows. Lifted when ``mailpipe tenants resume`` lifts the pause.

**Redis forgot.** Redis here keeps nothing on disk; a restart (or a failover that lost writes)
forgets which lanes hold mail, and their tenants would wait unseen. A marker key says Redis
knows the lanes; when it is missing, every lane the servers file allows is looked for in the
broker (a passive declare each), and those found are present again; then the marker is set.
"""

from __future__ import annotations

import logging
import time

import redis

from limiter.redis_limiter import RedisLimiter
from mailpipe import reputation
from mailpipe.amqp import Broker
from mailpipe.errors import RedisUnavailable
from mailpipe.lanes import US, LanePublisher, lane_id, queue_name, server_keys
from mailpipe.servers import Config
from mailpipe.settings import Settings

log = logging.getLogger(__name__)

EVERY_S = 5.0
CLOSE_PER_SERVER = 5  # lanes closed per server per pass
CLOSE_LEASE_S = 30.0  # a limiter that dies while closing a lane holds it closed this long
FIND_PER_TICK = 100  # lanes looked for per tick while rediscovering
PAUSE_LEASE_US = 86400 * US


class Housekeeping:
    def __init__(self, limiter: RedisLimiter, lanes: LanePublisher, settings: Settings) -> None:
        self.limiter = limiter
        self.lanes = lanes
        self.settings = settings
        self.next_at = 0.0
        self._finding: list[tuple[str, str]] | None = None  # (server, lane) still to look for
        self._found = 0  # lanes found holding batches so far

    @property
    def marker(self) -> str:
        return f"{self.settings.namespace}:lanes:known"

    def run(self, broker: Broker, config: Config, now: float) -> None:
        if self._finding is not None:
            self._find(broker)
        if now < self.next_at:
            return
        self.next_at = now + EVERY_S
        if self._finding is None and not self._marked():
            log.info("Redis does not know the lanes (a first start, or Redis restarted or flushed): "
                     "looking for them in RabbitMQ")
            self._finding = [(server, lane_id(tenant.name, priority)) for tenant in config.tenants.values()
                             for server in config.allowed_servers(tenant) for priority in ("high", "normal")]
        self._hold_off_paused_bulk(config)
        self._close_idle(broker, config)

    def _hold_off_paused_bulk(self, config: Config) -> None:
        client, namespace = self.limiter.client, self.settings.namespace
        try:
            paused = reputation.paused_tenants(client, namespace)
            now_us = int(time.time() * US)
            for server in config.platform_servers:
                wanted = {lane_id(tenant, "normal") for tenant in paused}
                held = {field.decode()[4:] for field, until in client.hscan_iter(
                    server_keys(namespace, server)[0], match="off:*") if int(until) > now_us}
                for lane in wanted:  # asserted again each pass: lapses a day after every limiter stopped
                    self.limiter.lane_off(server, lane, now_us + PAUSE_LEASE_US)
                for lane in held - wanted:
                    self.limiter.lane_off(server, lane, 0)
                    log.info("%s: tenant %s resumed: its bulk mail flows again", server, lane[2:])
                for lane in wanted - held:
                    log.warning("%s: tenant %s is paused (%s): its bulk mail waits in its lane", server, lane[2:],
                                paused[lane[2:]].reason)
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: holding off paused tenants failed: {exc}") from exc

    def _marked(self) -> bool:
        try:
            return bool(self.limiter.client.exists(self.marker))
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: reading {self.marker} failed: {exc}") from exc

    def _find(self, broker: Broker) -> None:
        assert self._finding is not None
        chunk, self._finding = self._finding[:FIND_PER_TICK], self._finding[FIND_PER_TICK:]
        found = []
        for server, lane in chunk:
            count = broker.message_count(queue_name(self.settings.namespace, server, lane))
            if count is not None:
                found.append((server, lane, count))
        self.lanes.found(found)
        self._found += sum(1 for _, _, count in found if count)
        if not self._finding:
            self._finding = None
            try:
                self.limiter.client.set(self.marker, int(time.time()))
            except redis.RedisError as exc:
                raise RedisUnavailable(f"Redis: setting {self.marker} failed: {exc}") from exc
            log.info("lanes looked for in RabbitMQ: %d of those the servers file allows hold batches", self._found)
            self._found = 0

    def _close_idle(self, broker: Broker, config: Config) -> None:
        servers = sorted(set(config.servers) | set(self.limiter.active_servers()))
        idle = self.limiter.idle(servers, self.settings.lane_idle_s, CLOSE_PER_SERVER)
        for server, lanes in idle.items():
            if not lanes:
                continue
            for lane in self.limiter.close_begin(server, self.settings.lane_idle_s, CLOSE_LEASE_S, lanes):
                queue = queue_name(self.settings.namespace, server, lane)
                count = broker.message_count(queue)
                if count:
                    log.warning("lane %s was idle yet holds %d batch(es): kept", queue, count)
                    self.limiter.close_end(server, lane, deleted=False)
                    continue
                if count is not None:
                    broker.delete_queue(queue)
                self.limiter.close_end(server, lane, deleted=True)
                log.info("deleted idle lane %s", queue)
