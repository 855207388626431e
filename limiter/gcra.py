"""The release decision: GCRA with a cost of N, a per-minute ceiling and daily caps per tenant.

GCRA (the generic cell rate algorithm) keeps one number per limit, the theoretical arrival
time ``tat``: when the bucket would be empty again if nothing more were taken. With ``T`` the
time one mail costs (``3600 s / rate_per_hour``) and ``B`` the burst, asking for ``n`` mails
at ``now`` is allowed when

    max(tat, now) + n*T - B*T <= now

and then ``tat`` becomes ``max(tat, now) + n*T``. The bound this gives, for any replicas:
in every interval of length ``w``, at most ``w/T + B`` mails are granted.

The promise is kept at the SMTP server, not at the grant. A granted batch may start its mails
up to one delivery window ``W`` after its grant (the sender starts none later, judged in
Redis time), so the mails a server receives in ``[a, b]`` were granted in ``[a - W, b]``: at
most ``(b - a + W)/T + B_grant``. The limiter therefore grants with ``B_grant = B - ceil(W/T)``
and the server sees at most ``w/T + B`` in every window ``w``, however late a sender starts.

A refund hands back only what its grant still owes: the mails whose time (``tat`` after the
grant, counting back) has not come yet, and only while no later grant has moved ``tat``;
tokens the bucket has already refilled are never handed back twice. Once per grant, and only
while the grant is remembered; a daily count is lowered only for a grant made today.

Fair share. A server's capacity is shared between the tenants with mail waiting for it, by
weight, with start-time fair queuing kept per server in Redis: each waiting tenant has a start
tag ``S = max(V, F)`` (``V`` the server's virtual time, ``F`` the tenant's last finish tag);
only a tenant with the lowest start tag may take tokens (ties allowed); a grant of ``n`` mails
sets ``F = S + n / weight`` and moves ``V`` to ``S`` (to ``F`` when the tenant was alone: using
an idle server is never held against it). While others wait, a turn is one mail, so a tenant
that arrives behind a backlog is released within (tenants waiting) x T; alone, a tenant takes
what the bucket holds (its burst, then one mail per T). A waiting tenant keeps its place while
its replica asks again within its lease (the retry it was told + ``fair_lease_s``); a replica
that dies frees the turn when the lease ends. Mails given back are charged again when they are
granted again: the bucket gets its tokens back, the tenant its turn not.

``decide`` below is the reference: ``limiter/gcra.lua`` does the same in Redis, atomically,
with Redis ``TIME``. ``RedisLimiter`` is the typed wrapper around the script.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import itertools
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import NamedTuple, cast
from zoneinfo import ZoneInfo

import redis

from mailpipe import redis_client
from mailpipe.errors import ConfigError, RedisUnavailable
from mailpipe.servers import ServerConfig
from mailpipe.settings import Settings

US = 1_000_000
HOUR_US = 3600 * US
MINUTE_US = 60 * US
MIDNIGHTS = 6  # local midnights passed per tenant: two days back to three ahead
# A tenant not first in the fair order asks again after at least this long.
MIN_TURN_RETRY_US = 50_000
# Expired waiters removed per decision: bounded work, whatever was left behind.
PURGE_PER_DECISION = 32


# -- the limits of one server, in the units the script uses -----------------------------------

class Limits(NamedTuple):
    """A server's limits: ``interval_us`` = 0 means unlimited (no rate, no minute ceiling).
    ``burst`` is what one grant may take: the server's burst less one window at the rate."""

    interval_us: int
    burst: int
    minute_interval_us: int = 0
    minute_burst: int = 0

    @classmethod
    def for_server(cls, rate_per_hour: int, burst: int, per_minute: int | None = None,
                   unlimited: bool = False, reserve: int = 0) -> Limits:
        """``burst`` is the server's (what it may receive at once above its rate); ``reserve``
        of it is kept out of every grant for the mails a window lets start late."""
        if unlimited:
            return cls(0, burst)
        # Rounded up: a rate we cannot express exactly in microseconds errs on the slow side.
        interval = math.ceil(HOUR_US / rate_per_hour)
        grant_burst = burst - reserve
        if grant_burst < 1:
            raise ConfigError(
                f"a burst of {burst} mails leaves nothing to grant at {rate_per_hour} mails/hour: "
                f"{reserve} are kept back for the delivery window "
                "(raise MAILPIPE_BURST_MAILS or lower MAILPIPE_WINDOW_S)")
        if per_minute is None:
            return cls(interval, grant_burst)
        return cls(interval, grant_burst, math.ceil(MINUTE_US / per_minute), min(grant_burst, per_minute))

    @classmethod
    def of(cls, server: ServerConfig, settings: Settings) -> Limits:
        """A configured server's limits under these settings."""
        return cls.for_server(server.rate_per_hour, settings.burst(server.rate_per_hour), server.per_minute,
                              server.unlimited, settings.window_reserve(server.rate_per_hour))


class TenantAsk(NamedTuple):
    """One tenant's share of a batch and its daily cap, with the local midnights around now;
    ``refund``: its mails a give-back returns."""

    name: str
    mails: int
    daily_limit: int
    midnights_s: tuple[int, ...]
    refund: int = 0


class Fair(NamedTuple):
    """The tenant whose turn a batch takes on its server. ``backlog``: mails the caller holds
    for that tenant on that server, this batch's included; ``ahead``: high-priority mail within
    its ration, which does not wait for its turn (its mails are still counted against it)."""

    tenant: str
    weight: float = 1.0
    backlog: int = 0
    ahead: bool = False


class Decision(NamedTuple):
    granted: int
    retry_after_us: int
    now_us: int
    cached: bool
    tenant_grants: tuple[int, ...]
    published: bool = False  # cached, and its part is already in the send queue

    @property
    def now_ms(self) -> int:
        return self.now_us // 1000

    @property
    def skipped(self) -> bool:
        """Not decided: a batch ahead of it in the same round and line was refused."""
        return self.retry_after_us < 0


# -- pure maths -------------------------------------------------------------------------------

def rescale(tat_us: int | None, step_us: int | None, now_us: int, interval_us: int) -> int | None:
    """The TAT counted in ``step_us`` per mail, in ``interval_us`` per mail: after a rate change
    the mails still owed are owed at the new rate, so it applies at once. (Float maths, as Lua.)"""
    if tat_us is None or step_us is None or step_us == interval_us or tat_us <= now_us:
        return tat_us
    return now_us + math.ceil(float(tat_us - now_us) * interval_us / step_us)


def _load_tat(state: State, now_us: int, interval_us: int) -> int | None:
    """The rate TAT in ``interval_us``; a rescaled one is stored, as ``load_tat`` in Lua does."""
    if state.tat_us is not None and state.step_us != interval_us and state.tat_us > now_us:
        state.tat_us, state.step_us = rescale(state.tat_us, state.step_us, now_us, interval_us), interval_us
    return state.tat_us


def _load_minute_tat(state: State, now_us: int, interval_us: int) -> int | None:
    if (state.minute_tat_us is not None and state.minute_step_us != interval_us
            and state.minute_tat_us > now_us):
        state.minute_tat_us = rescale(state.minute_tat_us, state.minute_step_us, now_us, interval_us)
        state.minute_step_us = interval_us
    return state.minute_tat_us


def gcra_wait(tat_us: int | None, now_us: int, cost: int, interval_us: int, burst: int) -> tuple[int, int]:
    """(wait_us, tat): how long until ``cost`` mails fit (<= 0: now), and the tat to add to."""
    tat = max(tat_us or 0, now_us)
    return tat + cost * interval_us - burst * interval_us - now_us, tat


def tokens_available(tat_us: int | None, now_us: int, interval_us: int, burst: int) -> int:
    """Mails one decision could take right now (0 to ``burst``)."""
    tat = max(tat_us or 0, now_us)
    return max(0, (burst * interval_us - (tat - now_us)) // interval_us)


def gcra_refund(tat_us: int | None, step_us: int | None, now_us: int, refund: int, interval_us: int,
                grant_tat_us: int | None) -> int | None:
    """The TAT after giving back ``refund`` mails of the grant that left it at ``grant_tat_us``:
    at most the mails whose time has not come, and only while that grant is the last one."""
    if tat_us is None or grant_tat_us is None or tat_us != grant_tat_us or step_us != interval_us:
        return tat_us
    back = min(refund, (grant_tat_us - now_us) // interval_us)
    return grant_tat_us - back * interval_us if back > 0 else tat_us


def local_midnights(timezone: str, around_s: float, count: int = MIDNIGHTS) -> tuple[int, ...]:
    """Epoch seconds of local midnights in ``timezone``: from two days before the local date
    of ``around_s`` on. The script picks today among them with Redis time, so a worker clock
    that is off by less than a day changes nothing."""
    tz = ZoneInfo(timezone)
    today = datetime.fromtimestamp(around_s, tz).date()
    return tuple(_midnight(today + timedelta(days=d), tz) for d in range(-2, count - 2))


def _midnight(day: date, tz: ZoneInfo) -> int:
    # A day may start at 01:00 where DST begins at midnight; fold=0 and a round trip through
    # UTC give the first instant of the day that exists.
    naive = datetime(day.year, day.month, day.day)
    return int(naive.replace(tzinfo=tz).timestamp())


def day_of(midnights_s: Sequence[int], at_s: int) -> tuple[int, int]:
    """(start, end) in epoch seconds of the local day holding ``at_s``."""
    for start, end in itertools.pairwise(midnights_s):
        if start <= at_s < end:
            return start, end
    raise RedisUnavailable("the day boundaries given do not cover Redis time")


@dataclass
class Grant:
    """What a grant leaves in Redis: its mails, its time, each TAT just after it, per tenant."""

    mails: int
    at_us: int
    tat_us: int | None
    minute_tat_us: int | None
    per_tenant: tuple[int, ...]
    refunded: bool = False


@dataclass
class FairState:
    """A server's fair queue: ``v`` its virtual time; per tenant its finish tag, its start tag
    and lease while it waits (the ``tags`` and ``alive`` sorted sets), the mails held for it,
    and its releases (10 s bucket -> mails)."""

    v: float = 0.0
    finish: dict[str, float] = field(default_factory=dict)
    tags: dict[str, float] = field(default_factory=dict)
    alive: dict[str, int] = field(default_factory=dict)
    backlog: dict[str, int] = field(default_factory=dict)
    released: dict[str, dict[int, int]] = field(default_factory=dict)

    def purge(self, now_us: int) -> None:
        """Drop waiters whose lease ended, oldest lease first, at most PURGE_PER_DECISION."""
        ended = sorted((until, name) for name, until in self.alive.items() if until <= now_us)
        for _, name in ended[:PURGE_PER_DECISION]:
            self.leave(name)

    def leave(self, name: str) -> None:
        self.tags.pop(name, None)
        self.alive.pop(name, None)
        self.backlog.pop(name, None)

    def wait(self, name: str, tag: float, until_us: int, backlog: int) -> None:
        self.tags[name], self.alive[name], self.backlog[name] = tag, until_us, backlog


@dataclass
class State:
    """What Redis holds for one server and its tenants: the reference model of the keys."""

    tat_us: int | None = None
    step_us: int | None = None  # the interval tat_us was counted in
    minute_tat_us: int | None = None
    minute_step_us: int | None = None
    days: dict[str, tuple[int, int]] = field(default_factory=dict)  # tenant -> (day start, count)
    grants: dict[str, Grant] = field(default_factory=dict)
    released: dict[int, int] = field(default_factory=dict)  # 10 s bucket -> mails
    fair: FairState = field(default_factory=FairState)


def decide(state: State, now_us: int, batch_id: str, cost: int, limits: Limits,
           tenants: Sequence[TenantAsk], refund: int = 0, refund_of: str = "",
           fair: Fair | None = None, lease_us: int = 2 * US) -> Decision:
    """One decision, exactly as ``gcra.lua`` makes it; mutates ``state`` as the script does Redis.
    ``refund`` mails of the grant made to batch ``refund_of`` come back first; ``fair``: the
    tenant whose turn it takes (see the module's docstring)."""
    now_s = now_us // US
    days = [day_of(t.midnights_s, now_s) for t in tenants]
    used = [state.days[t.name][1] if t.name in state.days and state.days[t.name][0] == day[0] else 0
            for t, day in zip(tenants, days, strict=True)]

    # 1. The refund, once per grant, and only while the grant is remembered.
    given = state.grants.get(refund_of)
    if refund > 0 and given is not None and not given.refunded:
        given.refunded = True
        if limits.interval_us:
            state.tat_us = gcra_refund(state.tat_us, state.step_us, now_us, refund, limits.interval_us,
                                       given.tat_us)
        if limits.minute_interval_us:
            state.minute_tat_us = gcra_refund(state.minute_tat_us, state.minute_step_us, now_us, refund,
                                              limits.minute_interval_us, given.minute_tat_us)
        for i, t in enumerate(tenants):
            # Only a grant made today lowers today's count: a cap is never exceeded at midnight.
            if t.refund > 0 and used[i] > 0 and _day_start(t.midnights_s, given.at_us // US) == days[i][0]:
                used[i] = max(0, used[i] - t.refund)
                state.days[t.name] = (days[i][0], used[i])

    # 2. A redelivered batch gets the grant it had.
    if batch_id in state.grants:
        cached = state.grants[batch_id]
        return Decision(cached.mails, 0, cached.at_us, True, cached.per_tenant)
    if cost == 0:
        return Decision(0, 0, now_us, False, ())

    # 3. The daily caps.
    allowed = [max(0, min(t.mails, t.daily_limit - u)) for t, u in zip(tenants, used, strict=True)]
    waits = [days[i][1] * US - now_us for i, t in enumerate(tenants) if t.mails > 0 and allowed[i] == 0]
    total = sum(allowed) if tenants else cost
    queue = state.fair if fair is not None and limits.interval_us else None
    if total == 0:
        if queue is not None and fair is not None:
            queue.leave(fair.tenant)  # capped for today: not waiting for this server
        return Decision(0, min(waits, default=0), now_us, False, ())

    # 4. The request: the smallest of the batch, the caps' room and each burst.
    ask = total
    if limits.interval_us:
        ask = min(ask, limits.burst)
    if limits.minute_interval_us:
        ask = min(ask, limits.minute_burst)

    # 5. Fair share: the tenant's start tag, its turn, the size of its turn.
    start = 0.0
    contended = False
    if queue is not None and fair is not None:
        queue.purge(now_us)
        name = fair.tenant
        start = queue.tags.get(name, max(queue.v, queue.finish.get(name, 0.0)))
        contended = len(queue.tags) - (1 if name in queue.tags else 0) > 0
        tat_now = _load_tat(state, now_us, limits.interval_us)
        if contended and not fair.ahead and min(queue.tags.values()) < start:
            ahead_of_it = sum(1 for tag in queue.tags.values() if tag < start)
            turn_wait, _ = gcra_wait(tat_now, now_us, ahead_of_it + 1, limits.interval_us, limits.burst)
            turn_wait = max(turn_wait, MIN_TURN_RETRY_US)
            queue.wait(name, start, now_us + turn_wait + lease_us, fair.backlog)
            return Decision(0, turn_wait, now_us, False, ())
        if contended:
            ask = 1  # one mail a turn while others wait
        else:
            room = tokens_available(tat_now, now_us, limits.interval_us, limits.burst)
            if limits.minute_interval_us:
                room = min(room, tokens_available(_load_minute_tat(state, now_us, limits.minute_interval_us),
                                                  now_us, limits.minute_interval_us, limits.minute_burst))
            ask = min(ask, max(1, room))  # alone: what the bucket holds now, at least one mail

    # 6. Every GCRA must allow it.
    wait, tat, m_wait, m_tat = 0, 0, 0, 0
    if limits.interval_us:
        wait, tat = gcra_wait(_load_tat(state, now_us, limits.interval_us), now_us, ask,
                              limits.interval_us, limits.burst)
    if limits.minute_interval_us:
        m_wait, m_tat = gcra_wait(_load_minute_tat(state, now_us, limits.minute_interval_us), now_us, ask,
                                  limits.minute_interval_us, limits.minute_burst)
    wait = max(wait, m_wait)
    if wait > 0:
        if queue is not None and fair is not None:
            queue.wait(fair.tenant, start, now_us + wait + lease_us, fair.backlog)
        return Decision(0, wait, now_us, False, ())

    # 7. Granted.
    grant_tat = grant_minute_tat = None
    if limits.interval_us:
        state.tat_us, state.step_us = tat + ask * limits.interval_us, limits.interval_us
        grant_tat = state.tat_us
    if limits.minute_interval_us:
        state.minute_tat_us = m_tat + ask * limits.minute_interval_us
        state.minute_step_us = limits.minute_interval_us
        grant_minute_tat = state.minute_tat_us
    grants: list[int] = []
    left = ask
    for i, t in enumerate(tenants):
        g = min(allowed[i], left)
        left -= g
        if g:
            state.days[t.name] = (days[i][0], used[i] + g)
        grants.append(g)
    bucket = now_s // 10
    state.released[bucket] = state.released.get(bucket, 0) + ask
    if queue is not None and fair is not None:
        finish = start + ask / fair.weight
        queue.finish[fair.tenant] = finish
        queue.v = max(queue.v, start if contended else finish)
        if fair.backlog > ask:
            queue.wait(fair.tenant, finish, now_us + limits.interval_us + lease_us, fair.backlog - ask)
        else:
            queue.leave(fair.tenant)
        ring = queue.released.setdefault(fair.tenant, {})
        ring[bucket] = ring.get(bucket, 0) + ask
    state.grants[batch_id] = Grant(ask, now_us, grant_tat, grant_minute_tat, tuple(grants))
    return Decision(ask, 0, now_us, False, tuple(grants))


def _day_start(midnights_s: Sequence[int], at_s: int) -> int | None:
    """The local midnight starting the day of ``at_s``, or None outside the days given."""
    for start, end in itertools.pairwise(midnights_s):
        if start <= at_s < end:
            return start
    return None


def worst_window(releases: Sequence[tuple[int, int]], window_ms: int) -> int:
    """The most mails released in any closed interval of ``window_ms``; ``releases`` holds
    (time_ms, mails). The GCRA bound says: at most ``window/T + B``."""
    events = sorted(releases)
    worst, total, start = 0, 0, 0
    for end_time, mails in events:
        total += mails
        while events[start][0] < end_time - window_ms:
            total -= events[start][1]
            start += 1
        worst = max(worst, total)
    return worst


# -- Redis ------------------------------------------------------------------------------------

def server_prefix(namespace: str, server: str) -> str:
    """The hash tag of a server's keys: one decision's keys share a Redis Cluster slot."""
    return f"{{{namespace}:{server}}}"


def tenant_day_key(namespace: str, tenant_server: str, tenant: str) -> str:
    return f"{server_prefix(namespace, tenant_server)}:day:{tenant}"


def connect(url: str, timeout_s: float = 1.0) -> redis.Redis:
    """A fail-fast client of the Redis at ``url`` (tests and benchmarks; the stage uses
    ``mailpipe.redis_client.connect`` with its settings)."""
    return redis_client.connect(Settings(redis_url=url), timeout_s)


class Ask(NamedTuple):
    """One batch's request: give back ``refund`` mails of the grant made to ``refund_of`` (once),
    then ask for ``cost``. ``tenant_servers[i]`` is the server tenant i is configured on (its
    day key lives under that server's hash tag); by default the batch's server. ``fair``: the
    tenant whose turn it takes on the server; ``line``: the caller's line, whose later asks in
    the same round are not decided once this one is refused or granted in part."""

    server: str
    batch_id: str
    cost: int
    limits: Limits
    refund: int = 0
    tenants: Sequence[TenantAsk] = ()
    tenant_servers: Sequence[str] | None = None
    refund_of: str = ""
    fair: Fair | None = None
    line: str = ""


class RedisLimiter:
    """The script, loaded once, behind a typed call. Redis errors become RedisUnavailable."""

    def __init__(self, client: redis.Redis, namespace: str, *, mark_ttl_s: int = 86400,
                 fair_lease_s: float = 2.0, wait_replicas: int = 0) -> None:
        self.client = client
        self.namespace = namespace
        self.mark_ttl_s = mark_ttl_s
        self.lease_us = int(fair_lease_s * US)
        # Replicas that must hold a round's decisions before its grants are used (WAIT).
        self.wait_replicas = wait_replicas
        self._lua = importlib.resources.files("limiter").joinpath("gcra.lua").read_bytes()
        self._sha = hashlib.sha1(self._lua, usedforsecurity=False).hexdigest()  # the name Redis knows it by
        self._priority = client.register_script(
            importlib.resources.files("limiter").joinpath("priority.lua").read_bytes())

    def acquire(self, server: str, batch_id: str, cost: int, limits: Limits, *,
                refund: int = 0, tenants: Sequence[TenantAsk] = (),
                tenant_servers: Sequence[str] | None = None, refund_of: str = "",
                fair: Fair | None = None) -> Decision:
        """One decision, one round trip."""
        return self.acquire_many([Ask(server, batch_id, cost, limits, refund, tenants, tenant_servers,
                                      refund_of, fair)])[0]

    def acquire_many(self, asks: Sequence[Ask]) -> list[Decision]:
        """Every decision in one round trip, made by Redis in order, each atomic. The asks of
        one server are its line: once one is refused, the ones after it are not decided
        (``Decision.skipped``) and keep their place."""
        queue = f"queue:{uuid.uuid4().hex}"
        commands = [self._command(ask, queue) for ask in asks]
        try:
            try:
                replies = self._run(commands)
            except redis.exceptions.NoScriptError:  # Redis restarted or flushed its scripts
                self.client.script_load(self._lua)
                replies = self._run(commands)
        except redis.RedisError as exc:
            raise RedisUnavailable(
                f"Redis: rate limit decision failed: {type(exc).__name__}: {exc}") from exc
        decisions = []
        for reply in replies:
            values = [int(v) for v in reply]
            decisions.append(Decision(granted=values[0], retry_after_us=values[1], now_us=values[2],
                                      cached=bool(values[3]), tenant_grants=tuple(values[4:]),
                                      published=values[3] == 2))
        return decisions

    def _run(self, commands: list[list[str]]) -> list[list[int]]:
        # EVALSHA, not redis-py's Script: in a pipeline that asks SCRIPT EXISTS first, a
        # second round trip per round.
        if len(commands) == 1 and not self.wait_replicas:
            return [cast("list[int]", self.client.evalsha(self._sha, *commands[0]))]  # type: ignore[arg-type]
        with self.client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.evalsha(self._sha, *command)  # type: ignore[arg-type]
            if self.wait_replicas:  # on the same connection: it waits for these writes
                pipe.execute_command(  # type: ignore[no-untyped-call]
                    "WAIT", self.wait_replicas, redis_client.WAIT_TIMEOUT_MS)
            replies = pipe.execute()
        if self.wait_replicas:
            problem = redis_client.not_replicated(int(replies.pop()), self.wait_replicas, "a round of decisions")
            if problem:
                raise RedisUnavailable(problem)  # its grants are kept: asked again, they come back
        return cast("list[list[int]]", replies)

    def _command(self, ask: Ask, queue: str) -> list[str]:
        """The KEYS count, KEYS and ARGV of one ask (gcra.lua's header documents them)."""
        p = server_prefix(self.namespace, ask.server)
        homes = ask.tenant_servers or [ask.server] * len(ask.tenants)
        fair = ask.fair or Fair("")
        keys = [f"{p}:tat", f"{p}:tat:minute", f"{p}:released", f"{p}:grant:{ask.batch_id}",
                f"{p}:grant:{ask.refund_of or ask.batch_id}", f"{p}:{queue}:{ask.line}", f"{p}:fair",
                f"{p}:fair:tags", f"{p}:fair:alive", f"{p}:released:{fair.tenant}"]
        keys += [tenant_day_key(self.namespace, home, t.name) for t, home in zip(ask.tenants, homes, strict=True)]
        limits = ask.limits
        refund = ask.refund if ask.refund_of else 0  # a refund without its grant returns nothing
        args: list[object] = [ask.cost, refund, limits.interval_us, limits.burst, limits.minute_interval_us,
                              limits.minute_burst, self.mark_ttl_s, fair.tenant, repr(float(fair.weight)),
                              fair.backlog, int(fair.ahead), self.lease_us, len(ask.tenants)]
        for t in ask.tenants:
            if len(t.midnights_s) != MIDNIGHTS:
                raise ValueError(f"tenant {t.name}: expected {MIDNIGHTS} midnights")
            args += [t.mails, t.daily_limit, t.refund, *t.midnights_s]
        return [str(len(keys)), *keys, *map(str, args)]

    def leave(self, server: str, tenants: Iterable[str]) -> None:
        """These tenants no longer wait for ``server`` here (their batches were parked or handed
        back): the turn passes at once, not when their lease ends."""
        p = server_prefix(self.namespace, server)
        try:
            with self.client.pipeline(transaction=True) as pipe:
                for name in tenants:
                    pipe.zrem(f"{p}:fair:tags", name)
                    pipe.zrem(f"{p}:fair:alive", name)
                    pipe.hdel(f"{p}:fair", f"b:{name}")
                pipe.execute()
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: leaving the fair queue failed: {type(exc).__name__}: {exc}") from exc

    def ration_high(self, server: str, tenants: dict[str, int], limits: Limits, share: float) -> bool:
        """May these tenants' high-priority mails go ahead of the line? Each tenant has an
        allowance per server of ``share`` of its rate and burst (``priority.lua``); a batch that
        does not fit waits as normal mail, so no tenant can starve others by marking a campaign
        "high"."""
        if not limits.interval_us:
            return True  # an unlimited server has no rate to share
        keys = [f"{server_prefix(self.namespace, server)}:high:{name}" for name in sorted(tenants)]
        args = [math.ceil(limits.interval_us / share), max(1, math.floor(limits.burst * share)),
                *(tenants[name] for name in sorted(tenants))]
        try:
            return bool(self._priority(keys=keys, args=args))
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: priority ration failed: {type(exc).__name__}: {exc}") from exc

    def published(self, server: str, batch_ids: Iterable[str]) -> None:
        """These grants' parts are confirmed in the send queue: a redelivery of their batch need
        not publish them again (only late copies would come of it, each handing its mail back).
        Best effort: unmarked, a part is published again, as before."""
        p = server_prefix(self.namespace, server)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for batch_id in batch_ids:
                    pipe.hset(f"{p}:grant:{batch_id}", "published", "1")
                    pipe.expire(f"{p}:grant:{batch_id}", self.mark_ttl_s)  # never a key without a life
                pipe.execute()
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: marking grants published failed: {type(exc).__name__}: {exc}") from exc

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: ping failed: {type(exc).__name__}: {exc}") from exc
