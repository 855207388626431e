"""gcra.lua against real Redis: it must decide exactly as the Python reference (limiter.gcra.decide)
given the same Redis time, and translate an unreachable Redis into RedisUnavailable."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from limiter.gcra import (
    Ask,
    Fair,
    Limits,
    RedisLimiter,
    State,
    TenantAsk,
    connect,
    decide,
    local_midnights,
)
from limiter.status import released_since, snapshot
from mailpipe.errors import RedisUnavailable
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
    for key in client.scan_iter(match=f"{{{ns}:*", count=1000):
        client.delete(key)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_script_decides_exactly_as_the_reference(client: redis.Redis, namespace: str, seed: int) -> None:
    rng = random.Random(seed)
    limiter = RedisLimiter(client, namespace)
    # Each seed walks through rate changes, as a live servers file does.
    choices = [Limits.for_server(36_000, 10), Limits.for_server(360_000, 50, per_minute=600),
               Limits.for_server(7_000, 30, per_minute=100), Limits.for_server(1200, 500, unlimited=True)]
    limits = choices[seed % 4]
    state = State()
    zones = {"a": "UTC", "b": "Asia/Kolkata", "c": "America/Los_Angeles"}
    caps = {"a": rng.randint(20, 200), "b": rng.randint(20, 200), "c": 10_000}
    ids: list[str] = []
    for step in range(400):
        if step % 100 == 99:
            limits = rng.choice(choices)
        names = rng.sample(sorted(zones), rng.randint(0, 2))
        counts = {n: rng.randint(1, 25) for n in names}
        cost = sum(counts.values()) if names else rng.choice([0, rng.randint(1, 60)])
        refund = rng.choice([0, 0, 0, rng.randint(1, 30)])
        refund_of = rng.choice(ids) if refund and ids else ""
        batch_id = rng.choice(ids) if ids and rng.random() < 0.15 else uuid.uuid4().hex
        ids.append(batch_id)
        wall = time.time()
        tenants = [TenantAsk(n, counts[n], caps[n], local_midnights(zones[n], wall),
                             rng.randint(0, counts[n]) if refund_of else 0) for n in names]
        got = limiter.acquire("s", batch_id, cost, limits, refund=refund, tenants=tenants, refund_of=refund_of)
        want = decide(state, got.now_us, batch_id, cost, limits, tenants, refund if refund_of else 0, refund_of)
        assert got == want, f"seed {seed}: {batch_id} cost {cost} refund {refund} of {refund_of} {counts}"
        for n in names:
            day: Any = client.hmget(f"{{{namespace}:s}}:day:{n}", "n")
            assert int(day[0] or 0) == state.days.get(n, (0, 0))[1], f"seed {seed}: tenant {n} at step {step}"
        if rng.random() < 0.1:
            time.sleep(rng.random() / 20)
    tat: Any = client.hget(f"{{{namespace}:s}}:tat", "tat")
    if tat is not None:
        assert int(float(tat)) == state.tat_us


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fair_share_is_decided_exactly_as_the_reference(client: redis.Redis, namespace: str, seed: int) -> None:
    """Tenants arriving, waiting, leaving (and their leases ending), weights, high priority,
    caps: every decision and the fair queue left in Redis equal the reference's."""
    rng = random.Random(seed)
    lease_s = 0.02  # short, so that some waiters' leases end between decisions
    limiter = RedisLimiter(client, namespace, fair_lease_s=lease_s)
    limits = [Limits.for_server(36_000, 10), Limits.for_server(360_000, 20, per_minute=900),
              Limits.for_server(3_600_000, 40)][seed % 3]
    state = State()
    weights = {"a": 1.0, "b": 3.0, "c": 0.5, "d": 1.0}
    caps = {"a": 10_000, "b": 10_000, "c": 10_000, "d": rng.randint(10, 40)}
    p = f"{{{namespace}:s}}"
    for step in range(300):
        name = rng.choice(sorted(weights))
        if rng.random() < 0.05:
            limiter.leave("s", [name])
            state.fair.leave(name)
            continue
        mails = rng.randint(1, 12)
        fair = Fair(name, weights[name], mails + rng.choice([0, 0, rng.randint(1, 30)]), rng.random() < 0.1)
        tenants = [TenantAsk(name, mails, caps[name], local_midnights("UTC", time.time()))]
        batch_id = uuid.uuid4().hex
        got = limiter.acquire("s", batch_id, mails, limits, tenants=tenants, fair=fair)
        want = decide(state, got.now_us, batch_id, mails, limits, tenants, fair=fair,
                      lease_us=int(lease_s * 1_000_000))
        assert got == want, f"seed {seed} step {step}: {fair}"
        tags: Any = client.zrange(f"{p}:fair:tags", 0, -1, withscores=True)
        assert {k.decode(): v for k, v in tags} == state.fair.tags, f"seed {seed} step {step}"
        v: Any = client.hget(f"{p}:fair", "v")
        assert float(v or 0) == state.fair.v
        if rng.random() < 0.2:
            time.sleep(rng.random() / 25)
    assert sum(sum(r.values()) for r in state.fair.released.values()) > 0


def test_keys_of_one_decision_share_a_hash_tag(client: redis.Redis, namespace: str) -> None:
    limiter = RedisLimiter(client, namespace)
    t = TenantAsk("acme", 3, 100, local_midnights("UTC", time.time()))
    assert limiter.acquire("smtp1", "b1", 3, Limits.for_server(1200, 500), tenants=[t]).granted == 3
    keys = sorted(k.decode() for k in client.scan_iter(match=f"{{{namespace}:*", count=1000))
    assert keys and all(k.startswith(f"{{{namespace}:smtp1}}:") for k in keys)
    assert len({_slot(k) for k in keys}) == 1


def _slot(key: str) -> int:
    """Redis Cluster's slot: CRC16 of the hash tag, mod 16384 (redis-py's own function)."""
    from redis.crc import key_slot
    return key_slot(key.encode())


def test_status_snapshot_reads_what_the_script_wrote(client: redis.Redis, namespace: str) -> None:
    config = parse_config({
        "servers": {"s1": {"address": "smtp.example.com", "rate_per_hour": 3600},
                    "open": {"address": "smtp.example.net", "unlimited": True}},
        "tenants": {"jp": {"server": "s1", "daily_limit": 50, "timezone": "Asia/Tokyo"},
                    "idle": {"server": "s1"}}}, "test", {})
    limiter = RedisLimiter(client, namespace)
    limits = Limits.for_server(3600, 10)
    for i in range(3):
        limiter.acquire("s1", f"b{i}", 4, limits, tenants=[TenantAsk("jp", 4, 50, local_midnights("Asia/Tokyo",
                                                                                                  time.time()))])
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
        limiter.acquire("s", "b", 1, Limits.for_server(1200, 500))
    with pytest.raises(RedisUnavailable):
        limiter.ping()


def test_one_round_decides_each_line_in_order_and_a_refusal_holds_the_rest(
        client: redis.Redis, namespace: str) -> None:
    """Pipelined: the line of s1 is granted until one is refused; the small batch behind the
    refused one is not decided (it would fit, but must not overtake it); s2's line goes on."""
    limiter = RedisLimiter(client, namespace)
    limits = Limits.for_server(3600, 10)  # 10 at once, then one a second
    asks = [Ask("s1", "a", 4, limits), Ask("s2", "x", 10, limits), Ask("s1", "b", 4, limits),
            Ask("s1", "c", 5, limits), Ask("s1", "d", 1, limits), Ask("s2", "y", 1, limits)]
    a, x, b, c, d, y = limiter.acquire_many(asks)
    assert (a.granted, b.granted, x.granted) == (4, 4, 10)
    assert c.granted == 0 and c.retry_after_us > 0 and not c.skipped
    assert d.skipped and d.granted == 0
    assert y.granted == 0 and not y.skipped  # s2's own bucket is empty: refused, not skipped
    # The next round is a new one: the small batch is decided on its own.
    assert limiter.acquire("s1", "d", 1, limits).granted == 1


def test_a_flushed_script_cache_is_loaded_again(client: redis.Redis, namespace: str) -> None:
    limiter = RedisLimiter(client, namespace)
    client.script_flush()
    assert limiter.acquire("s", "b1", 1, Limits.for_server(3600, 10)).granted == 1
    client.script_flush()
    decisions = limiter.acquire_many([Ask("s", f"b{i}", 1, Limits.for_server(3600, 10)) for i in (2, 3)])
    assert [d.granted for d in decisions] == [1, 1]
