"""What lanes cost RabbitMQ: 1,000 queues, one per (server, tenant), quorum and classic. Prints JSON.

    python bench/lane_cost.py [--queues 1000]

For each queue type: declare the queues (as a lane's first publisher does) with one 2 KB message
each, then measure on the broker's process (beam.smp, from /proc): CPU and wall time to declare,
memory (RSS) they add, CPU they use a second while idle (measured over 30 s), and the time to
delete them (as an idle lane is deleted). The broker must run on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pika

IDLE_S = 30.0


def beam() -> tuple[float, float]:
    """(CPU seconds, RSS MB) of the local broker's Erlang VM."""
    pid = subprocess.check_output(["pgrep", "-f", "beam.smp"]).split()[0].decode()
    proc = Path("/proc") / pid
    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int((proc / "status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    return cpu, rss


def measure(url: str, kind: str, count: int) -> dict[str, Any]:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    prefix = f"bench-lanes-{uuid.uuid4().hex[:6]}"
    names = [f"{prefix}.lane.s.t{i}" for i in range(count)]
    time.sleep(5)
    idle_before, _ = beam()
    time.sleep(IDLE_S / 3)
    idle_base = (beam()[0] - idle_before) / (IDLE_S / 3)
    cpu0, rss0 = beam()
    t0 = time.monotonic()
    for name in names:
        channel.queue_declare(name, durable=True, arguments={"x-queue-type": kind})
        channel.basic_publish("", name, b"x" * 2048, pika.BasicProperties(delivery_mode=2))
    declare_s = time.monotonic() - t0
    cpu1, _ = beam()
    time.sleep(5)
    cpu2, _ = beam()
    time.sleep(IDLE_S)
    cpu3, rss3 = beam()
    t0 = time.monotonic()
    for name in names:
        channel.queue_delete(name)
    delete_s = time.monotonic() - t0
    conn.close()
    idle = (cpu3 - cpu2) / IDLE_S
    return {
        "queues": count, "declare_ms_each": round(1000 * declare_s / count, 2),
        "broker_cpu_ms_each_to_declare": round(1000 * (cpu1 - cpu0) / count, 2),
        "rss_mb_added": round(rss3 - rss0, 1), "rss_kb_each": round(1024 * (rss3 - rss0) / count, 1),
        "idle_cpu_share_of_a_core": round(idle, 4), "idle_cpu_share_before": round(idle_base, 4),
        "delete_ms_each": round(1000 * delete_s / count, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queues", type=int, default=1000)
    parser.add_argument("--amqp-url", default=os.environ.get("MAILPIPE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    args = parser.parse_args()
    print(json.dumps({kind: measure(args.amqp_url, kind, args.queues) for kind in ("quorum", "classic")}, indent=2))


if __name__ == "__main__":
    main()
