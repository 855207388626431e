"""The limiter's function library and the lanes' against real Redis: every function must decide
exactly as its Python twin (``limiter.decide``, ``limiter.taking``, ``mailpipe.lanes.LaneBook``)
given the same Redis time, leave the same state, and translate an unreachable Redis into
RedisUnavailable."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from limiter import taking
from limiter.decide import Day, Fair, State, TenantAsk, decide, refund
from limiter.gcra import Limits, local_midnights
from limiter.redis_limiter import LIBRARY, Ask, RedisLimiter, connect, day_key
from limiter.status import released_since, snapshot
from mailpipe.errors import RedisUnavailable
from mailpipe.lanes import LIBRARY as LANES
from mailpipe.lanes import LaneBook, lane_id, server_keys
from mailpipe.pushback import LIBRARY as PUSHBACK
from mailpipe.pushback import Policy, Signal
from mailpipe.pushback import server_keys as pushback_keys
from mailpipe.servers import parse_config
from mailpipe.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """The Redis of conftest's ``redis_url`` (it skips or, in CI, fails when there is none)."""
    c = connect(redis_url, timeout_s=2)
    yield c
    c.close()


@pytest.fixture
def namespace(client: redis.Redis) -> Iterator[str]:
    """Redis only (conftest's also needs RabbitMQ)."""
    ns = f"test-{uuid.uuid4().hex}"
    yield ns
    for key in client.scan_iter(match=f"*{ns}*", count=1000):
        client.delete(key)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_book(client: redis.Redis, namespace: str, server: str) -> LaneBook:
    """What Redis holds for a server's lanes and fair queue, in the twin's shape."""
    keys = server_keys(namespace, server)
    lanes = {_s(k): _s(v) for k, v in client.hgetall(keys[0]).items()}  # type: ignore[union-attr]

    def field(prefix: str) -> dict[str, int]:
        return {k[len(prefix):]: int(float(v)) for k, v in lanes.items() if k.startswith(prefix)}

    def zset(key: str) -> dict[str, int]:
        return {_s(m): int(s) for m, s in client.zrange(key, 0, -1, withscores=True)}  # type: ignore[union-attr]

    fair = {_s(k): _s(v) for k, v in client.hgetall(keys[5]).items()}  # type: ignore[union-attr]
    tags = {_s(m): float(s) for m, s in client.zrange(keys[6], 0, -1, withscores=True)}  # type: ignore[union-attr]
    return LaneBook(version=field("v:"), mails=field("m:"), generation=field("g:"), closing=field("c:"),
                    held=field("hc:"), held_mails=field("hmt:"), hold_mails=field("hm:"), lanes_off=field("off:"),
                    present=zset(keys[1]),
                    pubs=zset(keys[2]), holds=zset(keys[3]), known=zset(keys[4]), v=float(fair.get("v", 0)),
                    finish={k[2:]: float(v) for k, v in fair.items() if k.startswith("f:")}, tags=tags,
                    off=zset(keys[7]), active=bool(client.sismember(keys[8], server)))


class Twins:
    """One server's keys in Redis and the twin state, driven together."""

    def __init__(self, client: redis.Redis, namespace: str, server: str = "s") -> None:
        self.client, self.namespace, self.server = client, namespace, server
        self.limiter = RedisLimiter(client, namespace, hold_lease_s=0.05)
        self.state = State()
        self.keys = server_keys(namespace, server)

    def check(self, context: str) -> None:
        assert read_book(self.client, self.namespace, self.server) == self.state.book, context

    def publish(self, lanes: list[tuple[str, int]]) -> None:
        token = "pub"
        names = [name for name, _ in lanes]
        reply = LANES.call(self.client, "lane_enter", self.keys, [self.server, token, 10**6, *names])
        assert [int(x) for x in reply[1:]] == self.state.book.enter(int(reply[0]), token, 10**6, names)[1:]
        reply = LANES.call(self.client, "lane_exit", self.keys, [self.server, token, *(x for p in lanes for x in p)])
        self.state.book.exit(int(reply[0]), token, lanes)

    def call(self, name: str, args: list[Any]) -> list[Any]:
        reply = LIBRARY.call(self.client, name, self.keys, [self.server, *args])
        return [_s(x) for x in reply]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_decisions_agree_with_the_reference(client: redis.Redis, namespace: str, seed: int) -> None:
    """Random decisions of one tenant (sizes, caps, time zones, rate changes, per-minute
    ceilings, redeliveries, refunds): every decision and the state left equal the twin's."""
    rng = random.Random(seed)
    limiter = RedisLimiter(client, namespace)
    choices = [Limits.for_server(36_000, 10), Limits.for_server(360_000, 50, per_minute=60, window_s=1),
               Limits.for_server(7_000, 30, per_minute=40, window_s=0.5), Limits.for_server(1200, 500, unlimited=True)]
    limits = choices[seed % 4]
    state = State()
    zones = {"a": "UTC", "b": "Asia/Kolkata", "c": "America/Los_Angeles"}
    caps = {"a": rng.randint(20, 200), "b": rng.randint(20, 200), "c": 10_000}
    ids: list[str] = []
    for step in range(400):
        if step % 100 == 99:
            limits = rng.choice(choices)
        name = rng.choice(sorted(zones))
        cost = rng.randint(0, 25)
        if ids and rng.random() < 0.1:  # a give-back's refund
            of, mails = rng.choice(ids), rng.randint(1, 30)
            got_refund = limiter.refund("s", of, mails, limits, [(name, mails)])
            now = int(client.time()[0]) * 1_000_000 + int(client.time()[1])  # type: ignore[index]
            assert got_refund == refund(state, now, of, mails, limits.interval_us, [(name, mails)])
        part = rng.choice(ids) if ids and rng.random() < 0.15 else uuid.uuid4().hex
        ids.append(part)
        tenants = [TenantAsk(name, cost, caps[name], local_midnights(zones[name], time.time()))]
        got = limiter.decide(Ask("s", part, cost, limits, tenants))
        want = decide(state, got.now_us, part, cost, limits, tenants)
        assert got == want, f"seed {seed} step {step}: {part} cost {cost} {name}"
        for n in zones:
            day: Any = client.hmget(day_key(namespace, n), "day", "end", "n")
            stored = Day(int(day[0]), int(day[1]), int(day[2])) if day[0] else None
            assert stored == state.days.get(n), f"seed {seed}: tenant {n} at step {step}"
        if rng.random() < 0.1:
            time.sleep(rng.random() / 20)
    tat: Any = client.hget(f"{{{namespace}:s}}:tat", "tat")
    if tat is not None:
        assert int(float(tat)) == state.tat_us


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_lanes_and_the_fair_queue_agree_with_the_reference(client: redis.Redis, namespace: str,
                                                                 seed: int) -> None:
    """Tenants publishing into lanes, limiters taking (holds, empty lanes, ended leases),
    releasing and giving back, decisions with weights, transactional mail within its ration,
    caps, hold-offs, plans and lane deletions: every reply and the whole state equal the twin's."""
    rng = random.Random(seed)
    twins = Twins(client, namespace)
    book = twins.state.book
    lease_us = twins.limiter.hold_lease_us
    rate = [36_000, 360_000, 3_600_000][seed % 3]
    limits = [Limits.for_server(36_000, 10), Limits.for_server(360_000, 20, per_minute=90, window_s=1),
              Limits.for_server(3_600_000, 40)][seed % 3]
    # The server's pace (mailpipe/pushback.py), fast: cuts, pauses and probes come round.
    policy = Policy(conf=float(rate), concurrency=4, cut_interval_us=30_000, floor=rate * 0.05, quiet_us=50_000,
                    quiet_mails=3, step=rate * 0.05, pause_after=2, hold_us=40_000, hold_max_us=200_000)
    pb_keys = pushback_keys(namespace, "s")
    paces: set[str] = set()  # the kinds of pace changes seen
    weights = {"a": 1.0, "b": 3.0, "c": 0.5, "d": 1.0}
    caps = {"a": 10_000, "b": 10_000, "c": 10_000, "d": rng.randint(10, 40)}
    holds: list[str] = []
    for step in range(400):
        op = rng.random()
        name = rng.choice(sorted(weights))
        lane = lane_id(name, "high" if rng.random() < 0.2 else "normal")
        context = f"seed {seed} step {step} op {op:.2f} {lane}"
        if op < 0.2:
            twins.publish([(lane, rng.randint(1, 30))])
        elif op < 0.35:  # take: hold, then got (a batch or empty)
            member = f"r{rng.randint(1, 2)}/{step} {lane}"
            reply = twins.call("hold", [lease_us, member])
            assert [int(x) for x in reply[1:]] == taking.hold(book, int(reply[0]), lease_us, [member]), context
            version = int(reply[1])
            mails = rng.choice([0, rng.randint(1, 20)]) if lane in book.present else 0
            reply = twins.call("got", [lease_us, member, version, mails])
            taking.got(book, int(reply[0]), lease_us, [(member, version, mails)])
            if mails:
                holds.append(member)
        elif op < 0.45 and holds:
            member = holds.pop(rng.randrange(len(holds)))
            requeued = rng.random() < 0.3
            reply = twins.call("release", [member, int(requeued)])
            taking.release(book, int(reply[0]), [(member, requeued)])
        elif op < 0.8:
            hold = rng.choice(holds) if holds and rng.random() < 0.5 else ""
            lane_of_hold = hold.split(" ", 1)[1] if hold else lane
            who = lane_of_hold[2:]
            mails = rng.randint(1, 12)
            fair = Fair(who, weights[who], rng.random() < 0.1)
            tenants = [TenantAsk(who, mails, caps[who], local_midnights("UTC", time.time()))]
            part = uuid.uuid4().hex
            got = twins.limiter.decide(Ask("s", part, mails, limits, tenants, fair, hold, lane_of_hold if hold else "",
                                           who))
            want = decide(twins.state, got.now_us, part, mails, limits, tenants, fair, hold, lease_us,
                          lane_of_hold if hold else "", round_key=f"one:{who}")
            assert got == want, context
            twins.state.rounds.clear()
        elif op < 0.85:
            reply = twins.call("plan", [int(limits.interval_us > 0), 3])
            items = reply[1:]
            got_plan = [(items[i], int(items[i + 1])) for i in range(0, len(items), 2)]
            assert got_plan == taking.plan(book, int(reply[0]), limits.interval_us > 0, 3), context
        elif op < 0.87:
            until = rng.choice([0, int(time.time() * 1_000_000) + rng.randint(1, 400) * 1000])
            reply = twins.call("hold_off", [name, until])
            taking.hold_off(book, int(reply[0]), name, until)
        elif op < 0.9:
            until = rng.choice([0, 0, int(time.time() * 1_000_000) + rng.randint(1, 400) * 1000])
            reply = twins.call("lane_off", [lane, until])
            taking.lane_off(book, int(reply[0]), lane, until)
        elif op < 0.93:
            reply = twins.call("close_begin", [0, 10**6, lane])
            closing = [int(x) for x in reply[1:]]
            assert closing == taking.close_begin(book, int(reply[0]), 0, 10**6, [lane]), context
            if closing[0]:
                deleted = rng.random() < 0.8
                reply = twins.call("close_end", [lane, int(deleted)])
                taking.close_end(book, int(reply[0]), lane, deleted)
        elif op < 0.97:  # a sender reports what the server answered: the next decisions follow
            signals = [Signal(rng.choice(["rate", "server_broken", "server_broken", "connections"]), "rule",
                              rng.choice([0.5, 0.7]),
                              f"{uuid.uuid4().hex}:0", "451 4.7.1 x") for _ in range(rng.choice([0, 1, 1, 2]))]
            successes = rng.choice([0, 0, 0, 0, 1, 5])
            args: list[Any] = [*policy.args(), successes]
            for sig in signals:
                args += [sig.kind, sig.rule, repr(sig.cut), sig.dedupe, sig.sample]
            reply = PUSHBACK.call(client, "pb_report", pb_keys, args)
            changes = twins.state.pushback.report(int(reply[0]), policy, successes, signals)
            paces.update(change.kind for change in changes)
        else:
            members = holds[:3]
            reply = twins.call("renew", [lease_us, *members])
            assert [int(x) for x in reply[1:]] == taking.renew(book, int(reply[0]), lease_us, members), context
        twins.check(context)
        if rng.random() < 0.2:
            time.sleep(rng.random() / 25)  # some holds' leases end between calls
    assert sum(sum(r.values()) for r in twins.state.tenant_released.values()) > 0
    assert {"cut", "paused", "resumed"} <= paces, paces


def test_status_snapshot_reads_what_the_script_wrote(client: redis.Redis, namespace: str) -> None:
    config = parse_config({
        "servers": {"s1": {"address": "smtp.example.com", "rate_per_hour": 3600},
                    "open": {"address": "smtp.example.net", "unlimited": True}},
        "tenants": {"jp": {"server": "s1", "daily_limit": 50, "timezone": "Asia/Tokyo"},
                    "idle": {"server": "s1"}}}, "test", {})
    limiter = RedisLimiter(client, namespace)
    limits = Limits.for_server(3600, 10)
    for i in range(3):
        limiter.decide(Ask("s1", f"b{i}", 4, limits, [TenantAsk("jp", 4, 50, local_midnights("Asia/Tokyo",
                                                                                            time.time()))]))
    no_window = Settings(burst_mails=10, window_s=0.0)
    rows = {(r["kind"], r["name"]): r for r in snapshot(client, namespace, config, no_window)}
    s1 = rows[("server", "s1")]
    assert (s1["rate_per_hour"], s1["released_last_minute"], s1["released_last_hour"]) == (3600, 8, 8)
    assert s1["tokens_available"] == 2
    assert rows[("server", "open")]["tokens_available"] == "unlimited"
    assert (rows[("tenant", "jp")]["today"], rows[("tenant", "jp")]["daily_limit"]) == (8, 50)
    assert rows[("tenant", "idle")]["today"] == 0


def test_released_buckets_age_out() -> None:
    ring = {"b0": "100", "c0": "5", "b1": "101", "c1": "7", "b2": "40", "c2": "9"}
    assert released_since(ring, 1000) == 12
    assert released_since(ring, 1010) == 7
    assert released_since(ring, 1020) == 0


def test_unreachable_redis_is_limiter_unavailable() -> None:
    dead = connect("redis://127.0.0.1:1/0", timeout_s=0.5)
    limiter = RedisLimiter(dead, "test-nowhere")
    with pytest.raises(RedisUnavailable, match="Redis"):
        limiter.decide(Ask("s", "b", 1, Limits.for_server(1200, 500)))
    with pytest.raises(RedisUnavailable):
        limiter.plan([("s", True)], 4)
    with pytest.raises(RedisUnavailable):
        limiter.ping()


def test_one_round_decides_each_line_in_order_and_a_refusal_holds_the_rest(
        client: redis.Redis, namespace: str) -> None:
    """Pipelined: the line of s1 is granted until one is refused; the small batch behind the
    refused one is not decided (it would fit, but must not overtake it); s2's line goes on."""
    limiter = RedisLimiter(client, namespace)
    limits = Limits.for_server(3600, 10)  # 10 at once, then one a second
    asks = [Ask("s1", "a", 4, limits, line="t"), Ask("s2", "x", 10, limits, line="t"),
            Ask("s1", "b", 4, limits, line="t"), Ask("s1", "c", 5, limits, line="t"),
            Ask("s1", "d", 1, limits, line="t"), Ask("s2", "y", 1, limits, line="t")]
    a, x, b, c, d, y = limiter.decide_many(asks, "r1")
    assert (a.granted, b.granted, x.granted) == (4, 4, 10)
    assert c.granted == 0 and c.retry_after_us > 0 and not c.skipped
    assert d.skipped and d.granted == 0
    assert y.granted == 0 and not y.skipped  # s2's own bucket is empty: refused, not skipped
    # The next round is a new one: the small batch is decided on its own.
    assert limiter.decide_many([Ask("s1", "d", 1, limits, line="t")], "r2")[0].granted == 1


def test_a_flushed_function_library_is_loaded_again(client: redis.Redis, namespace: str) -> None:
    """Redis restarted (it keeps nothing on disk here) or flushed: the next call loads the
    library again, in one call or in a pipelined round."""
    limiter = RedisLimiter(client, namespace)
    client.function_flush()
    assert limiter.decide(Ask("s", "b1", 1, Limits.for_server(3600, 10))).granted == 1
    client.function_flush()
    decisions = limiter.decide_many([Ask("s", f"b{i}", 1, Limits.for_server(3600, 10), line=f"l{i}")
                                     for i in (2, 3)], "r")
    assert [d.granted for d in decisions] == [1, 1]


def test_two_versions_of_a_library_live_side_by_side(client: redis.Redis, namespace: str) -> None:
    """A rolling upgrade: each version's functions carry its code's hash, so neither replaces
    the other's."""
    from mailpipe.redis_functions import Library, source

    other = Library("mailpipe_limiter", [source("mailpipe", "lanes_common.lua"), source("limiter", "taking.lua"),
                                         source("limiter", "decide.lua"), b"-- another version\n"])
    other.load(client)
    LIBRARY.load(client)
    assert other.function("decide") != LIBRARY.function("decide")
    names = {_s(lib[1]) for lib in client.function_list()}  # type: ignore[union-attr]
    assert {other.name, LIBRARY.name} <= names
    client.function_delete(other.name)
