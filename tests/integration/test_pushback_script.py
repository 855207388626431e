"""pushback.lua against real Redis: every report, pause and resume changes a server's pace
exactly as the Python twin (``mailpipe.pushback.Controller``) does, on random signal sequences;
and the connection cap is shared by every sender replica through leases."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from limiter.redis_limiter import connect
from mailpipe.pushback import LIBRARY, Controller, Policy, Pushback, Signal, _changes, server_keys

pytestmark = pytest.mark.integration

US = 1_000_000


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = connect(redis_url, timeout_s=2)
    yield c
    c.close()


@pytest.fixture
def namespace(client: redis.Redis) -> Iterator[str]:
    ns = f"test-{uuid.uuid4().hex}"
    yield ns
    for key in client.scan_iter(match=f"*{ns}*", count=1000):
        client.delete(key)


def stored(client: redis.Redis, namespace: str) -> dict[str, Any]:
    raw: Any = client.hgetall(server_keys(namespace, "s")[0])
    h = {k.decode(): v.decode() for k, v in raw.items()}
    return {"eff": float(h["eff"]), "state": h["state"], "manual": h["manual"] == "1",
            "hold_until": int(float(h["hold_until"])), "hold_us": int(float(h["hold_us"])),
            "last_cut": int(float(h["last_cut"])), "last_change": int(float(h["last_change"])),
            "since": int(h["since"]), "streak": int(h["streak"]), "cap": int(h["cap"]), "clean": int(h["clean"]),
            "backoff_us": int(float(h["backoff_us"])), "backoff_until": int(float(h["backoff_until"]))}


def twin(c: Controller) -> dict[str, Any]:
    return {"eff": c.eff, "state": c.state, "manual": c.manual, "hold_until": c.hold_until, "hold_us": c.hold_us,
            "last_cut": c.last_cut, "last_change": c.last_change, "since": c.since, "streak": c.streak,
            "cap": c.cap, "clean": c.clean, "backoff_us": c.backoff_us, "backoff_until": c.backoff_until}


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_the_pace_changes_exactly_as_the_reference(client: redis.Redis, namespace: str, seed: int) -> None:
    """Short intervals (milliseconds) so that cuts, quiet periods and holds all come round; the
    twin is given the Redis time each call returned."""
    rng = random.Random(seed)
    policy = Policy(conf=36_000.0, concurrency=4, cut_interval_us=40_000, floor=1800.0, quiet_us=60_000,
                    quiet_mails=5, step=1800.0, pause_after=3, hold_us=50_000, hold_max_us=400_000,
                    backoff_us=5_000)
    keys = server_keys(namespace, "s")
    c = Controller()
    kinds = ["rate", "rate", "connections", "server_broken", "recipient"]
    for step in range(300):
        op = rng.random()
        if op < 0.75:
            signals = [Signal(rng.choice(kinds), f"rule-{rng.randint(1, 5)}", rng.choice([0.5, 0.7]),
                              f"job{rng.randint(1, 60)}:{rng.randint(0, 2)}", "451 4.7.1 x")
                       for _ in range(rng.choice([0, 0, 1, 1, 2]))]
            successes = rng.choice([0, 0, 1, 3, 10])
            args: list[Any] = [*policy.args(), successes]
            for s in signals:
                args += [s.kind, s.rule, repr(s.cut), s.dedupe, s.sample]
            reply = LIBRARY.call(client, "pb_report", keys, args)
            want = c.report(int(reply[0]), policy, successes, signals)
        elif op < 0.85:
            reply = LIBRARY.call(client, "pb_pause", keys, [*policy.args(), "by hand"])
            want = c.pause(int(reply[0]), policy)
        else:
            reply = LIBRARY.call(client, "pb_resume", keys, [*policy.args(), "by hand"])
            want = c.resume(int(reply[0]), policy)
        assert stored(client, namespace) == twin(c), f"seed {seed} step {step}"
        assert [(x.kind, x.state, x.after) for x in _changes(reply)] == [(x.kind, x.state, x.after) for x in want], \
            f"seed {seed} step {step}"
        if rng.random() < 0.3:
            time.sleep(rng.random() / 20)
    assert c.state != "active" or c.eff is not None


def test_the_connection_cap_holds_for_every_replica_together(client: redis.Redis, namespace: str) -> None:
    pb = Pushback(client, namespace)
    policy = Policy(conf=3600.0, concurrency=3)
    keys = server_keys(namespace, "s")

    def open_(conn: str) -> bool:
        return bool(int(LIBRARY.call(client, "pb_conn_open", keys, [3, conn, 60 * US])[0]))

    assert [open_(f"sender{i % 2}/{i}") for i in range(4)] == [True, True, True, False]  # two replicas, cap 3
    pb.report("s", policy, 0, [Signal("connections", "too-many-connections", 1.0, "x:0", "421 4.7.0")])
    LIBRARY.call(client, "pb_conn_close", keys, [3, "sender0/0", 0])
    assert not open_("sender1/5")  # the cap is 2 now, and two are open
    LIBRARY.call(client, "pb_conn_close", keys, [3, "sender1/1", 1])
    assert open_("sender1/5")
    # As many clean sessions as the cap: it grows by one.
    for conn in ("sender0/2", "sender1/5"):
        LIBRARY.call(client, "pb_conn_close", keys, [3, conn, 1])
    assert int(LIBRARY.call(client, "pb_conn_close", keys, [3, "none", 1])[0]) == 3
    # A lease that ended (a sender gone) frees its place.
    assert [open_(f"s/{i}") for i in range(3)] == [True, True, True]
    client.zadd(keys[2], {"s/0": 0})
    assert open_("s/9")


def test_a_server_that_says_it_is_broken_gets_one_connection_at_a_time(client: redis.Redis, namespace: str) -> None:
    pb = Pushback(client, namespace)
    policy = Policy(conf=3600.0, concurrency=3)
    keys = server_keys(namespace, "s")

    def open_(conn: str) -> bool:
        return bool(int(LIBRARY.call(client, "pb_conn_open", keys, [3, conn, 60 * US])[0]))

    pb.report("s", policy, 0, [Signal("server_broken", "auth-failed", 1.0, "x:connect", "535 5.7.8")])
    assert [open_("sender0/1"), open_("sender1/2")] == [True, False]  # one trial, whichever replica
    LIBRARY.call(client, "pb_conn_close", keys, [3, "sender0/1", 1])
    assert open_("sender1/2")
    pb.report("s", policy, 1, [])  # it took a mail: the whole cap again
    assert [open_("sender0/3"), open_("sender0/4")] == [True, True]


def test_a_connection_refused_a_place_marks_the_server_wanted_for_the_holders(client: redis.Redis,
                                                                             namespace: str) -> None:
    """A replica that keeps idle connections learns from its reaper that another waits for a
    place: it closes them instead of holding the cap for the idle timeout (sender/pool.py)."""
    keys = server_keys(namespace, "s")

    def open_(conn: str) -> bool:
        return bool(int(LIBRARY.call(client, "pb_conn_open", keys, [2, conn, 60 * US])[0]))

    def wanted() -> bool:
        return bool(int(LIBRARY.call(client, "pb_conn_wanted", keys, [])))

    assert [open_("a/1"), open_("a/2"), wanted()] == [True, True, False]  # nobody waits yet
    assert not open_("b/1")
    assert wanted()
    assert open_("a/1")  # a renewal is no refusal
    client.hset(keys[0], "wanted_until", 0)  # the wait is over (it lapses 2 s after the last refusal)
    assert not wanted()
