"""Sender benchmark: SMTP throughput to a local sink, and a full batch's delivery time.

    .venv/bin/python bench/sender.py [--mails 2000]

Prints one JSON object: mails per second with 1, 4 and 16 connections (small mails), and the
seconds to deliver one 80 MB batch (500 mails of 160 KB) with the default 4 connections.
The sink is the demo's local aiosmtpd server (``mailpipe.sink``), in this process: its
Python SMTP parsing shares the machine's CPUs with the sender, so these are lower bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and this very file would shadow
# the ``sender`` package: drop the folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from mailpipe.model import Job, new_id, now_ms  # noqa: E402 (after the sys.path fix)
from mailpipe.servers import ServerConfig, parse_config  # noqa: E402 (after the sys.path fix)
from mailpipe.sink import LocalSink  # noqa: E402 (after the sys.path fix)
from sender.delivery import deliver  # noqa: E402 (after the sys.path fix)
from sender.pool import ServerPool  # noqa: E402 (after the sys.path fix)


def jobs(n: int, size: int) -> list[Job]:
    line = b"x" * 76 + b"\r\n"
    message = b"From: bench@example.com\r\nSubject: bench\r\n\r\n" + line * max(1, size // len(line))
    return [Job(id=new_id(), tenant="bench", server="sink", sender="bench@example.com",
                recipients=(f"user{i}@example.com",), message=message, created_ms=now_ms())
            for i in range(n)]


async def timed(batch: list[Job], server: ServerConfig, connections: int) -> float:
    pool = ServerPool(server, size=connections, timeout_s=60, idle_timeout_s=60)
    try:
        started = time.monotonic()
        result = await deliver(batch, server, pool, time.monotonic() + 3600, hold=None)
        elapsed = time.monotonic() - started
    finally:
        await pool.close()
    sent = sum(len(o.sent) for o in result.outcomes)
    if sent != len(batch):
        raise SystemExit(f"only {sent} of {len(batch)} mails were accepted")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mails", type=int, default=2000, help="small mails per throughput run")
    parser.add_argument("--size", type=int, default=2048, help="bytes per small mail")
    args = parser.parse_args()
    out: dict[str, object] = {"mails": args.mails, "mail_bytes": args.size}
    with LocalSink() as sink:
        server = parse_config({"servers": {"sink": {"address": f"[127.0.0.1]:{sink.port}", "tls": "none"}}},
                              "bench", {}).servers["sink"]
        server = replace(server, max_mails_per_connection=1_000_000)
        for connections in (1, 4, 16):
            elapsed = asyncio.run(timed(jobs(args.mails, args.size), server, connections))
            out[f"mails_per_s_{connections}_connections"] = round(args.mails / elapsed, 1)
        batch = jobs(500, 160 * 1024)
        out["batch_80mb_mails"] = len(batch)
        out["batch_80mb_bytes"] = sum(j.size for j in batch)
        out["batch_80mb_seconds_4_connections"] = round(asyncio.run(timed(batch, server, 4)), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
