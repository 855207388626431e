"""The pipeline bench's publishing process: the client library (``producer.Producer``) publishing
N mails of SIZE bytes, as an upstream service would, in a process of its own so that its CPU is
counted exactly.

    python bench/publisher.py --namespace NS --mails 20000 --size 2048 [--chunk 200]

Connects, prints ``ready``, waits for a line on stdin, publishes (``publish_requests`` in chunks
of ``--chunk``, one confirm round trip per chunk: what ``mailpipe demo`` does), then prints one
JSON object: mails published, seconds, and the CPU seconds (user + system, every thread; and
the system part) from the go to the last confirm. Settings (the AMQP URL) from the environment.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from mailpipe.demo import make_requests
from mailpipe.settings import Settings
from producer import Producer


def cpu_s() -> tuple[float, float]:
    """(user + system, system) CPU seconds of this process, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--mails", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=200)
    args = parser.parse_args()
    settings = Settings.from_env()
    with Producer(settings.amqp_endpoints, args.namespace,
                  large_message_bytes=settings.large_message_bytes) as producer:
        producer.publish_requests([])  # connects: not part of what a mail costs
        print("ready", flush=True)
        sys.stdin.readline()
        started, (cpu0, sys0) = time.monotonic(), cpu_s()
        published = 0
        while published < args.mails:
            count = min(args.chunk, args.mails - published)
            producer.publish_requests(make_requests(published, count, args.size))
            published += count
        seconds, (cpu, kernel) = time.monotonic() - started, cpu_s()
    print(json.dumps({"published": published, "seconds": round(seconds, 3), "cpu_s": round(cpu - cpu0, 3),
                      "system_cpu_s": round(kernel - sys0, 3)}), flush=True)


if __name__ == "__main__":
    main()
