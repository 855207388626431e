"""The whole pipeline's throughput, latency and cost, to Postfix's smtp-sink on this machine.

    python bench/pipeline.py [--mails 20000]   (make bench runs it; prints one JSON object)

- throughput: N mails of 2 KB through all four stages as separate processes, limits lifted,
  from the first publish to the last 250, beside the raw aiosmtplib-to-smtp-sink figure of
  the same run (8 connections) and their ratio;
- latency: p50/p99 enqueue-to-250 at half that load, published evenly;
- the seed's batch: 500 mails of 160 KB (80 MB) as one batch, packed, granted and delivered,
  in seconds (the median of three runs);
- CPU per mail per stage (user + system microseconds, each process's whole life, start-up
  included: ``cpu_us_per_mail``) and peak RSS per stage;
- the whole system's CPU per delivered mail over the full-load run (issue 24:
  ``system_cpu_us_per_mail``): user + system CPU from /proc between the first publish and the
  last 250's event, of each stage process, of the machine's RabbitMQ (the processes listening
  on the AMQP port, and their children) and Redis (the one on the Redis URL's port), and of
  the publishing process: the client library publishing the N mails, in a process of its own
  (bench/publisher.py). RabbitMQ and Redis also serve whoever else uses this machine: run it
  when the machine is quiet. Their rate while the pipeline idles just before the run is given
  (``background_cpu_us_per_mail``: others' load and our idle stages' polling), and the load
  average before and after. The bench's own process (it follows the events) is given apart,
  not counted: it stands for the subscribers;
- a Postfix relay's figure of the same run (bench/postfix_relay.py: a private Postfix 3.x
  instance relaying the same number of mails of the same size into the same smtp-sink, 8
  connections in and out) and the pipeline's ratio to it;
- ``bench/out/pipeline_throughput.png``: mails per second per stage over the full-load run,
  from each stage's /metrics, sampled every half second; ``bench/out/pipeline_cpu.png``: where
  the CPU per mail goes, per process (with ``--compare OLD.json``, beside an earlier run).

Another tree (an older commit, say, to compare): ``PYTHONPATH=TREE python TREE/bench/pipeline.py``;
every process of the run imports mailpipe from TREE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiosmtplib
from charts import cpu_png, throughput_png
from postfix_relay import relay_rate
from system_cpu import cpu_s, listening_pids, sys_s

from mailpipe import stages
from mailpipe.amqp import Broker
from mailpipe.codec import decode_events
from mailpipe.demo import (
    DEMO_LINGER_MS,
    Sampler,
    delete_namespace,
    run_pipeline,
    stage_env,
    stage_usage,
    wait_for_consumers,
    write_servers_file,
)
from mailpipe.feedback import is_feedback
from mailpipe.model import Outcome
from mailpipe.services import ensure
from mailpipe.settings import Settings
from mailpipe.sink import free_port
from mailpipe.topology import Topology

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def services_and_sink(settings: Settings) -> Iterator[int]:
    """RabbitMQ and Redis checked (started if installed and stopped), and smtp-sink on a free
    loopback port for the block: yields the port."""
    problems = ensure(settings, say=False)
    if problems:
        sys.exit(f"bench: {'; '.join(problems)}")
    port = free_port()
    sink = subprocess.Popen([smtp_sink(), "-u", "nobody", f"127.0.0.1:{port}", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # listening
        yield port
    finally:
        sink.terminate()
        sink.wait()


def smtp_sink() -> str:
    found = shutil.which("smtp-sink") or shutil.which("smtp-sink", path="/usr/sbin")
    if found is None:
        subprocess.run([str(ROOT / "scripts" / "install-tools"), "postfix"], check=True)
        found = shutil.which("smtp-sink", path="/usr/sbin")
    if found is None:
        sys.exit("bench: smtp-sink (Debian package postfix) is not available")
    return found


async def raw_rate(port: int, mails: int, connections: int, size: int) -> float:
    message = b"Subject: raw\r\n\r\n" + b"x" * size + b"\r\n"

    async def worker(n: int) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
        await client.connect()
        for _ in range(n):
            await client.sendmail("bench@example.com", ["sink@example.com"], message)
        await client.quit()

    started = time.perf_counter()
    await asyncio.gather(*(worker(mails // connections) for _ in range(connections)))
    return mails / (time.perf_counter() - started)


def per_mail_us(summary: dict[str, object], mails: int) -> dict[str, float]:
    stages = summary.get("stages", {})
    assert isinstance(stages, dict)
    return {stage: round(u.get("cpu_s", 0.0) / mails * 1e6, 1) for stage, u in stages.items()}


SYSTEM = ("producer", "packer", "limiter", "sender", "rabbitmq", "redis", "publisher")
BACKGROUND_S = 3.0  # how long RabbitMQ and Redis are watched while the pipeline idles
# A context manager the caller wraps the timed part of the run in, given each stage's pid and the
# publisher's (bench/where_time_goes.py profiles them with py-spy there).
Watch = Callable[[dict[str, int]], AbstractContextManager[object]]


def port_of(url: str, default: int) -> int:
    return urlsplit(url).port or default


def service_pids(settings: Settings) -> dict[str, list[int]]:
    """The machine's RabbitMQ and Redis: the processes listening on their URLs' ports."""
    return {"rabbitmq": listening_pids(port_of(settings.amqp_endpoints[0], 5672)),
            "redis": listening_pids(port_of(settings.redis_url, 6379))}


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def full_load(settings: Settings, mails: int, size: int, smtp_port: int, *, sample_every_s: float | None = None,
              extra_env: dict[str, str] | None = None, watch: Watch | None = None,
              timeout_s: float = 600.0) -> dict[str, Any]:
    """N mails of SIZE bytes through the four stages (one process each) into the SMTP server on
    127.0.0.1:``smtp_port``, published by bench/publisher.py in a process of its own, as fast as
    the pipeline takes them. Returns what ``mailpipe.demo.run_pipeline`` does (sent, seconds,
    mails_per_s, p50/p99, stages, samples) and ``system``: the CPU seconds of every process of
    the system between the go and the last event, and the services' background rates."""
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="mailpipe-bench-"))
    topology = Topology.from_settings(settings.replace(namespace=namespace))
    broker = Broker(settings.amqp_endpoints, client_name="mailpipe-bench").connect()
    topology.declare(broker.channel())
    events = broker.channel().queue_declare("", exclusive=True, auto_delete=True).method.queue
    broker.channel().queue_bind(events, topology.events, routing_key="#")
    servers_file = workdir / "servers.toml"
    write_servers_file(servers_file, smtp_port, None, mails)
    linger_ms = settings.linger_ms if "MAILPIPE_LINGER_MS" in os.environ else DEMO_LINGER_MS
    env = {**stage_env(settings, namespace, servers_file, linger_ms), **(extra_env or {})}
    if sample_every_s:
        # A stage's /metrics asks RabbitMQ for every queue's depth on a connection of its own
        # (30-50 ms of the stage's CPU and 20-30 of RabbitMQ's, every 5 s by default): asked once
        # before the timed part, not during it. A scrape then costs the stage about 1 ms.
        env["MAILPIPE_QUEUE_METRICS_CACHE_S"] = "3600"
    ports = {stage: free_port() for stage in stages.MAIL_PATH} if sample_every_s else {}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for stage in stages.MAIL_PATH:
        metrics = ["--metrics-port", str(ports[stage])] if stage in ports else []
        with (workdir / f"{stage}.log").open("wb") as log:
            procs[stage] = subprocess.Popen([sys.executable, "-m", "mailpipe", "run", stage, *metrics],
                                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    publisher = subprocess.Popen([sys.executable, str(Path(__file__).with_name("publisher.py")),
                                  "--namespace", namespace, "--mails", str(mails), "--size", str(size)],
                                 env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert publisher.stdin is not None and publisher.stdout is not None
    services = service_pids(settings)
    sampler = Sampler(procs, ports, sample_every_s) if sample_every_s else None
    sent: dict[str, int] = {}  # job id -> latency ms
    failed: dict[str, str] = {}
    system: dict[str, Any] = {}
    try:
        if publisher.stdout.readline().strip() != "ready":
            raise RuntimeError("bench: the publishing process did not start (see its error above)")
        wait_for_consumers(broker, topology, procs)
        if sampler is not None:
            sampler.sample()  # the queue depths asked for, outside the timed part
        system["load_average_before"] = list(os.getloadavg())
        background = {name: cpu_s(pids) for name, pids in services.items()}
        broker.sleep(BACKGROUND_S)
        background = {name: cpu_s(pids) - background[name] for name, pids in services.items()}
        broker.consume(events, prefetch=1000)
        before = {**{stage: cpu_s([proc.pid]) for stage, proc in procs.items()},
                  **{name: cpu_s(pids) for name, pids in services.items()}, "bench": own_cpu_s()}
        kernel_before = {stage: sys_s([proc.pid]) for stage, proc in procs.items()}
        if sampler is not None:
            sampler.start()
        watched = {**{stage: proc.pid for stage, proc in procs.items()}, "publisher": publisher.pid}
        with (watch or (lambda _pids: nullcontext()))(watched):
            started = time.monotonic()
            publisher.stdin.write("go\n")
            publisher.stdin.flush()
            deadline, last_print = started + timeout_s, started
            while len(sent) + len(failed) < mails:
                deliveries = broker.poll(0.2)
                for delivery in deliveries:
                    if is_feedback(delivery.body):
                        continue
                    for event in decode_events(delivery.body):  # an event, or a batch's bundle
                        if event.outcome == Outcome.SENT:
                            sent[event.job_id] = event.at_ms - event.created_ms
                        elif event.outcome in (Outcome.FAILED, Outcome.EXPIRED):
                            failed[event.job_id] = f"{event.code} {event.text}".strip()
                if deliveries:
                    broker.ack(deliveries[-1].tag, multiple=True)
                now = time.monotonic()
                if now - last_print > 5:
                    last_print = now
                    print(f"bench: sent {len(sent)}/{mails}, {len(sent) / (now - started):,.0f} mails/s",
                          file=sys.stderr)
                dead = [s for s, p in procs.items() if p.poll() is not None]
                if dead or now > deadline:
                    print(f"bench: gave up: {'stage(s) exited: ' + ', '.join(dead) if dead else 'timeout'}",
                          file=sys.stderr)
                    break
            seconds = time.monotonic() - started
            after = {**{stage: cpu_s([proc.pid]) for stage, proc in procs.items()},
                     **{name: cpu_s(pids) for name, pids in services.items()}, "bench": own_cpu_s()}
            kernel = {stage: sys_s([proc.pid]) - kernel_before[stage] for stage, proc in procs.items()}
        system["load_average_after"] = list(os.getloadavg())
        published = json.loads(publisher.stdout.readline() or "{}")
        system.update({
            "window_s": round(seconds, 3),
            "cpu_s": {**{k: round(after[k] - before[k], 3) for k in before}, "publisher": published.get("cpu_s")},
            # of cpu_s: in the kernel
            "stage_system_cpu_s": {**{k: round(v, 3) for k, v in kernel.items()},
                                   "publisher": published.get("system_cpu_s")},
            "background_cpu_s": {k: round(v, 3) for k, v in background.items()},
            "background_window_s": BACKGROUND_S,
            "service_pids": services,
        })
    finally:
        samples = sampler.stop() if sampler is not None else {}
        usage = {stage: stage_usage(proc.pid) for stage, proc in procs.items()}
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        publisher.kill()
        publisher.wait()
        for proc in procs.values():
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        delete_namespace(settings, topology)
        broker.close()
    latencies = sorted(sent.values())
    return {
        "sent": len(sent), "failed": len(failed), "seconds": round(seconds, 3),
        "mails_per_s": round(len(sent) / seconds, 1) if seconds else 0.0,
        "p50_ms": latencies[len(latencies) // 2] if latencies else 0,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] if latencies else 0,
        "stages": usage, "samples": samples, "system": system, "logs": str(workdir),
        "exit_codes": {s: p.returncode for s, p in procs.items()},
    }


def system_per_mail(run: dict[str, Any]) -> dict[str, Any]:
    """The whole system's CPU per delivered mail, in microseconds, per process and in total."""
    system, delivered = run["system"], max(run["sent"], 1)
    cpu = system["cpu_s"]
    per_mail = {k: round((cpu.get(k) or 0.0) / delivered * 1e6, 1) for k in SYSTEM}
    window = system["window_s"]
    return {
        "system_cpu_us_per_mail": {**per_mail, "total": round(sum(per_mail.values()), 1)},
        "system_cpu_window_s": window,
        # What RabbitMQ and Redis burned while the pipeline idled, as if it had gone on all
        # through the run: others' load on the machine's services and our idle stages' polls.
        "background_cpu_us_per_mail": {
            k: round(v / system["background_window_s"] * window / delivered * 1e6, 1)
            for k, v in system["background_cpu_s"].items()},
        "bench_event_follower_us_per_mail": round(cpu["bench"] / delivered * 1e6, 1),
        "load_average_before": [round(x, 2) for x in system["load_average_before"]],
        "load_average_after": [round(x, 2) for x in system["load_average_after"]],
    }


PARTS = ("raw", "full", "postfix", "half", "batch")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mails", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="where the PNGs go")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"what to run, of {','.join(PARTS)} (all by default; the full-load run always)")
    parser.add_argument("--compare", type=Path, action="append", default=[],
                        help="an earlier run's JSON, drawn beside this one in pipeline_cpu.png")
    parser.add_argument("--label", default="", help="this run's name in pipeline_cpu.png (default: its commit)")
    args = parser.parse_args()
    os.chdir(ROOT)  # the stages run as `python -m mailpipe run STAGE`: this tree's, not bench/'s modules
    parts = set(args.parts.split(",")) | {"full"}
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env()
    quiet = open("/dev/null", "w")  # noqa: SIM115 (lives as long as the run)
    result: dict[str, Any] = {"commit": commit()}
    with services_and_sink(settings) as port:
        raw = asyncio.run(raw_rate(port, 8000, 8, 2048)) if "raw" in parts else None
        full = full_load(settings, args.mails, 2048, port, sample_every_s=0.5)
        if "postfix" in parts:
            # The same mails into the same sink through a Postfix relay, right after: the figure
            # the issue compares with, under the same load of the machine.
            try:
                relay = relay_rate(port, args.mails, 2048)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:  # said, not fatal
                relay = {"failed": f"{type(exc).__name__}: {exc}"}
            result["postfix_relay"] = relay
            if "mails_per_s" in relay:
                result["ratio_to_postfix_relay"] = round(full["mails_per_s"] / float(relay["mails_per_s"]), 2)
        if "half" in parts:
            half_rate = max(1.0, full["mails_per_s"] / 2)
            half, _, _ = run_pipeline(settings, min(args.mails, int(half_rate * 20)), 2048, None,
                                      smtp_port=port, publish_per_s=half_rate, out=quiet)
            result.update({"half_load_mails_per_s": round(half_rate, 1), "half_load_p50_ms": half["p50_ms"],
                           "half_load_p99_ms": half["p99_ms"]})
        if "batch" in parts:
            # A linger of 5 s: the batch closes at 500 mails (80 MB), not on time. Three runs, the
            # median counts: now and then RabbitMQ pauses to roll its quorum-queue log over.
            bigs = [run_pipeline(settings, 500, 160 * 1024 - 2500, None, smtp_port=port, out=quiet,
                                 linger_ms=5000)[0] for _ in range(3)]
            big = sorted(bigs, key=lambda run: float(run["seconds"]))[1]
            result.update({"batch_80mb_mails": big["sent"], "batch_80mb_batches": big["batches"],
                           "batch_80mb_seconds": big["seconds"],
                           "batch_80mb_runs_s": [run["seconds"] for run in bigs]})
    chart = args.out / "pipeline_throughput.png"
    throughput_png(full.get("samples", {}), chart,
                   f"{full['sent']:,} mails of 2 KB through four stages: mails per second per stage")
    system = system_per_mail(full)
    result.update({"mails": full["sent"], "mails_per_s": full["mails_per_s"], "seconds": full["seconds"]})
    if raw is not None:
        result.update({"raw_aiosmtplib_8_connections_mails_per_s": round(raw, 1),
                       "ratio_to_raw": round(full["mails_per_s"] / raw, 3)})
    cost_chart = args.out / "pipeline_cpu.png"
    runs = {path.stem: json.loads(path.read_text()) for path in args.compare}
    runs[args.label or result["commit"]] = system
    cpu_png({label: run["system_cpu_us_per_mail"] for label, run in runs.items()}, cost_chart,
            f"CPU per delivered mail, {full['sent']:,} mails of 2 KB, every process (µs)")
    print(json.dumps({
        **result,
        "cpu_us_per_mail": per_mail_us(full, full["sent"] or 1),
        **system,
        "peak_rss_mb": {s: u.get("peak_rss_mb") for s, u in full["stages"].items()},
        "chart": rel(chart), "cpu_chart": rel(cost_chart),
        "target_mails_per_s": 1500, "target_batch_80mb_s": 3.0, "target_half_load_p99_ms": 2000,
        "target_system_cpu_us_per_mail": 700, "target_ratio_to_raw": 0.5, "target_ratio_to_postfix_relay": 3.0,
    }))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def commit() -> str:
    """The commit of the tree the stages run from (the one mailpipe is imported from)."""
    import mailpipe

    tree = Path(mailpipe.__file__).resolve().parents[1]
    found = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (found.stdout.strip() or str(tree)) + ("+dirty" if dirty else "")


if __name__ == "__main__":
    main()
