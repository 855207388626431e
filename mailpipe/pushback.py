"""Servers that push back: each server's pace followed from what it answers, the same for every
replica (issue 22).

A server says it is overloaded the SMTP way (``421 4.7.0 Too many connections``, ``451 4.7.1 Rate
limited``, ``452 4.5.3 Too many recipients``), and that it is broken for us (``535 5.7.8``
authentication failed, ``550 5.7.1`` relaying denied, TLS failing). ``mailpipe/replies.toml``
sorts every reply into a *signal*: recipient (nothing to do with the server), rate, connections
or server_broken. From those, per server, in Redis (``pushback.lua``, beside the server's GCRA),
every sender reporting and every limiter reading on its next decision:

- **rate, multiplicative decrease and additive increase**: a rate signal cuts the effective rate
  (to 0.5 of it for an explicit throttle, 0.7 for a vague "try later": the rule's ``cut``), at
  most once per ``cut_interval`` (the mails already in flight fail of the same overload), never
  below the floor (1 a minute, or 5% of the configured rate). After a quiet period with enough
  successes (5 minutes, 20 mails) it grows by a step (5% of the configured rate), never above
  the configured rate. A cut applies to the limiter's next grant: the GCRA's debt is counted at
  the new rate at once, and its burst shrinks in the same proportion.
- **connections**: a cap on the connections every sender replica together keeps open to the
  server (a lease each in Redis), -1 on a connection signal, +1 after as many clean sessions as
  the cap, between 1 and the configured ``concurrency``.
- **broken**: ``pause_after`` (3) server-broken signals in a row with no success pause the
  server: its batches wait in their lanes (not dead-lettered, not charged against a cap), its
  tenants are told. After a hold (15 min, doubled while it fails, at most 4 h) one mail probes
  it; a success resumes it at a quarter of its rate, to grow back from there. ``mailpipe
  servers resume`` resumes it at once; a changed credential in the servers file too.

The same signal seen by several senders counts once (per job, attempt and class). Our own
give-backs and deadline misses are never signals: only a server's replies (and its refusals to
connect) are.

``Controller`` is the Python twin of ``pushback.lua``: the tests run both on random sequences.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis
import redis.asyncio

from mailpipe import codec
from mailpipe.amqp import Outgoing
from mailpipe.errors import RedisUnavailable
from mailpipe.model import Event, now_ms
from mailpipe.redis_functions import Arg, Library, source
from mailpipe.replies import classify
from mailpipe.servers import ServerConfig
from mailpipe.settings import Settings

US = 1_000_000
HOUR_US = 3600 * US
SEEN_LIMIT = 10**9  # the twin's dedupe set does not expire (Redis's lives an hour)

LIBRARY = Library("mailpipe_pushback", [source("mailpipe", "pushback.lua")])

RATE, CONNECTIONS, SERVER_BROKEN = "rate", "connections", "server_broken"
ACTIVE, PAUSED, PROBING = "active", "paused", "probing"


@dataclass(frozen=True)
class Policy:
    """The controller's numbers for one server (mails/h and microseconds)."""

    conf: float  # the configured rate, mails/h
    concurrency: int
    cut_interval_us: int = 60 * US
    floor: float = 60.0
    quiet_us: int = 300 * US
    quiet_mails: int = 20
    step: float = 0.0
    pause_after: int = 3
    hold_us: int = 900 * US
    hold_max_us: int = 4 * 3600 * US
    resume_at: float = 0.25
    backoff_us: int = 5 * US

    @classmethod
    def of(cls, server: ServerConfig, settings: Settings) -> Policy:
        conf = float(server.rate_per_hour)
        return cls(conf=conf, concurrency=server.concurrency or settings.send_concurrency,
                   cut_interval_us=int(settings.pushback_cut_interval_s * US),
                   floor=max(60.0, settings.pushback_floor * conf), quiet_us=int(settings.pushback_quiet_s * US),
                   quiet_mails=settings.pushback_quiet_mails, step=settings.pushback_step * conf,
                   pause_after=settings.pushback_pause_after, hold_us=int(settings.pushback_hold_s * US),
                   hold_max_us=int(settings.pushback_hold_max_s * US), resume_at=settings.pushback_resume_at,
                   backoff_us=int(settings.pushback_backoff_s * US))

    def args(self) -> list[Arg]:
        return [repr(self.conf), self.concurrency, self.cut_interval_us, repr(self.floor), self.quiet_us,
                self.quiet_mails, repr(self.step), self.pause_after, self.hold_us, self.hold_max_us,
                repr(self.resume_at), self.backoff_us]


class Signal(NamedTuple):
    """A reply that says something about the server: its class, the rule that said so, the
    share of the rate a cut leaves, what it is counted once per (job and attempt), the reply."""

    kind: str
    rule: str
    cut: float
    dedupe: str
    sample: str


class Change(NamedTuple):
    """What a report, a pause or a resume changed: the kind (cut, grew, cap, paused, resumed),
    the effective rate before and after, the state after, the rule."""

    kind: str
    before: float
    after: float
    state: str
    rule: str


def server_keys(namespace: str, server: str) -> list[str]:
    p = f"{{{namespace}:{server}}}"
    return [f"{p}:pb", f"{p}:pb:seen", f"{p}:pb:conns"]


def fingerprint(server: ServerConfig) -> str:
    """A digest of the server's credentials (never the credentials themselves)."""
    creds = server.credentials
    text = f"{creds.username}\0{creds.password}" if creds is not None else ""
    return hashlib.sha256(f"mailpipe-credentials\0{text}".encode()).hexdigest()[:16]


def _report_args(policy: Policy, successes: int, signals: Sequence[Signal]) -> list[Arg]:
    args: list[Arg] = [*policy.args(), successes]
    for s in signals:
        args += [s.kind, s.rule, repr(s.cut), s.dedupe, s.sample[:300]]
    return args


def _changes(reply: Sequence[Any]) -> list[Change]:
    """The changes a function returned (after Redis time, its first value)."""
    items = [v.decode() if isinstance(v, bytes) else str(v) for v in reply[1:]]
    return [Change(items[i], float(items[i + 1]), float(items[i + 2]), items[i + 3], items[i + 4])
            for i in range(0, len(items), 5)]


class Pushback:
    """The functions of ``pushback.lua`` behind typed calls. Every Redis failure is
    ``RedisUnavailable``."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    def report(self, server: str, policy: Policy, successes: int, signals: Sequence[Signal]) -> list[Change]:
        return _changes(LIBRARY.call(self.client, "pb_report", server_keys(self.namespace, server),
                                     _report_args(policy, successes, signals)))

    def pause(self, server: str, policy: Policy, reason: str) -> list[Change]:
        return _changes(LIBRARY.call(self.client, "pb_pause", server_keys(self.namespace, server),
                                     [*policy.args(), reason]))

    def resume(self, server: str, policy: Policy, reason: str) -> list[Change]:
        return _changes(LIBRARY.call(self.client, "pb_resume", server_keys(self.namespace, server),
                                     [*policy.args(), reason]))

    def credentials(self, server: str, policy: Policy, fp: str) -> list[Change]:
        return _changes(LIBRARY.call(self.client, "pb_credentials", server_keys(self.namespace, server),
                                     [*policy.args(), fp]))

    def state(self, servers: Sequence[str]) -> dict[str, dict[str, str]]:
        """Each server's hash as stored (empty: never heard of), for status and metrics."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for server in servers:
                    pipe.hgetall(server_keys(self.namespace, server)[0])
                    pipe.zcard(server_keys(self.namespace, server)[2])
                replies: list[Any] = pipe.execute()
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: reading the servers' pace failed: {exc}") from exc
        out = {}
        for i, server in enumerate(servers):
            values = {_s(k): _s(v) for k, v in replies[2 * i].items()}
            values["open_connections"] = str(replies[2 * i + 1])
            out[server] = values
        return out


class ConnectionLeases:
    """The connection cap every sender replica shares (``pb_conn_open`` / ``pb_conn_close``), on
    the sender's asyncio loop: a lease per open connection, renewed whenever it is reused."""

    def __init__(self, client: redis.asyncio.Redis, namespace: str, lease_s: float) -> None:
        self.client = client
        self.namespace = namespace
        self.lease_us = int(lease_s * US)

    async def open(self, server: str, concurrency: int, conn_id: str) -> tuple[int, int]:
        """(0 when the connection may open, or stay open: a renewal, else microseconds to wait;
        the server's connection cap now)."""
        reply = await LIBRARY.acall(self.client, "pb_conn_open", server_keys(self.namespace, server),
                                    [concurrency, conn_id, self.lease_us])
        return (0 if int(reply[0]) else int(reply[1])), int(reply[2])

    async def wanted(self, server: str) -> bool:
        """Does a connection (of any replica) wait for a place under the server's cap?"""
        return bool(int(await LIBRARY.acall(self.client, "pb_conn_wanted", server_keys(self.namespace, server), [])))

    async def close(self, server: str, concurrency: int, conn_id: str, clean: bool) -> None:
        await LIBRARY.acall(self.client, "pb_conn_close", server_keys(self.namespace, server),
                            [concurrency, conn_id, int(clean)])

    async def report(self, server: str, policy: Policy, signals: Sequence[Signal]) -> list[Change]:
        """Signals reported at once, not with the batch: a server broken for us is then tried
        one connection at a time by every replica (pb_conn_open), and paused sooner. The batch's
        own report later counts them again only once (each has its dedupe key)."""
        return _changes(await LIBRARY.acall(self.client, "pb_report", server_keys(self.namespace, server),
                                            _report_args(policy, 0, signals)))

    async def paused(self, server: str) -> bool:
        """Is the server paused (its hold not over, or by hand)? A batch for it sends nothing."""
        try:
            state: Any = await self.client.hmget(server_keys(self.namespace, server)[0],  # type: ignore[misc]
                                                 ["state", "hold_until", "manual"])
            if _s(state[0] or b"") != PAUSED:
                return False
            now: Any = await self.client.time()
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: reading the server's pace failed: {exc}") from exc
        return _s(state[2] or b"") == "1" or float(state[1] or 0) > int(now[0]) * US + int(now[1])


def tenant_events(exchange: str, server: str, tenants: Iterable[str], what: str, sample: str,
                  batch_id: str = "") -> list[Outgoing]:
    """``paused.<tenant>`` / ``resumed.<tenant>`` for each tenant of ``server``: which server,
    the reply that decided it (``sample``, "" by hand) and its advice."""
    code, _, text = sample.partition(" ")
    reply = classify(int(code), text) if code.isdigit() else None
    return [Outgoing(f"{what}.{tenant}", codec.encode_event(Event(
        job_id="", tenant=tenant, server=server, outcome=what, recipients=(), attempt=0, created_ms=0,
        at_ms=now_ms(), code=reply.code if reply else 0, text=reply.text if reply else "",
        category=reply.category if reply else "", advice=reply.advice if reply else "", batch_id=batch_id)),
        exchange=exchange, mandatory=False) for tenant in sorted(set(tenants))]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the Python twin --------------------------------------------------------------------------

@dataclass
class Controller:
    """One server's pace as ``pushback.lua`` keeps it (the hash's fields), and its functions."""

    conf: float | None = None
    eff: float | None = None
    state: str = ACTIVE
    manual: bool = False
    hold_until: int = 0
    hold_us: int = 0
    last_cut: int = 0
    last_change: int = 0
    since: int = 0
    streak: int = 0
    cap: int | None = None
    clean: int = 0
    probe_at: int = 0
    backoff_us: int = 0
    backoff_until: int = 0
    seen: set[str] = field(default_factory=set)

    def _load(self, policy: Policy) -> None:
        stored = self.conf
        eff = policy.conf if self.eff is None else self.eff
        if stored != policy.conf:
            eff = min(eff, policy.conf)
            if stored is not None and eff == stored:
                eff = policy.conf
        self.conf, self.eff = policy.conf, eff
        cap = policy.concurrency if self.cap is None else self.cap
        self.cap = max(1, min(cap, policy.concurrency))

    def report(self, now_us: int, policy: Policy, successes: int, signals: Sequence[Signal]) -> list[Change]:
        self._load(policy)
        assert self.eff is not None and self.cap is not None
        out: list[Change] = []

        def changed(kind: str, before: float, rule: str) -> None:
            assert self.eff is not None
            out.append(Change(kind, before, self.eff, self.state, rule))

        if successes > 0:
            self.backoff_us = 0  # the server took mail: a hold starts over from its first step
        for s in signals:
            key = f"{s.dedupe} {s.kind}"
            if key in self.seen:
                continue
            self.seen.add(key)
            if s.kind == RATE:
                if self.state == ACTIVE and now_us - self.last_cut >= policy.cut_interval_us:
                    before = self.eff
                    self.eff = max(policy.floor, self.eff * s.cut)
                    self.last_cut = self.last_change = now_us
                    self.since = 0
                    changed("cut", before, s.rule)
                if now_us >= self.backoff_until:  # a mail granted after the hold: not one in flight
                    self.backoff_us = min(policy.cut_interval_us,
                                          self.backoff_us * 2 if self.backoff_us else policy.backoff_us)
                    self.backoff_until = now_us + self.backoff_us
            elif s.kind == CONNECTIONS and self.cap > 1:
                self.cap, self.clean = self.cap - 1, 0
                changed("cap", self.eff, s.rule)
            elif s.kind == SERVER_BROKEN:
                self.streak += 1
                if self.state == PROBING:
                    self.state = PAUSED
                    self.hold_us = min(policy.hold_max_us, max(policy.hold_us, self.hold_us * 2))
                    self.hold_until = now_us + self.hold_us
                    changed("paused", self.eff, s.rule)
                elif self.state == ACTIVE and self.streak >= policy.pause_after:
                    self.state, self.hold_us, self.hold_until = PAUSED, policy.hold_us, now_us + policy.hold_us
                    changed("paused", self.eff, s.rule)
        if successes > 0:
            self.streak = 0
            if (self.state == PAUSED and not self.manual) or self.state == PROBING:
                before = self.eff
                self.state, self.eff = ACTIVE, max(policy.floor, policy.conf * policy.resume_at)
                self.hold_us = self.hold_until = 0
                self.last_change, self.since = now_us, 0
                changed("resumed", before, "")
            self.since += successes
            if (self.state == ACTIVE and self.eff < policy.conf and now_us - self.last_change >= policy.quiet_us
                    and self.since >= policy.quiet_mails):
                before = self.eff
                self.eff = min(policy.conf, self.eff + policy.step)
                self.last_change, self.since = now_us, 0
                changed("grew", before, "")
        return out

    def pause(self, now_us: int, policy: Policy) -> list[Change]:
        self._load(policy)
        assert self.eff is not None
        self.state, self.manual, self.hold_until = PAUSED, True, now_us + 100 * 365 * 86400 * US
        return [Change("paused", self.eff, self.eff, self.state, "manual")]

    def resume(self, now_us: int, policy: Policy) -> list[Change]:
        self._load(policy)
        assert self.eff is not None
        if self.state == ACTIVE:
            return []
        self.state, self.manual, self.hold_until, self.hold_us, self.streak = ACTIVE, False, 0, 0, 0
        self.last_change, self.since, self.backoff_us, self.backoff_until = now_us, 0, 0, 0
        return [Change("resumed", self.eff, self.eff, self.state, "manual")]

    # What the limiter's decision reads (limiter/decide.lua).
    def paced(self, interval_us: int, burst: int) -> tuple[int, int]:
        """The effective interval and grant burst: the configured ones, or after a cut a longer
        interval and a burst in the same proportion."""
        if interval_us and self.eff is not None and self.conf is not None and self.eff < self.conf:
            slow = math.ceil(HOUR_US / self.eff)
            if slow > interval_us:
                return slow, max(1, math.floor(burst * self.eff / self.conf))
        return interval_us, burst
