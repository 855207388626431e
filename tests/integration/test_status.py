"""`mailpipe status --json` against real RabbitMQ and Redis: queues, limits, dead letters and
each server's fair share between its tenants."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from limiter.redis_limiter import server_prefix
from mailpipe.amqp import Broker, Outgoing
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from tests.stages import settings_env

pytestmark = pytest.mark.integration


def test_status_shows_queues_limits_and_dead_letters_by_reason(settings: Settings) -> None:
    Path(settings.servers_file).write_text(
        '[servers.own]\naddress = "[127.0.0.1]:2525"\nrate_per_hour = 6000\n'
        '[tenants.acme]\nserver = "own"\ndaily_limit = 500\n', encoding="utf-8")
    topology = Topology.from_settings(settings)
    broker = Broker(settings.amqp_url, client_name="test").connect()
    topology.declare(broker.channel())
    broker.publish([Outgoing(topology.batches, b"waiting"),
                    *(Outgoing(topology.dead, b"x", headers={"x-mailpipe-category": c})
                      for c in ("invalid", "invalid", "spam_rejected"))])
    broker.close()

    done = subprocess.run([sys.executable, "-m", "mailpipe", "status", "--json"], env=settings_env(settings),
                          capture_output=True, text=True, timeout=60, check=True)
    status = json.loads(done.stdout)
    assert status["queues"][topology.batches] == 1
    assert status["dead_by_reason"] == {"invalid": 2, "spam_rejected": 1}
    rows = json.dumps(status["limits"])
    assert "6000" in rows and "500" in rows, rows


# -- fair share: the keys lanes_common.lua documents per server, written here as it says ---

FAIR_SERVERS = ('[servers.own]\naddress = "[127.0.0.1]:2525"\nrate_per_hour = 6000\n'
                '[tenants.acme]\nserver = "own"\nweight = 3\n'
                '[tenants.beta]\nserver = "own"\n'
                '[tenants.gamma]\nserver = "own"\nweight = 0.5\n'
                '[tenants.idle]\nserver = "own"\n')


def redis_now(client: redis.Redis) -> tuple[int, int]:
    """Redis TIME (whole seconds, and microseconds since the epoch): the clock the status reads."""
    reply: Any = client.time()
    seconds, micros = int(reply[0]), int(reply[1])
    return seconds, seconds * 1_000_000 + micros


def g17(value: float) -> str:
    """A float as the Lua functions write it (%.17g)."""
    return f"{value:.17g}"


def count_releases(client: redis.Redis, key: str, at_s: int, mails: int) -> None:
    """One 10 s bucket of a released ring: b<slot> = bucket number, c<slot> = mails."""
    bucket = at_s // 10
    client.hset(key, mapping={f"b{bucket % 361}": bucket, f"c{bucket % 361}": mails})


def share_rows_of(settings: Settings) -> dict[str, dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "mailpipe", "status", "--json"], env=settings_env(settings),
                          capture_output=True, text=True, timeout=60, check=True)
    rows = [r for r in json.loads(done.stdout)["limits"] if r.get("kind") == "share"]
    assert all(r["server"] == "own" for r in rows), rows
    return {r["tenant"]: r for r in rows}


def test_status_shows_each_tenants_turn_backlog_weight_and_share_of_the_server(settings: Settings) -> None:
    Path(settings.servers_file).write_text(FAIR_SERVERS, encoding="utf-8")
    p = server_prefix(settings.namespace, "own")
    client = redis.Redis.from_url(settings.redis_url)
    try:
        seconds, _ = redis_now(client)
        half_hour_ago = seconds - 1800
        # The server released 40 mails this minute (acme 30, beta 10) and 60 half an hour ago
        # (acme 20, gamma 40): shares 0.75 / 0.25 / 0 over the minute, 0.5 / 0.1 / 0.4 over the hour.
        count_releases(client, f"{p}:released", seconds, 40)
        count_releases(client, f"{p}:released", half_hour_ago, 60)
        count_releases(client, f"{p}:released:acme", seconds, 30)
        count_releases(client, f"{p}:released:acme", half_hour_ago, 20)
        count_releases(client, f"{p}:released:beta", seconds, 10)
        count_releases(client, f"{p}:released:gamma", half_hour_ago, 40)
        client.hset(f"{p}:fair", mapping={"v": g17(1234.5), "f:acme": g17(1300.25), "f:beta": g17(1240.0)})
        # acme: 250 mails in its lane, 50 held by a limiter; beta: 100 in its high lane.
        client.hset(f"{p}:lanes", mapping={"m:n:acme": 250, "hmt:n:acme": 50, "m:h:beta": 100})
        # beta's start tag is the lower: beta goes next, although acme weighs more.
        client.zadd(f"{p}:fair:tags", {"acme": 1250.75, "beta": 1234.5})
    finally:
        client.close()

    rows = share_rows_of(settings)

    assert set(rows) == {"acme", "beta", "gamma"}, "idle neither waits nor released: not listed"
    acme, beta, gamma = rows["acme"], rows["beta"], rows["gamma"]
    assert (beta["waiting"], beta["turn"], beta["backlog"], beta["weight"]) == (True, 1, 100, 1.0)
    assert beta["backlog_high"] == 100 and acme["backlog_high"] == 0
    assert (acme["waiting"], acme["turn"], acme["backlog"], acme["weight"]) == (True, 2, 300, 3.0)
    assert (gamma["waiting"], gamma["turn"], gamma["backlog"], gamma["weight"]) == (False, None, 0, 0.5)
    assert (acme["share_last_minute"], acme["share_last_hour"]) == (0.75, 0.5)
    assert (beta["share_last_minute"], beta["share_last_hour"]) == (0.25, pytest.approx(0.1))
    assert (gamma["share_last_minute"], gamma["share_last_hour"]) == (0.0, 0.4)
    assert (acme["released_last_minute"], acme["released_last_hour"]) == (30, 50)


def test_status_shows_a_tenant_held_off_with_its_whole_backlog(settings: Settings) -> None:
    """A tenant capped for today waits in its lane, holding no turn: listed with its backlog and
    until when; the others wait in turn."""
    Path(settings.servers_file).write_text(FAIR_SERVERS, encoding="utf-8")
    p = server_prefix(settings.namespace, "own")
    client = redis.Redis.from_url(settings.redis_url)
    try:
        seconds, now_us = redis_now(client)
        client.hset(f"{p}:fair", mapping={"v": g17(10.0), "f:acme": g17(11.0), "f:beta": g17(12.0)})
        client.hset(f"{p}:lanes", mapping={"m:n:acme": 50000, "m:n:beta": 20})
        client.zadd(f"{p}:fair:tags", {"beta": 11.0})
        client.zadd(f"{p}:fair:off", {"acme": now_us + 3_600_000_000})
    finally:
        client.close()

    rows = share_rows_of(settings)

    assert set(rows) == {"acme", "beta"}
    assert (rows["acme"]["waiting"], rows["acme"]["turn"], rows["acme"]["backlog"]) == (False, None, 50000)
    assert rows["acme"]["held_off_until"] in (seconds + 3599, seconds + 3600)
    assert (rows["beta"]["waiting"], rows["beta"]["turn"], rows["beta"]["backlog"]) == (True, 1, 20)
    # Nothing was released on the server: no share to speak of, rather than 0 of 0.
    assert rows["beta"]["share_last_minute"] is None and rows["beta"]["share_last_hour"] is None
