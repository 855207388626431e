"""The limiter's function library in Redis (``decide.lua``, ``taking.lua``, after the lanes' shared
``lanes_common.lua``) behind typed calls. Every Redis failure becomes ``RedisUnavailable``."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

import redis

from limiter.decide import Decision, Fair, TenantAsk
from limiter.gcra import MIDNIGHTS, US, Limits
from mailpipe import pushback, redis_client
from mailpipe.errors import RedisUnavailable
from mailpipe.lanes import active_key, server_keys
from mailpipe.redis_functions import Arg, Library, source
from mailpipe.settings import Settings

LIBRARY = Library("mailpipe_limiter", [source("mailpipe", "lanes_common.lua"), source("limiter", "taking.lua"),
                                       source("limiter", "decide.lua")])


def server_prefix(namespace: str, server: str) -> str:
    """The hash tag of a server's keys: one decision's keys of that server share a slot."""
    return f"{{{namespace}:{server}}}"


def day_key(namespace: str, tenant: str) -> str:
    """A tenant's daily count: one for all its servers (reordering them changes nothing)."""
    return f"{{{namespace}}}:day:{tenant}"


def connect(url: str, timeout_s: float = 1.0) -> redis.Redis:
    """A fail-fast client of the Redis at ``url`` (tests and benchmarks; the stage uses
    ``mailpipe.redis_client.connect`` with its settings)."""
    return redis_client.connect(Settings(redis_url=url), timeout_s)


class Ask(NamedTuple):
    """One held batch's request for ``cost`` mails under part id ``part_id``. ``fair``: the
    tenant whose turn it takes; ``hold``: the hold of the batch (its lease is renewed, its mails
    counted down); ``line``: the caller's line, whose later asks in the same round are not
    decided once this one is refused or granted in part."""

    server: str
    part_id: str
    cost: int
    limits: Limits
    tenants: Sequence[TenantAsk] = ()
    fair: Fair | None = None
    hold: str = ""
    lane: str = ""
    line: str = ""


class RedisLimiter:
    def __init__(self, client: redis.Redis, namespace: str, *, mark_ttl_s: int = 86400,
                 hold_lease_s: float = 180.0, wait_replicas: int = 0) -> None:
        self.client = client
        self.namespace = namespace
        self.mark_ttl_s = mark_ttl_s
        self.hold_lease_us = int(hold_lease_s * US)
        # Replicas that must hold a round's decisions before its grants are used (WAIT).
        self.wait_replicas = wait_replicas

    # -- decisions --------------------------------------------------------------------------------

    def decide(self, ask: Ask) -> Decision:
        """One decision, a round of its own."""
        return self.decide_many([ask], uuid.uuid4().hex)[0]

    def decide_many(self, asks: Sequence[Ask], round_id: str) -> list[Decision]:
        """Every decision in one round trip, made by Redis in order, each atomic. Once an ask of
        a line is refused or granted in part, the later ones of that line in this round are not
        decided (``Decision.skipped``) and keep their place."""
        calls = [("decide", *self._decide_call(ask, round_id)) for ask in asks]
        replies = LIBRARY.run_pipeline(self.client, calls, self.wait_replicas)
        if self.wait_replicas:
            problem = redis_client.not_replicated(int(replies.pop()), self.wait_replicas, "a round of decisions")
            if problem:
                raise RedisUnavailable(problem)  # its grants are kept: asked again, they come back
        out = []
        for reply in replies:
            values = [int(v) for v in reply]
            out.append(Decision(granted=values[0], retry_after_us=values[1], now_us=values[2],
                                cached=bool(values[3] & 1), tenant_grants=tuple(values[4:]),
                                published=bool(values[3] & 2), turn=bool(values[3] & 4)))
        return out

    def _decide_call(self, ask: Ask, round_id: str) -> tuple[list[str], list[Arg]]:
        p = server_prefix(self.namespace, ask.server)
        fair = ask.fair or Fair("")
        keys = [*server_keys(self.namespace, ask.server), f"{p}:tat", f"{p}:minute", f"{p}:released",
                f"{p}:grant:{ask.part_id}", f"{p}:round:{round_id}:{ask.line}", f"{p}:released:{fair.tenant}",
                pushback.server_keys(self.namespace, ask.server)[0],
                *(day_key(self.namespace, t.name) for t in ask.tenants)]
        limits = ask.limits
        args: list[Arg] = [ask.server, ask.cost, limits.interval_us, limits.burst, limits.per_minute,
                           limits.minute_span_us, self.mark_ttl_s, fair.tenant, repr(float(fair.weight)),
                           int(fair.ahead), ask.hold, self.hold_lease_us, ask.lane, len(ask.tenants)]
        for t in ask.tenants:
            if len(t.midnights_s) != MIDNIGHTS:
                raise ValueError(f"tenant {t.name}: expected {MIDNIGHTS} midnights")
            args += [t.mails, t.daily_limit, *t.midnights_s]
        return keys, args

    def refund(self, server: str, refund_of: str, mails: int, limits: Limits,
               per_tenant: Sequence[tuple[str, int]]) -> bool:
        """A give-back's refund (``decide.lua``'s ``refund``): True if applied now."""
        p = server_prefix(self.namespace, server)
        keys = [f"{p}:tat", f"{p}:grant:{refund_of}", *(day_key(self.namespace, name) for name, _ in per_tenant)]
        reply = LIBRARY.call(self.client, "refund", keys,
                             [mails, limits.interval_us, *(share for _, share in per_tenant)])
        return bool(int(reply[1]))

    def ration_high(self, server: str, tenants: dict[str, int], limits: Limits, share: float) -> bool:
        """May these tenants' high-priority mails go ahead of the line? Each tenant has an
        allowance per server of ``share`` of its rate and burst; a batch that does not fit waits
        as normal mail, so no tenant can starve others by marking a campaign "high"."""
        if not limits.interval_us:
            return True  # an unlimited server has no rate to share
        keys = [f"{server_prefix(self.namespace, server)}:high:{name}" for name in sorted(tenants)]
        args: list[Arg] = [math.ceil(limits.interval_us / share), max(1, math.floor(limits.burst * share)),
                           *(tenants[name] for name in sorted(tenants))]
        return bool(LIBRARY.call(self.client, "ration", keys, args))

    def published(self, parts: dict[str, list[str]]) -> None:
        """Per server, these grants' parts are confirmed in the send queue: a redelivery of their
        batch need not publish them again. Best effort: unmarked, a part is published again."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for server, part_ids in parts.items():
                    p = server_prefix(self.namespace, server)
                    for part_id in part_ids:
                        pipe.hset(f"{p}:grant:{part_id}", "published", "1")
                        pipe.expire(f"{p}:grant:{part_id}", self.mark_ttl_s)  # never a key without a life
                pipe.execute()
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: marking grants published failed: {type(exc).__name__}: {exc}") from exc

    # -- taking batches from lanes ------------------------------------------------------------------

    def _each(self, name: str, calls: Sequence[tuple[str, Sequence[Arg]]], wait: bool = False) -> list[Any]:
        """One function per server, in one round trip; with ``wait``, used only once the replicas
        asked for hold it (``MAILPIPE_REDIS_WAIT_REPLICAS``)."""
        if not calls:
            return []
        wait_replicas = self.wait_replicas if wait else 0
        replies = LIBRARY.run_pipeline(self.client, [(name, server_keys(self.namespace, server), [server, *args])
                                                     for server, args in calls], wait_replicas)
        if wait_replicas:
            problem = redis_client.not_replicated(int(replies.pop()), wait_replicas, name)
            if problem:
                raise RedisUnavailable(problem)
        return replies

    def plan(self, servers: Sequence[tuple[str, bool]], k: int) -> list[tuple[int, list[tuple[str, int]]]]:
        """Per (server, fair): Redis time and the (lane, version) to take from, in order."""
        replies = self._each("plan", [(server, [int(fair), k]) for server, fair in servers])
        out = []
        for reply in replies:
            items = [v.decode() if isinstance(v, bytes) else v for v in reply[1:]]
            out.append((int(reply[0]), [(str(items[i]), int(items[i + 1])) for i in range(0, len(items), 2)]))
        return out

    def hold(self, holds: dict[str, list[str]]) -> dict[str, list[int]]:
        """Per server, its hold members registered before ``basic.get``: each lane's version, or
        -1 (being deleted: do not take)."""
        calls: list[tuple[str, list[Arg]]] = [(server, [self.hold_lease_us, *members])
                                               for server, members in holds.items()]
        replies = self._each("hold", calls, wait=True)
        return {server: [int(v) for v in reply[1:]] for (server, _), reply in zip(calls, replies, strict=True)}

    def got(self, results: dict[str, list[tuple[str, int, int]]]) -> None:
        """Per server: (member, version, mails got, 0 = the lane was empty)."""
        calls: list[tuple[str, list[Arg]]] = []
        for server, rs in results.items():
            args: list[Arg] = [self.hold_lease_us]
            for member, version, mails in rs:
                args += [member, version, mails]
            calls.append((server, args))
        self._each("got", calls)

    def release(self, members: dict[str, list[tuple[str, bool]]]) -> None:
        """Per server: (member, requeued): the batch acked, or back in its lane unacked."""
        calls: list[tuple[str, list[Arg]]] = []
        for server, ms in members.items():
            args: list[Arg] = []
            for member, requeued in ms:
                args += [member, int(requeued)]
            if args:
                calls.append((server, args))
        self._each("release", calls)

    def renew(self, members: dict[str, list[str]]) -> dict[str, list[int]]:
        calls: list[tuple[str, list[Arg]]] = [(server, [self.hold_lease_us, *ms])
                                               for server, ms in members.items() if ms]
        replies = self._each("renew", calls)
        return {server: [int(v) for v in reply[1:]] for (server, _), reply in zip(calls, replies, strict=True)}

    def hold_off(self, server: str, tenant: str, until_us: int) -> None:
        self._each("hold_off", [(server, [tenant, until_us])])

    def lane_off(self, server: str, lane: str, until_us: int) -> None:
        """Hold a lane off until ``until_us`` (Redis time; 0: no longer)."""
        self._each("lane_off", [(server, [lane, until_us])])

    def idle(self, servers: Sequence[str], idle_s: float, limit: int) -> dict[str, list[str]]:
        """Per server, its known lanes idle for ``idle_s``, oldest first: what may be closed."""
        replies = self._each("idle", [(server, [int(idle_s), limit]) for server in servers])
        return {server: [v.decode() if isinstance(v, bytes) else str(v) for v in reply[1:]]
                for server, reply in zip(servers, replies, strict=True)}

    def close_begin(self, server: str, idle_s: float, lease_s: float, lanes: Sequence[str]) -> list[str]:
        """The lanes now closing (the caller checks each is empty, deletes it, then close_end)."""
        reply = self._each("close_begin", [(server, [int(idle_s), int(lease_s * US), *lanes])])[0]
        return [lane for lane, ok in zip(lanes, reply[1:], strict=True) if int(ok)]

    def close_end(self, server: str, lane: str, deleted: bool) -> None:
        self._each("close_end", [(server, [lane, int(deleted)])])

    def active_servers(self) -> list[str]:
        try:
            members: Any = self.client.smembers(active_key(self.namespace))
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: reading the active servers failed: {exc}") from exc
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: ping failed: {type(exc).__name__}: {exc}") from exc
