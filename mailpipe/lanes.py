"""Lanes: where a server's batches wait, one queue per (server, tenant, priority).

A FIFO queue in front of the limiter hides every tenant behind the ones ahead of it: the fair
queue can only choose between the tenants whose batches it holds. So batches wait in lanes, one
durable quorum queue per (server, tenant, priority), and Redis knows which lanes hold mail: the
limiter sees every tenant's backlog wherever it is, however large, and takes the batch of the
tenant whose turn it is, straight from its lane (``basic.get``), holding only what it needs.

Lanes are declared on demand by whoever publishes into them and deleted by a limiter once idle.
The protocol, in Redis per server (the key layout is in ``lanes_common.lua``):

- **Publish** (the packer; a limiter handing a batch back): ``lane_enter`` registers the publish
  (a lease) and returns the lane's generation (declare the queue again when it changed); publish,
  mandatory (a queue deleted meanwhile returns it: declare and publish again); once confirmed,
  ``lane_exit`` marks the lane present with a new version and the tenant waiting; only then are
  the inputs acked, so a publisher that dies in between publishes again after its redelivery.
- **Take** (a limiter): register a hold (a lease) *before* ``basic.get``; a batch got stays held
  until acked; an empty lane is no longer present, unless its version moved since (a publish
  landed after the get). A hold whose lease ends (a dead limiter, whose batches RabbitMQ put back)
  makes its lane present again.
- **Delete** (a limiter, ``limiter/housekeeping.py``): a lane not present, with no publish under
  way and nothing held, idle for ``MAILPIPE_LANE_IDLE_S``, is marked closing (no enter, no hold),
  checked empty, deleted, and its generation moved on.
- **Waiting**: a tenant waits for its turn on a server while any lane of it is present or held
  and it is not held off (capped for today, paused); it joins the fair queue at
  ``max(v, its finish tag)``.

``LaneBook`` is the Python twin of that state and of the shared functions; the unit and
integration tests check the Lua against it.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from mailpipe.amqp import Broker, Outgoing
from mailpipe.errors import RedisUnavailable
from mailpipe.redis_functions import Arg, Library, source
from mailpipe.topology import Topology

US = 1_000_000
NORMAL, HIGH = "n", "h"
# A publish is registered this long at most: a publisher frozen longer than this between its
# enter and its publish could land in a queue being deleted (docs/design-notes.md, "Lanes").
PUBLISH_LEASE_S = 600.0
ENTER_RETRIES = 40  # a lane being deleted is closed for milliseconds: ask again this many times
ENTER_RETRY_S = 0.05
HIGH_FIRST = 10**16  # present since - this for high lanes: they sort first (lanes_common.lua)

_SAFE = re.compile(r"[A-Za-z0-9_-]{1,100}")

LIBRARY = Library("mailpipe_lanes", [source("mailpipe", "lanes_common.lua"), source("mailpipe", "lanes.lua")])


def lane_id(tenant: str, priority: str) -> str:
    """A lane's name in Redis: ``n:<tenant>`` or ``h:<tenant>`` (high priority)."""
    return f"{HIGH if priority == 'high' else NORMAL}:{tenant}"


def tenant_of(lane: str) -> str:
    return lane[2:]


def priority_of(lane: str) -> str:
    return "high" if lane.startswith(HIGH + ":") else "normal"


def queue_name(namespace: str, server: str, lane: str) -> str:
    """The lane's queue: ``<ns>.lane.<server>.<tenant>`` (``.high`` for high priority), or a
    digest of the names where they hold other characters than letters, digits, - and _."""
    tenant = tenant_of(lane)
    suffix = ".high" if priority_of(lane) == "high" else ""
    if _SAFE.fullmatch(server) and _SAFE.fullmatch(tenant):
        return f"{namespace}.lane.{server}.{tenant}{suffix}"
    digest = hashlib.sha256(f"{server}\0{tenant}".encode()).hexdigest()[:24]
    return f"{namespace}.lane.{digest}{suffix}"


def server_keys(namespace: str, server: str) -> list[str]:
    """KEYS[1..9] of every lane function (lanes_common.lua documents them)."""
    p = f"{{{namespace}:{server}}}"
    return [f"{p}:lanes", f"{p}:present", f"{p}:pubs", f"{p}:holds", f"{p}:known", f"{p}:fair",
            f"{p}:fair:tags", f"{p}:fair:off", active_key(namespace)]


def active_key(namespace: str) -> str:
    return f"{namespace}:active"


def known_queues(client: redis.Redis, namespace: str) -> set[str]:
    """The queues of every lane Redis knows may exist, on every server (for tearing a namespace
    down: the demo's, a test's)."""
    out: set[str] = set()
    prefix, suffix = f"{{{namespace}:", "}:known"
    for key in client.scan_iter(match=f"{prefix}*{suffix}", count=1000):
        name = key.decode() if isinstance(key, bytes) else str(key)
        server = name[len(prefix):-len(suffix)]
        lanes: Any = client.zrange(name, 0, -1)
        out |= {queue_name(namespace, server, lane.decode() if isinstance(lane, bytes) else lane) for lane in lanes}
    return out


def process_token() -> str:
    """This process's name in publishes and holds: host, pid and a random part (a restarted
    container has the same pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}".replace(" ", "_")


@dataclass(frozen=True)
class LaneBatch:
    """One batch to publish into its lane."""

    server: str
    lane: str
    mails: int
    body: bytes
    message_id: str


class LanePublisher:
    """Publishes batches into their lanes, confirmed, following the protocol above. Raises
    ``RedisUnavailable`` before publishing anything when Redis does not answer (the caller
    publishes to ``batches`` instead, or retries later), never after: once the batches are
    confirmed in their lanes the inputs may be acked, and a ``lane_exit`` Redis refused is made
    on the next publish (or ``mark_pending``); meanwhile the publish leases keep those lanes
    from being deleted, and a lane found not empty when it is closed is marked present."""

    def __init__(self, client: redis.Redis, namespace: str, topology: Topology, *,
                 token: str | None = None, wait_replicas: int = 0) -> None:
        self.client = client
        self.namespace = namespace
        self.topology = topology
        self.token = token or process_token()
        self.wait_replicas = wait_replicas
        self._declared: dict[str, int] = {}  # queue -> generation it was declared at
        self._unmarked: dict[tuple[str, str], int] = {}  # published, lane_exit still to make

    def publish(self, broker: Broker, batches: Sequence[LaneBatch]) -> None:
        self.mark_pending()
        if not batches:
            return
        lanes = sorted({(b.server, b.lane) for b in batches})
        generations = self._enter(lanes)
        for (server, lane), generation in generations.items():
            queue = queue_name(self.namespace, server, lane)
            if self._declared.get(queue) != generation:
                self.topology.declare_lane(broker.channel(), queue)
                self._declared[queue] = generation
        messages = [Outgoing(queue_name(self.namespace, b.server, b.lane), b.body, message_id=b.message_id)
                    for b in batches]
        returned = broker.publish(messages, allow_returns=True)
        while returned:  # a queue deleted since it was declared here: declare it, publish again
            for queue in {m.routing_key for m in returned}:
                self.topology.declare_lane(broker.channel(), queue)
            returned = broker.publish(returned, allow_returns=True)
        for b in batches:
            self._unmarked[(b.server, b.lane)] = self._unmarked.get((b.server, b.lane), 0) + b.mails
        self.mark_pending()

    def mark_pending(self) -> None:
        """Mark present the lanes published into whose ``lane_exit`` Redis refused (best effort)."""
        if not self._unmarked:
            return
        try:
            self._exit(self._unmarked)
        except RedisUnavailable:
            return
        self._unmarked = {}

    def _enter(self, lanes: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Register the publishes; a lane being deleted is asked for again until it is not."""
        out: dict[tuple[str, str], int] = {}
        todo = list(lanes)
        for _ in range(ENTER_RETRIES):
            by_server = _by_server(todo)
            calls: list[tuple[str, list[str], list[Arg]]] = [
                ("lane_enter", server_keys(self.namespace, server), [server, self.token, int(PUBLISH_LEASE_S * US),
                                                                     *names])
                for server, names in by_server.items()]
            replies = LIBRARY.run_pipeline(self.client, calls)
            todo = []
            for (server, names), reply in zip(by_server.items(), replies, strict=True):
                for name, generation in zip(names, reply[1:], strict=True):
                    if int(generation) < 0:
                        todo.append((server, name))
                    else:
                        out[(server, name)] = int(generation)
            if not todo:
                return out
            time.sleep(ENTER_RETRY_S)
        raise RedisUnavailable(f"lanes {todo} stayed closing for {ENTER_RETRIES * ENTER_RETRY_S:.0f} s")

    def found(self, lanes: Sequence[tuple[str, str, int]]) -> None:
        """Lanes found in the broker (server, lane, batches in it) after Redis forgot them: known
        and present again (each batch counted as at least one mail)."""
        if lanes:
            self._exit({(server, lane): count for server, lane, count in lanes})

    def _exit(self, mails: dict[tuple[str, str], int]) -> None:
        by_server: dict[str, list[Arg]] = {}
        for (server, lane), n in mails.items():
            by_server.setdefault(server, []).extend([lane, n])
        calls = [("lane_exit", server_keys(self.namespace, server), [server, self.token, *pairs])
                 for server, pairs in by_server.items()]
        replies = LIBRARY.run_pipeline(self.client, calls, self.wait_replicas)
        if self.wait_replicas:
            from mailpipe.redis_client import not_replicated

            problem = not_replicated(int(replies[-1]), self.wait_replicas, "a lane's publish")
            if problem:
                raise RedisUnavailable(problem)


def _by_server(lanes: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for server, lane in lanes:
        out.setdefault(server, []).append(lane)
    return out


# -- the Python twin --------------------------------------------------------------------------

@dataclass
class LaneBook:
    """One server's lanes and fair queue as Redis holds them (``lanes_common.lua``), with the
    functions every library shares. Counters absent in Redis are 0 here."""

    version: dict[str, int] = field(default_factory=dict)  # v:L
    mails: dict[str, int] = field(default_factory=dict)  # m:L
    generation: dict[str, int] = field(default_factory=dict)  # g:L
    closing: dict[str, int] = field(default_factory=dict)  # c:L
    held: dict[str, int] = field(default_factory=dict)  # hc:L
    held_mails: dict[str, int] = field(default_factory=dict)  # hmt:L
    hold_mails: dict[str, int] = field(default_factory=dict)  # hm:<member>
    lanes_off: dict[str, int] = field(default_factory=dict)  # off:L
    present: dict[str, int] = field(default_factory=dict)
    pubs: dict[str, int] = field(default_factory=dict)
    holds: dict[str, int] = field(default_factory=dict)
    known: dict[str, int] = field(default_factory=dict)
    v: float = 0.0
    finish: dict[str, float] = field(default_factory=dict)
    tags: dict[str, float] = field(default_factory=dict)
    off: dict[str, int] = field(default_factory=dict)
    active: bool = False

    @staticmethod
    def _add(counter: dict[str, int], key: str, n: int) -> None:
        value = counter.get(key, 0) + n
        if value > 0:
            counter[key] = value
        else:
            counter.pop(key, None)

    def lane_off(self, lane: str, now_us: int) -> bool:
        return self.lanes_off.get(lane, 0) > now_us

    def has_mail(self, tenant: str, now_us: int) -> bool:
        return any(not self.lane_off(lane, now_us) and (lane in self.present or self.held.get(lane, 0) > 0)
                   for lane in (lane_id(tenant, "normal"), lane_id(tenant, "high")))

    def update_waiting(self, tenant: str, now_us: int) -> None:
        off = self.off.get(tenant)
        waiting = self.has_mail(tenant, now_us) and not (off is not None and off > now_us)
        if waiting and tenant not in self.tags:
            self.tags[tenant] = max(self.v, self.finish.get(tenant, 0.0))
        elif tenant in self.tags and not waiting:
            del self.tags[tenant]

    def mark_present(self, lane: str, now_us: int) -> None:
        self.present.setdefault(lane, now_us - HIGH_FIRST if priority_of(lane) == "high" else now_us)
        self.version[lane] = self.version.get(lane, 0) + 1

    def drop_hold(self, member: str) -> tuple[int, int]:
        if member not in self.holds:
            return 0, 0
        del self.holds[member]
        lane = member.split(" ", 1)[1]
        left = self.hold_mails.pop(member, 0)
        self._add(self.held, lane, -1)
        self._add(self.held_mails, lane, -left)
        return 1, left

    def purge_holds(self, now_us: int, limit: int) -> int:
        ended = sorted((until, member) for member, until in self.holds.items() if until <= now_us)[:limit]
        for _, member in ended:
            lane = member.split(" ", 1)[1]
            _, left = self.drop_hold(member)
            self._add(self.mails, lane, left)
            self.mark_present(lane, now_us)
            self.update_waiting(tenant_of(lane), now_us)
        return len(ended)

    def update_active(self) -> None:
        self.active = bool(self.present or self.holds)

    # lanes.lua
    def enter(self, now_us: int, token: str, lease_us: int, lanes: Sequence[str]) -> list[int]:
        out = [now_us]
        for lane in lanes:
            if self.closing.get(lane, 0) > now_us:
                out.append(-1)
                continue
            self.pubs[f"{token} {lane}"] = now_us + lease_us
            self.known[lane] = now_us // US
            out.append(self.generation.get(lane, 0))
        return out

    def exit(self, now_us: int, token: str, published: Sequence[tuple[str, int]]) -> None:
        for lane, mails in published:
            self.pubs.pop(f"{token} {lane}", None)
            self.known[lane] = now_us // US
            self._add(self.mails, lane, mails)
            self.mark_present(lane, now_us)
            self.update_waiting(tenant_of(lane), now_us)
        self.update_active()
