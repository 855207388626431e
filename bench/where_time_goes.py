"""Where one mail's CPU goes (issue 24): each stage profiled under the pipeline bench's
full-load run, and what a mail costs in messages and calls.

    python bench/where_time_goes.py [--mails 20000] [--count-mails 5000] [--parts profile,count,broker]

- profile: the full-load run of bench/pipeline.py (N mails of 2 KB, every stage a process of
  its own, into smtp-sink), each stage sampled by py-spy (100 Hz, the thread holding the GIL
  only: on two busy cores a thread waiting for a CPU after its poll returned looks active, and
  would count as CPU) from the first publish to the last event. A stage's CPU per mail of the
  same run is split into its system time (the kernel: system calls, socket I/O, from /proc),
  a group of its own, and its user time, shared by the samples' groups (``GROUPS``: the first
  group any frame of a sample belongs to); each with its share of the stage's CPU. The raw
  stacks are kept in bench/out/profile/<stage>.txt (py-spy's raw format: flamegraph.pl or
  speedscope read them).
- count: a run of M mails with bench/instrument/sitecustomize.py loaded in every process
  (stages and publisher): AMQP publishes, deliveries, gets, acks and confirms per queue,
  msgpack encodes and decodes by codec function, Redis commands and round trips, per mail.
- broker: what RabbitMQ's CPU costs per message and per byte, and the publishing client's: the
  same mails published to a quorum queue of the bench's, consumed and acked, one message per
  mail, and in bundles of 10 and 100 mails per message (the levers "publish_many", jobs and
  events bundled), the broker's CPU from /proc.
- micro: what a few levers could bring a cost down to, in this process (``micro``).

Prints one JSON object; ``--markdown`` also prints the tables of docs/design-notes.md's
"Where the time goes".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from charts import groups_png
from pipeline import ROOT, full_load, own_cpu_s, service_pids, services_and_sink, system_per_mail
from system_cpu import cpu_s

from mailpipe.settings import Settings

OUT = ROOT / "bench" / "out"
PY_SPY_RATE = 100
KERNEL = "kernel (system calls: socket I/O, poll)"

# A sample's cost group: the deepest frame of its stack that one of GROUPS matches (the most
# specific work: the AMQP publish inside the lanes' publish, the email package inside render),
# else the deepest one LIBRARIES matches, else "other". A rule is (group, function, file): the
# function a name, or a method with or without its class ("Broker.publish"), or ".*".
GROUPS: list[tuple[str, str, str]] = [
    # producer
    ("render (MIME, email package)", r"render", r"producer/compose"),
    ("DKIM sign", r"dkim_sign", r"producer/compose"),
    ("validate (addresses, headers)", r"validate", r"producer/compose"),
    ("lint + domains", r"lint|check_domains|text_from_html", r"producer/(lint|domains)"),
    ("decode intake", r"decode_intake", r"mailpipe/codec"),
    ("encode job", r"encode_job", r"mailpipe/codec"),
    # the publishing process (the client library)
    ("encode intake", r"encode_intake", r"mailpipe/codec"),
    ("build the requests (the bench's make_requests)", r"make_requests", r"mailpipe/demo"),
    ("suppression + idempotency (Redis)", r"drop_suppressed|claim|confirm|release",
     r"producer/(stage|idempotency)"),
    # packer
    ("decode job", r"decode_job", r"mailpipe/codec"),
    ("encode batch", r"encode_batch", r"mailpipe/codec"),
    ("decode batch", r"decode_batch", r"mailpipe/codec"),
    ("pack (group jobs)", r"add|due|close_all", r"packer/packing"),
    ("lanes (Redis)", r".*", r"mailpipe/lanes"),
    # limiter
    ("decide / take (Redis)", r".*", r"limiter/(redis_limiter|taking|decide|housekeeping)"),
    # sender
    ("SMTP session (commands, replies, writes)", r".*", r"sender/(transaction|session|smtp|pool)|aiosmtplib"),
    ("claims + sent marks (Redis)", r".*", r"sender/(claims|check)"),
    ("outputs (events, retries)", r".*", r"sender/(outputs|envelope)"),
    ("encode event", r"encode_event", r"mailpipe/codec"),
    ("delivery bookkeeping", r".*", r"sender/delivery"),
    # every stage
    ("AMQP publish + confirms", r"publish|_send|_on_confirm|_on_return", r"mailpipe/amqp"),
    ("AMQP ack", r"ack|ack_all|_settled", r"mailpipe/amqp"),
    ("AMQP receive (poll, frames, basic.get)", r"poll|_on_delivery|get|sleep", r"mailpipe/amqp"),
    ("stage loop and logic", r".*", r"(producer|packer|limiter|sender)/(stage|packing|holding|loop)\.py"
                                    r"|mailpipe/stage\.py"),
]
LIBRARIES: list[tuple[str, str, str]] = [
    ("Redis client (other)", r".*", r"redis/|hiredis"),
    ("pika (other: heartbeats, timers)", r".*", r"pika/"),
    ("logging", r".*", r"logging/"),
    ("prometheus counters", r".*", r"prometheus_client/"),
    ("event loop (asyncio/uvloop)", r".*", r"asyncio/|uvloop|threading"),
]
# Costs that cut across the groups: a sample counts when any of its frames matches (function,
# file; a function "" means the sample's top frame must be in the file).
ACROSS: dict[str, tuple[str, str]] = {
    "pika, all of it (frames, I/O loop, publish, confirms)": (".*", r"pika/"),
    "pika's frame buffer trimming (a copy of the rest of a 128 KB read per frame)":
        (r"Connection._trim_frame_buffer", r"pika/connection"),
    "redis-py and hiredis, all of it": (".*", r"redis/|hiredis"),
    "codec and msgpack, all of it": (".*", r"mailpipe/codec|msgpack/"),
    "email_validator (address checks)": (".*", r"email_validator/"),
    "email package (MIME rendering)": (".*", r"^email/"),
    "prometheus_client in the mail path (labels, inc, observe)": (".*", r"prometheus_client/(metrics|values)"),
    "dataclass __init__ (frozen: object.__setattr__ per field)": (r"__create_fn__.<locals>.__init__", r"<string>"),
    "logging": (".*", r"^logging/"),
}
# The metrics server's thread (the bench scrapes every 0.5 s): not mail work.
SCRAPE = re.compile(r"socketserver|http/server|prometheus_client/exposition")
_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^:()]+)(?::\d+)?\)$")


@contextmanager
def py_spy(pids: dict[str, int], directory: Path) -> Iterator[None]:
    """Each stage sampled by py-spy for the block; raw stacks in ``directory/<stage>.txt``."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        sys.exit("where_time_goes: py-spy is missing (.venv/bin/pip install py-spy)")
    directory.mkdir(parents=True, exist_ok=True)
    spies = [subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", str(PY_SPY_RATE), "--threads", "--gil",
                               "--format", "raw", "--output", str(directory / f"{stage}.txt")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for stage, pid in pids.items()]
    time.sleep(1.0)  # attached
    try:
        yield
    finally:
        for spy_proc in spies:
            spy_proc.send_signal(signal.SIGINT)  # py-spy writes its file and exits
        for spy_proc in spies:
            spy_proc.wait(30)


def read_raw(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    """py-spy's raw stacks: [(frames root first as (function, file)), samples)]."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = []
        for part in stack.split(";"):
            match = _FRAME.match(part.strip())
            frames.append((match["func"], match["file"]) if match else (part.strip(), ""))
        stacks.append((frames, int(count)))
    return stacks


def _compiled(rules: list[tuple[str, str, str]]) -> list[tuple[str, re.Pattern[str], re.Pattern[str]]]:
    return [(group, re.compile(func if func == ".*" else rf"(?:^|\.)(?:{func})$"), re.compile(file))
            for group, func, file in rules]


_GROUPS, _LIBRARIES = _compiled(GROUPS), _compiled(LIBRARIES)
# uvloop's transport.write sends at once, in C, holding the GIL: a sample at the top of these
# is the kernel's send() (counted in the stage's system time already), not Python's work.
SOCKET_WRITES = {("Session.write", "sender/session.py"), ("StreamWriter.writelines", "asyncio/streams.py")}


def group_of(frames: list[tuple[str, str]]) -> str:
    if frames and frames[-1] in SOCKET_WRITES:
        return KERNEL
    if any(SCRAPE.search(path) for _, path in frames):
        return "metrics scrape (bench)"
    for rules in (_GROUPS, _LIBRARIES):
        for func_name, path in reversed(frames):
            for group, func, file in rules:
                if file.search(path) and func.search(func_name):
                    return group
    return "other"


def profile_table(path: Path, us_per_mail: float, kernel_us_per_mail: float, top: int = 12) -> dict[str, Any]:
    """A stage's CPU per mail by group: its time in the kernel (system calls, socket I/O above all,
    from /proc) as a group of its own, its user time shared by the samples of the thread holding
    the GIL; each with its share of the stage's CPU. And the functions with the most samples at
    the top of the stack (self time), for what the groups miss."""
    stacks = read_raw(path)
    total = sum(n for _, n in stacks) or 1
    user_us = max(us_per_mail - kernel_us_per_mail, 0.0)
    groups: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for frames, n in stacks:
        groups[group_of(frames)] += n
        func, file = frames[-1]
        leaves[f"{func} ({file})"] += n
        threads[frames[0][0] if frames and frames[0][0].startswith(("thread", "process")) else "?"] += n
    python = total - groups.pop(KERNEL, 0) or 1
    across: Counter[str] = Counter()
    for frames, n in stacks:
        if group_of(frames) in (KERNEL, "metrics scrape (bench)"):
            continue
        for name, (func, file) in ACROSS.items():
            if any(re.search(file, path) and (func == ".*" or f == func) for f, path in frames):
                across[name] += n
    rows = [(g, user_us * n / python) for g, n in groups.items()]
    rows.append((KERNEL, kernel_us_per_mail))
    rows.sort(key=lambda row: -row[1])
    return {
        "samples": total, "us_per_mail": us_per_mail, "kernel_us_per_mail": kernel_us_per_mail,
        "groups": [{"group": g, "pct": round(100 * us / max(us_per_mail, 1e-9), 1), "us_per_mail": round(us, 1)}
                   for g, us in rows],
        "self": [{"function": f, "pct_of_user": round(100 * n / python, 1),
                  "us_per_mail": round(user_us * n / python, 1)}
                 for f, n in leaves.most_common(top) if not f.startswith(("Session.write", "StreamWriter.writelines"))],
        "across_us_per_mail": {name: round(user_us * across[name] / python, 1) for name in ACROSS},
        "threads_pct_of_user": {t: round(100 * n / total, 1) for t, n in threads.most_common()},
    }


def run_profile(settings: Settings, mails: int, port: int) -> dict[str, Any]:
    directory = OUT / "profile"
    run = full_load(settings, mails, 2048, port, watch=lambda pids: py_spy(pids, directory))
    system = system_per_mail(run)
    per_mail = system["system_cpu_us_per_mail"]
    kernel = {stage: (s or 0.0) / max(run["sent"], 1) * 1e6
              for stage, s in run["system"]["stage_system_cpu_s"].items()}
    tables = {stage: profile_table(directory / f"{stage}.txt", per_mail[stage], kernel[stage])
              for stage in ("publisher", "producer", "packer", "limiter", "sender")}
    chart = OUT / "where_time_goes.png"
    groups_png({stage: [(g["group"], g["us_per_mail"]) for g in table["groups"]] for stage, table in tables.items()},
               chart, f"Where the time goes: {run['sent']:,} mails of 2 KB at {run['mails_per_s']:,.0f}/s "
                      f"(RabbitMQ {per_mail['rabbitmq']:.0f} µs, Redis {per_mail['redis']:.0f} µs per mail)")
    return {"mails": run["sent"], "mails_per_s": run["mails_per_s"], **system, "stages": tables,
            "raw_stacks": str(directory.relative_to(ROOT)), "chart": str(chart.relative_to(ROOT))}


def run_count(settings: Settings, mails: int, port: int) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="mailpipe-counts-"))
    instrument = str(ROOT / "bench" / "instrument")
    path = os.pathsep.join(p for p in (instrument, os.environ.get("PYTHONPATH", "")) if p)
    run = full_load(settings, mails, 2048, port,
                    extra_env={"PYTHONPATH": path, "MAILPIPE_BENCH_COUNTS_DIR": str(directory)})
    sent = max(run["sent"], 1)
    per_process: dict[str, dict[str, dict[str, float]]] = {}
    for file in sorted(directory.glob("*.json")):
        counts = json.loads(file.read_text())
        name = counts["stage"]
        mine = per_process.setdefault(name, {})
        for kind in ("amqp", "msgpack", "redis"):
            table = mine.setdefault(kind, {})
            for key, value in counts[kind].items():
                table[key] = round(table.get(key, 0) + value / sent, 3)
    shutil.rmtree(directory, ignore_errors=True)
    return {"mails": run["sent"], "per_mail": per_process}


# -- RabbitMQ per message ------------------------------------------------------------------------

# (name, mails per message, bytes per mail, queue kind, acks): the pipeline's messages as they
# are (an intake request of the bench's mail is 2,355 bytes, its job 2,617, its event 260, a
# batch 500 jobs) and as the levers would make them.
BROKER_CASES: list[tuple[str, int, int, str, str]] = [
    ("intake or job: 1 mail per message", 1, 2_500, "work", "each"),
    ("the same, acked with multiple=True", 1, 2_500, "work", "multiple"),
    ("10 mails per message", 10, 2_500, "work", "each"),
    ("100 mails per message", 100, 2_500, "work", "each"),
    ("batch: 500 mails per message", 500, 2_617, "work", "each"),
    ("event: 1 per message, topic exchange to a subscriber's queue", 1, 260, "events", "multiple"),
    ("events: 100 per message", 100, 260, "events", "multiple"),
]
ROUND_MAILS = 200  # mails published per confirmed round, as the publisher and the stages do
TAIL_S = 1.5  # a quorum queue writes its segments after the confirm: RabbitMQ's CPU counted this long after


def broker_case(settings: Settings, rabbit: list[int], background_per_s: float, mails: int, per_message: int,
                size: int, kind: str, acks: str) -> dict[str, Any]:
    """``mails`` mails through RabbitMQ as ``per_message`` per message: published with confirms
    in rounds, consumed (prefetch 1,000) and acked as they come, on mailpipe's Broker; RabbitMQ's
    CPU (less its background) and this process's, per mail."""
    from mailpipe.amqp import Broker, Outgoing
    from mailpipe.topology import Topology

    namespace = f"bench-broker-{os.getpid()}"
    broker = Broker(settings.amqp_endpoints, client_name="mailpipe-bench-broker").connect()
    channel = broker.channel()
    if kind == "work":  # a quorum queue with the arguments of the pipeline's work queues
        queue = f"{namespace}.case"
        Topology(namespace).declare_lane(channel, queue)
        exchange, key = "", queue
    else:  # the events exchange and a subscriber's queue bound to every key (as the bench's)
        exchange = f"{namespace}.events"
        channel.exchange_declare(exchange, exchange_type="topic", auto_delete=True)
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(queue, exchange, routing_key="#")
        key = "sent.demo"
    broker.consume(queue, 1000)
    body = os.urandom(size * per_message)
    messages = max(1, mails // per_message)
    step = max(1, ROUND_MAILS // per_message)
    got = 0

    def take(wait_s: float) -> int:
        deliveries = broker.poll(wait_s)
        if deliveries and acks == "each":
            broker.ack_all(d.tag for d in deliveries)
        elif deliveries:
            broker.ack(deliveries[-1].tag, multiple=True)
        return len(deliveries)

    rabbit0, client0, started = cpu_s(rabbit), own_cpu_s(), time.monotonic()
    for first in range(0, messages, step):
        broker.publish([Outgoing(key, body, exchange=exchange) for _ in range(min(step, messages - first))])
        got += take(0.0)
    while got < messages:
        got += take(1.0)
    seconds, client_cpu = time.monotonic() - started, own_cpu_s() - client0
    broker.sleep(TAIL_S)
    rabbit_cpu = cpu_s(rabbit) - rabbit0 - background_per_s * (time.monotonic() - started)
    if kind == "work":
        channel.queue_delete(queue)
    else:
        channel.exchange_delete(exchange)
    broker.close()
    return {"mails_per_message": per_message, "bytes_per_message": size * per_message, "messages": messages,
            "seconds": round(seconds, 2),
            "rabbitmq_us_per_mail": round(rabbit_cpu / (messages * per_message) * 1e6, 1),
            "rabbitmq_us_per_message": round(rabbit_cpu / messages * 1e6, 1),
            "client_us_per_mail": round(client_cpu / (messages * per_message) * 1e6, 1)}


def broker_cost(settings: Settings, mails: int = 10_000, repeats: int = 3) -> dict[str, Any]:
    """RabbitMQ's CPU per mail for the pipeline's kinds of message, one mail per message and
    bundled: ``BROKER_CASES``, each ``repeats`` times in turn (the host is noisy: the median
    counts, every run is given). The broker's background (others' load) is measured for 2 s
    before each round and taken off."""
    rabbit = service_pids(settings)["rabbitmq"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in BROKER_CASES}
    backgrounds = []
    for _ in range(repeats):
        before, at = cpu_s(rabbit), time.monotonic()
        time.sleep(2.0)
        background_per_s = (cpu_s(rabbit) - before) / (time.monotonic() - at)
        backgrounds.append(round(100 * background_per_s, 1))
        for name, per, size, kind, acks in BROKER_CASES:
            runs[name].append(broker_case(settings, rabbit, background_per_s, mails if per < 500 else 20 * per,
                                          per, size, kind, acks))
    cases = {}
    for name, results in runs.items():
        median = sorted(results, key=lambda r: float(r["rabbitmq_us_per_mail"]))[len(results) // 2]
        cases[name] = {**median, "rabbitmq_us_per_mail_runs": [r["rabbitmq_us_per_mail"] for r in results],
                       "client_us_per_mail_runs": [r["client_us_per_mail"] for r in results]}
    return {"mails": mails, "background_cpu_pct": backgrounds, "cases": cases,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


# -- the floor of a few levers, in this process ---------------------------------------------------

def _per_call_us(call: Any, calls: int) -> float:
    started = time.process_time()
    for _ in range(calls):
        call()
    return round((time.process_time() - started) / calls * 1e6, 2)


def micro(settings: Settings, calls: int = 20_000) -> dict[str, Any]:
    """CPU per call of what a mail goes through, against the floor a lever would bring it to:
    the codec's encodes and decodes of the bench's mail beside msgpack's bare unpackb (what a
    leaner decoder could not go below); the address check of a new recipient (email-validator)
    beside a regular expression for a plain ASCII address (a fast path); a round trip of the
    sender's sent marks through redis.asyncio (a pipeline of 2 HSETs: the 0.5 round trips per mail
    of the counting run) beside the same bytes on a plain asyncio stream, parsed by hiredis."""
    import asyncio
    import re as regex

    import hiredis
    import msgpack

    from mailpipe import codec, redis_client
    from mailpipe.demo import make_requests
    from mailpipe.model import Event, Job, now_ms
    from producer.compose import check_address, render

    request = make_requests(0, 1, 2048)[0]
    intake = codec.encode_intake(request)
    job = Job(id=request.id, tenant="demo", server="local", sender=request.sender, recipients=request.to,
              message=render(request, request.id), created_ms=request.created_ms, enqueued_ms=now_ms())
    raw_job = codec.encode_job(job)
    event = Event(job_id=job.id, tenant="demo", server="local", outcome="sent", recipients=job.recipients,
                  attempt=0, created_ms=job.created_ms, at_ms=now_ms(), code=250, text="2.0.0 Ok")
    raw_event = codec.encode_event(event)
    result: dict[str, Any] = {"codec_us_per_call": {
        "encode_intake": _per_call_us(lambda: codec.encode_intake(request), calls),
        "decode_intake": _per_call_us(lambda: codec.decode_intake(intake, settings.max_message_bytes), calls),
        "msgpack.unpackb of the intake (the floor)": _per_call_us(lambda: msgpack.unpackb(intake), calls),
        "encode_job": _per_call_us(lambda: codec.encode_job(job), calls),
        "decode_job": _per_call_us(lambda: codec.decode_job(raw_job), calls),
        "msgpack.unpackb of the job (the floor)": _per_call_us(lambda: msgpack.unpackb(raw_job), calls),
        "encode_event": _per_call_us(lambda: codec.encode_event(event), calls),
        "decode_event": _per_call_us(lambda: codec.decode_event(raw_event), calls),
    }, "bytes": {"intake": len(intake), "job": len(raw_job), "event": len(raw_event)}}

    plain = regex.compile(r"[A-Za-z0-9._+-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}")
    addresses = iter([f"reader{i}.{os.getpid()}@example{i % 97}.com" for i in range(2 * calls)])
    result["address_check_us_per_new_address"] = {
        "check_address (email-validator, not cached)": _per_call_us(lambda: check_address(next(addresses), "to"),
                                                                    calls // 4),
        "a regular expression for plain ASCII (the floor of a fast path)":
            _per_call_us(lambda: plain.fullmatch(next(addresses)), calls),
    }

    async def marks(trips: int) -> dict[str, float]:
        client = redis_client.connect_async(settings)
        key = f"bench-marks-{os.getpid()}"
        started = time.process_time()
        for i in range(trips):
            async with client.pipeline(transaction=False) as pipe:
                pipe.hset(f"{key}:{i}", mapping={"a@example.com": "s"})
                pipe.hset(f"{key}:{i}b", mapping={"b@example.com": "s"})
                await pipe.execute()
        via_redis_py = (time.process_time() - started) / trips * 1e6
        host, port = settings.redis_url.split("//", 1)[1].split("/")[0].split("@")[-1].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        parser = hiredis.Reader()
        started = time.process_time()
        for i in range(trips):
            writer.write(b"".join(_resp(b"HSET", f"{key}:{i}{x}".encode(), b"a@example.com", b"s") for x in "cd"))
            replies = 0
            while replies < 2:
                parser.feed(await reader.read(4096))
                while parser.gets() is not False:
                    replies += 1
        via_stream = (time.process_time() - started) / trips * 1e6
        writer.close()
        for pattern in (f"{key}:*",):
            async for found in client.scan_iter(match=pattern, count=1000):
                await client.delete(found)
        await client.aclose()
        return {"redis.asyncio pipeline of 2 HSETs": round(via_redis_py, 1),
                "the same bytes on an asyncio stream, parsed by hiredis (the floor)": round(via_stream, 1)}

    result["sent_marks_us_per_round_trip"] = asyncio.run(marks(2_000))
    return result


def _resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/design-notes.md's "Where the time goes", from this bench's JSON."""
    lines: list[str] = []
    profile = result.get("profile")
    if profile:
        per_mail = profile["system_cpu_us_per_mail"]
        lines += [f"Profiled run: {profile['mails']:,} mails, {profile['mails_per_s']:,.0f}/s, "
                  f"{per_mail['total']:,.0f} µs per mail for the whole system.", ""]
        for stage, table in profile["stages"].items():
            lines += [f"**{stage}** ({table['us_per_mail']:.0f} µs per mail)", "",
                      "| cost | % of the stage | µs per mail |", "|---|---|---|"]
            lines += [f"| {g['group']} | {g['pct']:.0f} | {g['us_per_mail']:.1f} |"
                      for g in table["groups"] if g["us_per_mail"] >= 0.5]
            lines += [""]
        stages = list(profile["stages"])
        lines += [f"| across the groups, µs per mail | {' | '.join(stages)} |", "|---" * (len(stages) + 1) + "|"]
        lines += [f"| {name} | {' | '.join(str(profile['stages'][st]['across_us_per_mail'][name]) for st in stages)} |"
                  for name in ACROSS]
        lines += [""]
    count = result.get("count")
    if count:
        tables: dict[str, dict[str, dict[str, float]]] = {"AMQP": {}, "msgpack": {}, "Redis": {}}
        for process, counts in count["per_mail"].items():
            for kind, title in (("amqp", "AMQP"), ("msgpack", "msgpack"), ("redis", "Redis")):
                for key, value in counts[kind].items():
                    tables[title].setdefault(key, {})[process] = value
        processes = sorted(count["per_mail"])
        for title, table in ((f"{title} per mail", table) for title, table in tables.items()):
            lines += [f"| {title} | {' | '.join(processes)} |", "|---" * (len(processes) + 1) + "|"]
            lines += [f"| {key} | {' | '.join(f'{row.get(p, 0):g}' if row.get(p) else '' for p in processes)} |"
                      for key, row in sorted(table.items())]
            lines += [""]
    broker = result.get("broker")
    if broker:
        lines += ["| through RabbitMQ | mails per message | RabbitMQ µs per mail (median; runs) | "
                  "client µs per mail (runs) |", "|---|---|---|---|"]
        lines += [f"| {name} | {case['mails_per_message']} | {case['rabbitmq_us_per_mail']} "
                  f"({', '.join(map(str, case['rabbitmq_us_per_mail_runs']))}) | "
                  f"{', '.join(map(str, case['client_us_per_mail_runs']))} |" for name, case in broker["cases"].items()]
    floors = result.get("micro")
    if floors:
        lines += ["", "| CPU per call, this process | µs |", "|---|---|"]
        for section in ("codec_us_per_call", "address_check_us_per_new_address", "sent_marks_us_per_round_trip"):
            lines += [f"| {name} | {us} |" for name, us in floors[section].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mails", type=int, default=20_000, help="mails of the profiled run")
    parser.add_argument("--count-mails", type=int, default=5_000, help="mails of the counting run")
    parser.add_argument("--parts", default="profile,count,broker,micro")
    parser.add_argument("--markdown", action="store_true", help="also print the tables (to stderr)")
    args = parser.parse_args()
    os.chdir(ROOT)
    parts = set(args.parts.split(","))
    settings = Settings.from_env()
    result: dict[str, Any] = {"load_average": [round(x, 2) for x in os.getloadavg()]}
    with services_and_sink(settings) as port:
        if "profile" in parts:
            result["profile"] = run_profile(settings, args.mails, port)
        if "count" in parts:
            result["count"] = run_count(settings, args.count_mails, port)
    if "broker" in parts:
        result["broker"] = broker_cost(settings)
    if "micro" in parts:
        result["micro"] = micro(settings)
    print(json.dumps(result))
    if args.markdown:
        print(markdown(result), file=sys.stderr)


if __name__ == "__main__":
    main()
