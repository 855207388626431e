"""The pipeline's mails per second on a three-node RabbitMQ cluster with Redis Sentinel, beside
the single node, in the same run.

    python bench/cluster.py [--mails 10000] [--rounds 3]   (prints one JSON object)

- ``single``: the four stages (one process each) on this machine's RabbitMQ (5672) and Redis
  (6379), as ``bench/pipeline.py`` measures them;
- ``cluster``: the same stages on a ``LocalCluster`` on free loopback ports (three RabbitMQ
  nodes, quorum queues with an initial group of 3, so a confirm means two nodes hold the
  message; a Redis primary with two replicas behind three Sentinels; ``WAIT 1`` after every
  grant, claim and sent mark), the stages given every node's URL, node 0 first.

N mails of 2 KB each, limits lifted (an unlimited server: the rate limiter does not bind), to
Postfix's smtp-sink on a free port, from the first publish to the last 250. The two setups take
turns ``--rounds`` times (the machine's load changes under a benchmark, and alternating spreads
that over both); the median run of each counts (of an even number, the slower middle one).
``ratio`` is cluster / single.

On one machine the three nodes share its cores with the stages: the figure is what the
replication costs in CPU here, not what three hosts would do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline import per_mail_us, services_and_sink

from mailpipe.demo import run_pipeline
from mailpipe.devcluster import LocalCluster, free_ports, missing_binaries
from mailpipe.settings import Settings

SIZE = 2048


@contextlib.contextmanager
def environment(extra: Mapping[str, str]) -> Iterator[None]:
    """``extra`` in os.environ for the block: run_pipeline hands its stages os.environ (only
    the namespace, servers file, URLs and linger are its own), so that is how they learn the
    cluster's URLs, Sentinels, group size and WAIT."""
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def one_run(settings: Settings, mails: int, port: int, out: Any) -> dict[str, Any]:
    summary, codes, progress = run_pipeline(settings, mails, SIZE, None, smtp_port=port, out=out)
    # A run that did not deliver everything, or whose stages did not stop cleanly, is no figure.
    if progress.done != mails or progress.failed or any(code != 0 for code in codes.values()):
        sys.exit(f"bench: a run did not complete: sent {len(progress.sent)}/{mails}, failed "
                 f"{len(progress.failed)}, exit codes {codes}")
    return {"mails_per_s": summary["mails_per_s"], "seconds": summary["seconds"],
            "p50_ms": summary["p50_ms"], "p99_ms": summary["p99_ms"],
            "cpu_us_per_mail": per_mail_us(summary, summary["sent"] or 1)}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: float(r["mails_per_s"]))
    return ordered[(len(ordered) - 1) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mails", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setup, taking turns")
    args = parser.parse_args()
    if missing := missing_binaries():
        sys.exit(f"bench: the local cluster needs {', '.join(missing)}")
    single_settings = Settings.from_env()
    quiet = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the run)
    runs: dict[str, list[dict[str, Any]]] = {"single": [], "cluster": []}
    with services_and_sink(single_settings) as port, tempfile.TemporaryDirectory(prefix="mailpipe-bench-") as tmp:
        ports = free_ports(12)
        cluster = LocalCluster(Path(tmp) / "cluster", rabbit_ports=ports[0:3], dist_ports=ports[3:6],
                               redis_ports=ports[6:9], sentinel_ports=ports[9:12])
        started = time.monotonic()
        try:
            cluster.up()
            up_s = time.monotonic() - started
            env = cluster.env()
            for _ in range(args.rounds):
                runs["single"].append(one_run(single_settings, args.mails, port, quiet))
                with environment(env):
                    runs["cluster"].append(one_run(Settings.from_env(), args.mails, port, quiet))
        finally:
            cluster.down()
    single, clustered = median_run(runs["single"]), median_run(runs["cluster"])
    print(json.dumps({
        "mails": args.mails, "size_bytes": SIZE, "rounds": args.rounds,
        "single_mails_per_s": single["mails_per_s"], "cluster_mails_per_s": clustered["mails_per_s"],
        "ratio": round(clustered["mails_per_s"] / single["mails_per_s"], 3),
        "single": single, "cluster": clustered,
        "single_runs_mails_per_s": [r["mails_per_s"] for r in runs["single"]],
        "cluster_runs_mails_per_s": [r["mails_per_s"] for r in runs["cluster"]],
        "cluster_setup": {"rabbitmq_nodes": len(cluster.rabbit_ports),
                          "quorum_group_size": int(env["MAILPIPE_QUORUM_GROUP_SIZE"]),
                          "redis": len(cluster.redis_ports), "sentinels": len(cluster.sentinel_ports),
                          "redis_wait_replicas": int(env["MAILPIPE_REDIS_WAIT_REPLICAS"]),
                          "up_s": round(up_s, 1)},
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
