"""``mailpipe demo``: the whole pipeline on this machine, end to end.

Checks RabbitMQ and Redis (starting them if installed and stopped), starts every stage as its
own process and a local SMTP sink as the demo's server, publishes N mails through the client
library, follows their events until every one is sent or failed, and prints a summary.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pika.exceptions
import redis
from prometheus_client.parser import text_string_to_metric_families

from mailpipe import redis_client, stages
from mailpipe.amqp import Broker
from mailpipe.codec import decode_events
from mailpipe.errors import MailpipeError
from mailpipe.feedback import is_feedback
from mailpipe.lanes import known_queues
from mailpipe.model import IntakeRequest, Outcome, new_id, now_ms
from mailpipe.services import ensure
from mailpipe.settings import Settings
from mailpipe.sink import LocalSink, free_port
from mailpipe.topology import Topology

# The counter of mails each stage has passed on, as its /metrics reports it.
MAIL_COUNTERS = {
    "producer": ("mailpipe_intake_queued_total", {}),
    "packer": ("mailpipe_batch_mails_sum", {}),  # mails, not messages: jobs travel bundled
    "limiter": ("mailpipe_limiter_released_mails_total", {}),
    "sender": ("mailpipe_sender_mails_total", {"outcome": "sent"}),
}


class Sampler(threading.Thread):
    """Every ``every_s``: each stage's mail counter (from its /metrics) and RSS (from /proc),
    as ``samples[stage] = [(seconds since start, mails, rss_mb), ...]``."""

    def __init__(self, procs: dict[str, subprocess.Popen[bytes]], ports: dict[str, int], every_s: float) -> None:
        super().__init__(name="demo-sampler", daemon=True)
        self.procs, self.ports, self.every_s = procs, ports, every_s
        self.samples: dict[str, list[tuple[float, float, float]]] = {stage: [] for stage in procs}
        self.stopped = threading.Event()
        self.started_at = time.monotonic()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            self.sample()

    def sample(self) -> None:
        at = round(time.monotonic() - self.started_at, 2)
        for stage, proc in self.procs.items():
            mails = scrape_mails(self.ports[stage], *MAIL_COUNTERS[stage])
            if mails is not None:
                self.samples[stage].append((at, mails, rss_mb(proc.pid)))

    def stop(self) -> dict[str, list[tuple[float, float, float]]]:
        """Stop sampling, after one last sample: the counts as the run ends."""
        self.stopped.set()
        self.join(5)
        self.sample()
        return self.samples


def scrape_mails(port: int, name: str, labels: dict[str, str]) -> float | None:
    """The sum of a counter's samples that carry ``labels``; None when /metrics does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's memory from /proc (Linux): resident now, or at its peak with ``VmHWM``."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith(f"{field}:")), 0.0)


@dataclass
class Progress:
    total: int
    sent: dict[str, str] = field(default_factory=dict)  # job id -> batch id
    failed: dict[str, str] = field(default_factory=dict)  # job id -> reply
    deferred: int = 0
    latencies_ms: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return len(self.sent) + len(self.failed)


DEMO_LINGER_MS = 200  # unless MAILPIPE_LINGER_MS says otherwise: a demo's batches close quickly


def stage_env(settings: Settings, namespace: str, servers_file: Path, linger_ms: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "MAILPIPE_NAMESPACE": namespace, "MAILPIPE_SERVERS_FILE": str(servers_file),
        "MAILPIPE_AMQP_URL": settings.amqp_url, "MAILPIPE_REDIS_URL": settings.redis_url,
        "MAILPIPE_LINGER_MS": str(linger_ms),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def write_servers_file(path: Path, sink_port: int, rate_per_hour: int | None, mails: int) -> None:
    limit = f"rate_per_hour = {rate_per_hour}" if rate_per_hour else "unlimited = true"
    path.write_text(
        "# Written by `mailpipe demo`: one local SMTP sink, one tenant.\n"
        "[servers.local]\n"
        f'address = "[127.0.0.1]:{sink_port}"\n'
        'tls = "none"\n'
        f"{limit}\n\n"
        "[tenants.demo]\n"
        'server = "local"\n'
        'domains = ["demo.example"]\n'
        f"daily_limit = {max(10_000, mails)}\n", encoding="utf-8")


def make_requests(first: int, count: int, size: int) -> list[IntakeRequest]:
    body = ("The quick brown fox jumps over the lazy dog. " * (size // 45 + 1))[:max(size, 1)]
    lines = "\n".join(body[i:i + 76] for i in range(0, len(body), 76))
    created_ms = now_ms()  # latency is measured from here to the 250
    return [IntakeRequest(id=new_id(), tenant="demo", sender="news@demo.example", created_ms=created_ms,
                          to=(f"reader{i}@example.com",), subject=f"Demo mail {i}", text=lines)
            for i in range(first, first + count)]


def wait_for_consumers(broker: Broker, topology: Topology, procs: dict[str, subprocess.Popen[bytes]],
                       timeout_s: float = 60.0) -> None:
    """Publish only once every stage consumes: the figures are the pipeline's, not its start-up."""
    deadline = time.monotonic() + timeout_s
    for queue in topology.work_queues:
        while broker.channel().queue_declare(queue, passive=True).method.consumer_count < 1:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs.values()):
                return  # the progress loop reports a stage that died
            broker.sleep(0.1)


def run_demo(mails: int, size: int, rate_per_hour: int | None, as_json: bool,
             timeout_s: float = 600.0) -> int:
    out: TextIO = sys.stderr
    settings = Settings.from_env()
    problems = ensure(settings)
    if problems:
        for problem in problems:
            print(f"mailpipe demo: {problem}", file=out)
        return 1
    summary, codes, progress = run_pipeline(settings, mails, size, rate_per_hour, timeout_s=timeout_s, out=out)
    if as_json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    complete = progress.done == mails and all(c == 0 for c in codes.values())
    return 0 if complete and not progress.failed else 1


def run_pipeline(settings: Settings, mails: int, size: int, rate_per_hour: int | None, *,
                 smtp_port: int | None = None, publish_per_s: float | None = None,
                 timeout_s: float = 600.0, out: TextIO = sys.stderr, sample_every_s: float | None = None,
                 linger_ms: int | None = None) -> tuple[dict[str, Any], dict[str, int], Progress]:
    """Every stage as its own process, N mails through them to the local sink (or to an SMTP
    server of the caller's on 127.0.0.1:``smtp_port``). Returns the summary, the stages' exit
    codes, and the progress; the summary holds each stage's CPU seconds and peak RSS, and with
    ``sample_every_s`` each stage's mails and RSS over time (``samples``, see ``Sampler``)."""
    namespace = f"demo-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="mailpipe-demo-"))
    topology = Topology.from_settings(settings.replace(namespace=namespace))
    if rate_per_hour:
        print(f"rate limit: {rate_per_hour} mails/hour (--rate)", file=out)
    else:
        print("rate limit: lifted for the demo (give --rate PER_HOUR to enforce one)", file=out)

    broker = Broker(settings.amqp_endpoints, client_name="mailpipe-demo").connect()
    topology.declare(broker.channel())
    events = broker.channel().queue_declare("", exclusive=True, auto_delete=True).method.queue
    broker.channel().queue_bind(events, topology.events, routing_key="#")

    procs: dict[str, subprocess.Popen[bytes]] = {}
    usage: dict[str, dict[str, float]] = {}
    with LocalSink() as sink:
        servers_file = workdir / "servers.toml"
        write_servers_file(servers_file, smtp_port or sink.port, rate_per_hour, mails)
        if linger_ms is None:
            linger_ms = settings.linger_ms if "MAILPIPE_LINGER_MS" in os.environ else DEMO_LINGER_MS
        env = stage_env(settings, namespace, servers_file, linger_ms)
        ports = {stage: free_port() for stage in stages.MAIL_PATH} if sample_every_s else {}
        for stage in stages.MAIL_PATH:
            metrics = ["--metrics-port", str(ports[stage])] if stage in ports else []
            with (workdir / f"{stage}.log").open("wb") as log:  # the child keeps its own copy
                procs[stage] = subprocess.Popen([sys.executable, "-m", "mailpipe", "run", stage, *metrics],
                                                env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(procs, ports, sample_every_s) if sample_every_s else None
        print(f"started {', '.join(stages.MAIL_PATH)} (logs in {workdir}); SMTP server on "
              f"127.0.0.1:{smtp_port or sink.port}", file=out)
        try:
            if sampler is not None:
                sampler.start()
            progress = follow(broker, events, namespace, settings, mails, size, timeout_s, out, procs,
                              publish_per_s)
        finally:
            samples = sampler.stop() if sampler is not None else {}
            usage = {stage: stage_usage(proc.pid) for stage, proc in procs.items()}
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            codes = {stage: _wait(proc) for stage, proc in procs.items()}
            delete_namespace(settings, topology)
            broker.close()
        received = sink.snapshot()

    summary = summarize(progress, received)
    summary["stages"] = usage
    if samples:
        summary["samples"] = samples
    unclean = {s: c for s, c in codes.items() if c != 0}
    if unclean:
        print(f"stages that did not exit cleanly: {unclean} (logs in {workdir})", file=out)
    return summary, codes, progress


def stage_usage(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) and peak RSS of a process, from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return {}
    ticks = os.sysconf("SC_CLK_TCK")
    return {"cpu_s": round((int(fields[11]) + int(fields[12])) / ticks, 2),
            "peak_rss_mb": round(rss_mb(pid, "VmHWM"), 1)}


def follow(broker: Broker, events: str, namespace: str, settings: Settings, mails: int, size: int,
           timeout_s: float, out: TextIO, procs: dict[str, subprocess.Popen[bytes]],
           publish_per_s: float | None = None) -> Progress:
    from producer import Producer

    progress = Progress(total=mails)
    wait_for_consumers(broker, Topology.from_settings(settings.replace(namespace=namespace)), procs)
    started = time.monotonic()
    chunk = 200 if publish_per_s is None else max(1, int(publish_per_s / 20))
    broker.consume(events, prefetch=1000)
    last_print = 0.0
    deadline = started + timeout_s
    published = 0
    with Producer(settings.amqp_endpoints, namespace, large_message_bytes=settings.large_message_bytes) as producer:
        while progress.done < mails:
            wait_s = 0.2
            if published < mails:
                # Publishing and following the events interleave: the events connection stays
                # serviced (heartbeats) however long an even load lasts.
                due = started + published / publish_per_s if publish_per_s else 0.0
                if time.monotonic() >= due:
                    count = min(chunk, mails - published)
                    producer.publish_requests(make_requests(published, count, size))
                    published += count
                    wait_s = 0.0
                    if published == mails:
                        producer.close()  # idle from here on: no heartbeats to miss
                else:
                    wait_s = min(wait_s, due - time.monotonic())
            deliveries = broker.poll(max(0.0, wait_s))
            for delivery in deliveries:
                if is_feedback(delivery.body):  # bounced, suppressed ...: not a delivery's outcome
                    continue
                for event in decode_events(delivery.body):  # one event, or a batch's bundle of them
                    if event.outcome == Outcome.SENT:
                        progress.sent[event.job_id] = event.batch_id
                        progress.latencies_ms.append(event.at_ms - event.created_ms)
                    elif event.outcome in (Outcome.FAILED, Outcome.EXPIRED):
                        progress.failed[event.job_id] = f"{event.code} {event.text}".strip()
                    else:
                        progress.deferred += 1
            if deliveries:
                broker.ack(deliveries[-1].tag, multiple=True)
            now = time.monotonic()
            # On a terminal, one line redrawn twice a second; in a log, a line every 5 s.
            every_s, end = (0.5, "\r") if out.isatty() else (5.0, "\n")
            if now - last_print > every_s or progress.done == mails:
                last_print = now
                rate = len(progress.sent) / max(now - started, 1e-6)
                print(f"sent {len(progress.sent)}/{mails}  failed {len(progress.failed)}  "
                      f"deferred {progress.deferred}  {rate:,.0f} mails/s", end=end, file=out, flush=True)
            dead = [s for s, p in procs.items() if p.poll() is not None]
            if dead:
                print(f"\nstage(s) exited early: {', '.join(dead)}", file=out)
                break
            if now > deadline:
                print(f"\ngave up after {timeout_s:.0f} s", file=out)
                break
    if out.isatty():
        print(file=out)
    progress.seconds = time.monotonic() - started
    return progress


def summarize(progress: Progress, received: list[Any]) -> dict[str, Any]:
    sizes = {r.job_id: r.size for r in received}
    batch_bytes: dict[str, int] = {}
    for job_id, batch_id in progress.sent.items():
        batch_bytes[batch_id] = batch_bytes.get(batch_id, 0) + sizes.get(job_id, 0)
    seconds = progress.seconds
    lat = sorted(progress.latencies_ms)
    return {
        "sent": len(progress.sent), "failed": len(progress.failed), "batches": len(batch_bytes),
        "max_batch_bytes": max(batch_bytes.values(), default=0),
        "seconds": round(seconds, 3),
        "mails_per_s": round(len(progress.sent) / seconds, 1) if seconds else 0.0,
        "p50_ms": _percentile(lat, 50), "p99_ms": _percentile(lat, 99),
        "received": len(received),
    }


def _percentile(values: list[int], p: int) -> int:
    if not values:
        return 0
    if len(values) == 1:
        return values[0]
    return int(statistics.quantiles(values, n=100, method="inclusive")[p - 1])


def print_summary(s: dict[str, Any]) -> None:
    print(f"sent {s['sent']}, failed {s['failed']} in {s['batches']} batches "
          f"(largest {s['max_batch_bytes']:,} bytes)")
    print(f"{s['seconds']} s, {s['mails_per_s']} mails/s; "
          f"enqueue-to-250 latency p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms")


def _wait(proc: subprocess.Popen[bytes], timeout_s: float = 40.0) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def delete_namespace(settings: Settings, topology: Topology) -> None:
    """The demo's namespace is its own: remove its queues and its Redis keys. On a connection
    of its own: the demo's may be the very thing that failed."""
    lanes: set[str] = set()
    with suppress(redis.RedisError):
        client = redis_client.connect(settings)
        lanes = known_queues(client, topology.namespace)
        client.close()
    broker = Broker(settings.amqp_endpoints, client_name="mailpipe-demo-cleanup")
    with suppress(pika.exceptions.AMQPError, MailpipeError):
        channel = broker.connect().channel()
        for queue in (*topology.all_queues, *lanes):
            channel.queue_delete(queue)
        channel.exchange_delete(topology.events)
    broker.close()
    with suppress(redis.RedisError):
        client = redis_client.connect(settings)
        for key in client.scan_iter(match=f"*{topology.namespace}:*", count=1000):
            client.delete(key)
        client.close()
