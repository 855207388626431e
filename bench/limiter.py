"""Benchmark of the limiter's decision (decide.lua) against a real Redis; prints JSON.

    .venv/bin/python bench/limiter.py [--seconds 5] [--accuracy-s 60] [--redis-url URL]

- ``decisions_per_s``: release decisions per second (one script call each, a batch of 2 mails
  of one tenant) from 1 and from 4 processes hammering one server's keys, asked as the stage
  asks: up to ``ROUND_PER_LINE`` (32) due batches per round trip; ``one_per_round_trip``: the
  same from one process when every round holds a single batch (a quiet limiter).
- ``accuracy``: 4 processes, each a limiter that asks for 1-3 mails and asks again when told,
  one server at 3,600/h with bursts of 10: the most mails released in any sliding 1 s, 10 s
  and 60 s (bound: rate x interval + burst), and released / (rate x duration) (want >= 0.95).
- ``fair_share``: decisions per second from one process with 1, 100 and 1,000 tenants waiting on
  one server at 36,000/h (burst 20) (each with mail in its lane), each decision an ``Ask`` with
  ``fair=Fair(tenant, weight)``, in rounds of ``ROUND_PER_LINE`` asks per round trip, the tenants
  taken in turn. Most are refusals (not the tenant's turn, or no token): every decision counts.
  Checked: 1,000 tenants reach 15,000 decisions/s, and the fall from 1 to 1,000 tenants is no
  worse than logarithmic: ``rate_1 / rate_1000 <= 1 + log2(1000) / 4`` (printed as booleans).

Uses its own namespace (``bench-<uuid>``) and deletes its keys after.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any, cast

# Run as a script, this file's folder comes first on sys.path and this file, named like the
# package it measures, would shadow it: drop that folder before importing the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from limiter.decide import Fair, TenantAsk  # noqa: E402 (after the sys.path fix)
from limiter.gcra import US, Limits, local_midnights, worst_window  # noqa: E402
from limiter.redis_limiter import Ask, RedisLimiter, connect  # noqa: E402
from limiter.stage import ROUND_PER_LINE  # noqa: E402
from mailpipe.lanes import LIBRARY as LANES  # noqa: E402
from mailpipe.lanes import lane_id, server_keys  # noqa: E402

FAIR_TENANTS = (1, 100, 1000)
FAIR_TARGET_AT_1000 = 15_000


def _hammer(url: str, namespace: str, seconds: float, per_round: int, start_at: float, out: Any) -> None:
    client = connect(url)
    limiter = RedisLimiter(client, namespace)
    # Rate and burst high enough that every decision is a grant: the whole script runs.
    limits = Limits.for_server(10**12, 10**9)
    tenants = [TenantAsk("bench", 2, 10**15, local_midnights("UTC", time.time()))]
    while time.time() < start_at:
        time.sleep(0.001)
    count, granted, end = 0, 0, time.monotonic() + seconds
    while time.monotonic() < end:
        asks = [Ask("hammer", uuid.uuid4().hex, 2, limits, tenants, line=f"l{i}") for i in range(per_round)]
        granted += sum(1 for d in limiter.decide_many(asks, uuid.uuid4().hex) if d.granted)
        count += per_round
    out.put((count, granted))
    client.close()


def decisions_per_s(url: str, namespace: str, processes: int, seconds: float, per_round: int) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 1.0  # every process starts together, after imports
    procs = [ctx.Process(target=_hammer, args=(url, namespace, seconds, per_round, start_at, out))
             for _ in range(processes)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    total, granted = sum(r[0] for r in results), sum(r[1] for r in results)
    if granted != total:
        sys.exit(f"bench: {total - granted} of {total} decisions were refusals: the limits were not lifted")
    return round(float(total) / seconds, 1)


def _replica(url: str, namespace: str, seconds: float, seed: int, start_at: float, out: Any) -> None:
    client = connect(url)
    limiter = RedisLimiter(client, namespace)
    limits = Limits.for_server(3600, 10)
    rng = random.Random(seed)
    releases: list[tuple[int, int]] = []
    while time.time() < start_at:
        time.sleep(0.001)
    end = time.monotonic() + seconds
    mails = rng.randint(1, 3)
    while time.monotonic() < end:
        d = limiter.decide(Ask("accuracy", uuid.uuid4().hex, mails, limits))
        if d.granted:
            releases.append((d.now_ms, d.granted))
            mails = rng.randint(1, 3)
        else:
            time.sleep(min(d.retry_after_us / US, max(0.0, end - time.monotonic())))
    out.put(releases)
    client.close()


def accuracy(url: str, namespace: str, seconds: float, processes: int = 4) -> dict[str, Any]:
    rate, burst = 3600, 10
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 1.0
    procs = [ctx.Process(target=_replica, args=(url, namespace, seconds, i, start_at, out))
             for i in range(processes)]
    for p in procs:
        p.start()
    releases = [r for _ in procs for r in out.get()]
    for p in procs:
        p.join()
    released = sum(m for _, m in releases)
    worst = {f"{w}s": worst_window(releases, w * 1000) for w in (1, 10, 60)}
    bound = {f"{w}s": rate * w / 3600 + burst for w in (1, 10, 60)}
    expected = rate * seconds / 3600
    return {
        "processes": processes, "rate_per_hour": rate, "burst": burst, "duration_s": seconds,
        "released": released, "expected_at_rate": expected, "ratio": round(released / expected, 3),
        "ratio_beyond_burst": round((released - burst) / expected, 3),
        "worst_window": worst, "bound": bound,
        "within_bound": all(worst[k] <= bound[k] for k in worst),
        "at_least_95pct": released >= 0.95 * expected,
    }


def fair_decisions_per_s(url: str, namespace: str, tenants: int, seconds: float) -> dict[str, Any]:
    """Decisions per second with ``tenants`` waiting on one rate-limited server (its own, so each
    count starts from an empty fair queue). Every tenant publishes a backlog into its lane before
    the clock starts (far above what the run grants), so all of them are waiting (in
    ``fair:tags``) for the whole run.

    Each ask of a round is its own line: the stage's asks of one line stop at its first
    refusal (``Decision.skipped``, a check that costs next to nothing), and with a single tenant
    every ask of a round would be that one line. Counted here are decisions the script makes,
    the same work whatever the number of tenants; skipped ones are reported (expected: 0)."""
    client = connect(url, timeout_s=10.0)
    limiter = RedisLimiter(client, namespace)
    server = f"fair-{tenants}"
    limits = Limits.for_server(36_000, 20)
    midnights = local_midnights("UTC", time.time())
    names = [f"tenant-{i}" for i in range(tenants)]
    weights = [float(1 + i % 3) for i in range(tenants)]  # 1, 2, 3: the tags are not all alike

    def round_of(first: int) -> list[Ask]:
        asks = []
        for k in range(ROUND_PER_LINE):
            i = (first + k) % tenants
            asks.append(Ask(server, uuid.uuid4().hex, 10, limits, [TenantAsk(names[i], 10, 10**9, midnights)],
                            Fair(names[i], weights[i]), line=f"line-{k}"))
        return asks

    for first in range(0, tenants, 100):  # every tenant waiting before the clock starts
        lanes = [x for name in names[first:first + 100] for x in (lane_id(name, "normal"), 10**6)]
        LANES.call(client, "lane_exit", server_keys(namespace, server), [server, "bench", *lanes])
    cursor = 0
    count = granted = skipped = 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        for d in limiter.decide_many(round_of(cursor), uuid.uuid4().hex):
            count += 1
            granted += d.granted > 0
            skipped += d.skipped
        cursor += ROUND_PER_LINE
    elapsed = time.monotonic() - start
    waiting = cast(int, client.zcard(f"{{{namespace}:{server}}}:fair:tags"))
    client.close()
    return {"decisions_per_s": round((count - skipped) / elapsed, 1), "decisions": count - skipped,
            "granted": granted, "skipped": skipped, "waiting_at_end": waiting}


def fair_share(url: str, namespace: str, seconds: float) -> dict[str, Any]:
    runs = {n: fair_decisions_per_s(url, namespace, n, seconds) for n in FAIR_TENANTS}
    rate_1, rate_1000 = runs[1]["decisions_per_s"], runs[1000]["decisions_per_s"]
    ratio = rate_1 / rate_1000 if rate_1000 else math.inf
    # Logarithmic: each doubling of the tenants waiting may add at most a quarter of the
    # one-tenant time per decision (the script's sorted-set steps are O(log n)); a step that
    # walked every waiting tenant would cost 1,000 times as much at 1,000.
    log_bound = 1 + math.log2(1000) / 4
    return {
        **{f"tenants_{n}": runs[n]["decisions_per_s"] for n in FAIR_TENANTS},
        "runs": {str(n): runs[n] for n in FAIR_TENANTS},
        "ratio_1000_vs_1": round(ratio, 3),
        "ratio_bound_log": round(log_bound, 3),
        "no_worse_than_log": ratio <= log_bound,
        "target_at_1000": FAIR_TARGET_AT_1000,
        "at_least_target_at_1000": rate_1000 >= FAIR_TARGET_AT_1000,
        "all_waiting": all(runs[n]["waiting_at_end"] == n for n in FAIR_TENANTS),
    }


def delete_keys(url: str, namespace: str) -> None:
    """Every key of the bench's namespace, in pipelined batches: the refusals of the fair-share
    runs leave one short-lived key each (their round's line), a few hundred thousand."""
    client = connect(url, timeout_s=30.0)
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"*{namespace}*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            client.unlink(*batch)
            batch.clear()
    if batch:
        client.unlink(*batch)
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    parser.add_argument("--accuracy-s", type=float, default=60.0, help="length of the accuracy run")
    parser.add_argument("--redis-url",
                        default=os.environ.get("MAILPIPE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    namespace = f"bench-{uuid.uuid4().hex[:10]}"
    try:
        result = {
            "decisions_per_s": {str(n): decisions_per_s(args.redis_url, namespace, n, args.seconds,
                                                         ROUND_PER_LINE) for n in (1, 4)},
            "one_per_round_trip_decisions_per_s": decisions_per_s(args.redis_url, namespace, 1,
                                                                  args.seconds, 1),
            "target_decisions_per_s": 20_000,
            "accuracy": accuracy(args.redis_url, namespace, args.accuracy_s),
            "fair_share": fair_share(args.redis_url, namespace, args.seconds),
        }
    finally:
        delete_keys(args.redis_url, namespace)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
