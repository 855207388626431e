"""Inbound benchmark: reports a second through the inbound stage (issue 23).

    .venv/bin/python bench/inbound.py [--reports 3000] [--connections 16] [--replicas 1 2]

Runs `mailpipe run inbound` as processes (1, then 2 replicas sharing the SMTP port, as
replicas behind one Service) against the local RabbitMQ and Redis (a namespace of its own per
run, deleted after), and delivers N DSNs (Postfix's format, each for its own recipient and
with its own signed return path) over C concurrent SMTP connections, as remote servers would.
Prints one JSON object: for each replica count, reports a second accepted (each 250 only once
RabbitMQ confirmed it) and reports a second read, classified and applied end to end (until
the last ``bounced`` event was published), and the stage's CPU per report; the target is at
least 500 a second on this machine (two cores, shared with RabbitMQ and Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import fields
from pathlib import Path

import aiosmtplib
import pika
import redis

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from mailpipe.services import ensure  # noqa: E402 (after the sys.path fix)
from mailpipe.settings import Settings  # noqa: E402
from mailpipe.sink import free_port  # noqa: E402
from mailpipe.topology import Topology  # noqa: E402
from mailpipe.verp import Keys, Signer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "reports"
CORPUS_RP = "bbeae7tmcfmz23rms6fpigp2vr6z6w62kkmhcdnjg76wfzgb3v5uwfpbme4"
KEYS = "1:the inbound benchmark's key"
DOMAIN = "bounces.bench.test"
JOB = "c592f15e833f558fb3eb7b4a530e21b5"


def reports(n: int) -> list[tuple[str, bytes]]:
    signer = Signer(Keys.parse(KEYS, "bench"))
    template = (CORPUS / "dsn-postfix-00.eml").read_bytes().decode()
    out = []
    for i in range(n):
        recipient = f"r{i}@example.net"
        local = signer.local_part("b", "acme", JOB, recipient)
        out.append((f"{local}@{DOMAIN}",
                    template.replace("user0@example.net", recipient).replace(CORPUS_RP, local).encode()))
    return out


async def deliver(port: int, items: list[tuple[str, bytes]], connections: int) -> float:
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)

    async def client() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60)
        await smtp.connect()
        try:
            while not queue.empty():
                rcpt, data = queue.get_nowait()
                await smtp.sendmail("", [rcpt], data)
        finally:
            await smtp.quit()

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(connections)))
    return time.monotonic() - started


async def _probe(port: int) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=2)
    await smtp.connect()
    await smtp.quit()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reports", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    ensure(Settings(), say=False)
    runs = {f"replicas_{n}": run(args.reports, args.connections, n) for n in args.replicas}
    best = max(r["applied_per_s"] for r in runs.values())
    print(json.dumps({"reports": args.reports, "connections": args.connections, **runs,
                      "best_applied_per_s": best, "target_per_s": 500, "meets_target": best >= 500}))
    return 0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(reports_n: int, connections: int, replicas: int) -> dict[str, float]:
    namespace = f"bench-inbound-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="mailpipe-bench-inbound-"))
    servers = workdir / "servers.toml"
    servers.write_text('[servers.platform]\naddress = "[127.0.0.1]:2"\nplatform = true\n\n[tenants.acme]\n',
                       encoding="utf-8")
    settings = Settings(namespace=namespace, servers_file=str(servers), verp_keys=KEYS, return_path_domain=DOMAIN,
                        inbound_smtp_host="127.0.0.1", inbound_smtp_port=free_port(),
                        inbound_http_port=free_port())
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update({f"MAILPIPE_{f.name.upper()}": str(getattr(settings, f.name)) for f in fields(settings)})
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    topology = Topology.from_settings(settings)
    topology.declare(channel)
    counted = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(counted, topology.events, routing_key="bounced.*")
    items = reports(reports_n)
    log = (workdir / "inbound.log").open("wb")
    stages = [subprocess.Popen([sys.executable, "-m", "mailpipe", "run", "inbound"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, cwd=ROOT) for _ in range(replicas)]
    stage = stages[0]
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                asyncio.run(_probe(settings.inbound_smtp_port))
                break
            except (OSError, aiosmtplib.SMTPException):
                if time.monotonic() > deadline or stage.poll() is not None:
                    raise SystemExit(f"the inbound stage did not start: see {workdir / 'inbound.log'}") from None
                time.sleep(0.1)
        time.sleep(1.0)  # every replica up (each imports, connects and binds)
        cpu_before = sum(cpu_s(s.pid) for s in stages)
        started = time.monotonic()
        accept_s = asyncio.run(deliver(settings.inbound_smtp_port, items, connections))
        while channel.queue_declare(counted, passive=True).method.message_count < reports_n:
            if time.monotonic() - started > 300:
                raise SystemExit("not every report was applied within 300 s")
            time.sleep(0.02)
        applied_s = time.monotonic() - started
        cpu = sum(cpu_s(s.pid) for s in stages) - cpu_before
        return {"accepted_per_s": round(reports_n / accept_s, 1), "applied_per_s": round(reports_n / applied_s, 1),
                "applied_seconds": round(applied_s, 2), "stage_cpu_ms_per_report": round(cpu * 1000 / reports_n, 2)}
    finally:
        for process in stages:
            process.terminate()
        for process in stages:
            process.wait(60)
        log.close()
        for queue in (*topology.all_queues, *topology.streams):
            channel.queue_delete(queue)
        channel.exchange_delete(topology.events)
        conn.close()
        client = redis.Redis.from_url(settings.redis_url)
        for key in client.scan_iter(match=f"{namespace}:*", count=1000):
            client.delete(key)
        client.close()


if __name__ == "__main__":
    sys.exit(main())
