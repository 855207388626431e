"""Benchmark of the limiter's decision (gcra.lua) against a real Redis; prints JSON.

    .venv/bin/python bench/limiter.py [--seconds 5] [--accuracy-s 60] [--redis-url URL]

- ``decisions_per_s``: release decisions per second (one script call each, a batch of 2 mails
  of one tenant) from 1 and from 4 processes hammering one server's keys, asked as the stage
  asks: up to ``ROUND_PER_LINE`` (32) due batches per round trip; ``one_per_round_trip``: the
  same from one process when every round holds a single batch (a quiet limiter).
- ``accuracy``: 4 processes, each a limiter that asks for 1-3 mails and asks again when told,
  one server at 3,600/h with bursts of 10: the most mails released in any sliding 1 s, 10 s
  and 60 s (bound: rate x interval + burst), and released / (rate x duration) (want >= 0.95).

Uses its own namespace (``bench-<uuid>``) and deletes its keys after.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path and this file, named like the
# package it measures, would shadow it: drop that folder before importing the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from limiter.gcra import (  # noqa: E402 (after the sys.path fix)
    US,
    Ask,
    Limits,
    RedisLimiter,
    TenantAsk,
    connect,
    local_midnights,
    worst_window,
)
from limiter.stage import ROUND_PER_LINE  # noqa: E402


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
        asks = [Ask("hammer", uuid.uuid4().hex, 2, limits, tenants=tenants) for _ in range(per_round)]
        granted += sum(1 for d in limiter.acquire_many(asks) if d.granted)
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
    return round(total / seconds, 1)


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
        d = limiter.acquire("accuracy", uuid.uuid4().hex, mails, limits)
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
        }
    finally:
        client = connect(args.redis_url)
        for key in client.scan_iter(match=f"{{{namespace}:*", count=1000):
            client.delete(key)
        client.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
