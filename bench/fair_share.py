"""Fair share under a big backlog, at the SMTP server: the long variant of
tests/integration/test_fair_share.py. Prints JSON; draws ``bench/out/fair_share.png``.

    python bench/fair_share.py [--big 50000] [--small-tenants 1000] [--rate-per-s 50]
                               [--limiters 2] [--batch-mails 50] [--c-mails 3000]

Every stage runs as its own process (``--limiters`` limiter replicas) against the local
RabbitMQ and Redis, to a local SMTP sink that stamps each arrival. One server at
``--rate-per-s``; tenant a (weight 1) publishes ``--big`` mails in batches of ``--batch-mails``:
a backlog hundreds of times what the limiters hold (their peak is read from their /metrics and
printed). Once a is flowing and packed, c (weight 3) publishes ``--c-mails``, and the small
tenants (weight 1) arrive one mail each, spread over the time c takes.

Printed: c's share of the a + c arrivals in every 30 s window while both are backlogged (the
weights say 0.75), its worst; the small tenants' first-mail latency (p50, p99, max) beside the
bound (tenants waiting x T + linger, with the tenants waiting counted at each arrival); the most
mails the server received in any 1, 10 and 60 s against rate x w + burst; the limiters' peak of
batches held. The PNG shows each tenant's share of the server over time (a, c, and the small
tenants together), per 10 s.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Run as a script, this file's folder (bench/, with its limiter.py) comes first on sys.path and
# would shadow the package of that name: drop it before importing the packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from limiter.gcra import worst_window  # noqa: E402
from mailpipe.amqp import Broker  # noqa: E402
from mailpipe.demo import delete_namespace, stage_env, wait_for_consumers  # noqa: E402
from mailpipe.model import IntakeRequest, new_id, now_ms  # noqa: E402
from mailpipe.services import ensure  # noqa: E402
from mailpipe.settings import Settings  # noqa: E402
from mailpipe.sink import LocalSink, free_port  # noqa: E402
from mailpipe.topology import Topology  # noqa: E402
from producer import Producer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WINDOW_S = 30.0
C_WEIGHT = 3
LINGER_MS = 200


def servers_toml(port: int, rate_per_s: int, small: int) -> str:
    out = (f'[servers.fair-smtp]\naddress = "[127.0.0.1]:{port}"\ntls = "none"\nrate_per_hour = {rate_per_s * 3600}\n'
           '\n[tenants.a]\nserver = "fair-smtp"\ndaily_limit = 10000000\n'
           f'\n[tenants.c]\nserver = "fair-smtp"\ndaily_limit = 10000000\nweight = {C_WEIGHT}\n')
    return out + "".join(f'\n[tenants.s{i}]\nserver = "fair-smtp"\n' for i in range(small))


def requests(tenant: str, first: int, n: int) -> list[IntakeRequest]:
    return [IntakeRequest(id=new_id(), tenant=tenant, sender=f"hr@{tenant}.example", created_ms=now_ms(),
                          to=(f"{tenant}.{i}@example.com",), subject=f"Mail {i}", text="Hello.\n")
            for i in range(first, first + n)]


def scrape_held(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mailpipe_limiter_held_batches{"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big", type=int, default=50_000)
    parser.add_argument("--small-tenants", type=int, default=1000)
    parser.add_argument("--rate-per-s", type=int, default=50)
    parser.add_argument("--limiters", type=int, default=2)
    parser.add_argument("--batch-mails", type=int, default=50)
    parser.add_argument("--c-mails", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    settings = Settings.from_env()
    problems = ensure(settings)
    if problems:
        sys.exit("; ".join(problems))
    namespace = f"bench-fair-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="mailpipe-fair-"))
    rate, burst, window_s = args.rate_per_s, 2 * args.rate_per_s, 1.0
    settings = settings.replace(namespace=namespace)
    topology = Topology.from_settings(settings)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    held_peak = 0.0
    with LocalSink() as sink:
        servers_file = workdir / "servers.toml"
        servers_file.write_text(servers_toml(sink.port, rate, args.small_tenants), encoding="utf-8")
        env = stage_env(settings, namespace, servers_file, LINGER_MS)
        env.update({"MAILPIPE_MAX_BATCH_MAILS": str(args.batch_mails), "MAILPIPE_BURST_MAILS": str(burst),
                    "MAILPIPE_WINDOW_S": str(window_s), "MAILPIPE_SEND_MARGIN_S": "0.2",
                    "MAILPIPE_MINUTE_WINDOW_S": "0.5"})
        ports = {f"limiter-{i}": free_port() for i in range(args.limiters)}
        names = ["producer", "packer", *ports, "sender"]
        for name in names:
            stage = name.split("-")[0]
            extra = ["--metrics-port", str(ports[name])] if name in ports else []
            with (workdir / f"{name}.log").open("wb") as log:
                procs[name] = subprocess.Popen([sys.executable, "-m", "mailpipe", "run", stage, *extra], env=env,
                                               stdout=log, stderr=subprocess.STDOUT)
        broker = Broker(settings.amqp_endpoints, client_name="bench-fair").connect()
        topology.declare(broker.channel())
        wait_for_consumers(broker, topology, procs)
        broker.close()
        stop = threading.Event()

        def sample_held() -> None:
            nonlocal held_peak
            while not stop.wait(0.5):
                held_peak = max(held_peak, sum(scrape_held(p) for p in ports.values()))

        sampler = threading.Thread(target=sample_held, daemon=True)
        sampler.start()
        try:
            with Producer(settings.amqp_url, namespace) as producer:
                t0 = time.time()
                for first in range(0, args.big, 1000):
                    producer.publish_requests(requests("a", first, min(1000, args.big - first)))
                a_published_s = time.time() - t0
                while sum(1 for r in sink.snapshot() if r.sender.startswith("hr@a.")) < 3 * rate:
                    time.sleep(0.2)
                c_at = time.time()
                for first in range(0, args.c_mails, 500):
                    producer.publish_requests(requests("c", first, min(500, args.c_mails - first)))
                span_s = args.c_mails / (rate * 0.6)  # about the time c takes beside a and the small tenants
                rng = random.Random(7)
                arrivals = sorted((c_at + rng.random() * span_s, f"s{i}") for i in range(args.small_tenants))
                small_sent: dict[str, float] = {}
                for at, name in arrivals:
                    time.sleep(max(0.0, at - time.time()))
                    small_sent[name] = time.time()
                    producer.publish_requests(requests(name, 0, 1))
            deadline = time.time() + 10 * span_s
            while time.time() < deadline:
                got = sink.snapshot()
                c_count = sum(1 for r in got if r.sender.startswith("hr@c."))
                small = {r.sender.split("@")[1].split(".")[0] for r in got if r.sender.startswith("hr@s")}
                if c_count >= args.c_mails and len(small) >= args.small_tenants:
                    break
                time.sleep(0.5)
        finally:
            stop.set()
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            codes = {name: proc.wait(60) for name, proc in procs.items()}
            delete_namespace(settings, topology)
        received = sink.snapshot()

    def tenant(r: Any) -> str:
        return str(r.sender.split("@")[1].split(".")[0])

    times: dict[str, list[float]] = {}
    for r in received:
        times.setdefault(tenant(r), []).append(r.at)
    for t in times.values():
        t.sort()
    a, c = times.get("a", []), times.get("c", [])
    c_first, c_last = c[0], c[-1]
    shares = []
    for k in range(int(c_last - c_first - WINDOW_S) + 1):
        lo, hi = c_first + k, c_first + k + WINDOW_S
        nc = bisect.bisect_right(c, hi) - bisect.bisect_left(c, lo)
        na = bisect.bisect_right(a, hi) - bisect.bisect_left(a, lo)
        if na + nc:
            shares.append(nc / (na + nc))
    # The small tenants' first mail, against (tenants waiting at its publish) x T + linger.
    firsts = {name: ts[0] for name, ts in times.items() if name.startswith("s")}
    latencies, excess = [], []
    for name, sent in small_sent.items():
        if name not in firsts:
            continue
        waiting = 3 + sum(1 for other, s in small_sent.items() if s <= sent and firsts.get(other, 1e18) > sent)
        latency = firsts[name] - sent
        latencies.append(latency)
        excess.append(latency - (waiting / rate + LINGER_MS / 1000))
    latencies.sort()
    at_server = [(int(r.at * 1000), 1) for r in received]
    worst = {f"{w}s": worst_window(at_server, w * 1000) for w in (1, 10, 60)}
    bound = {f"{w}s": rate * w + burst for w in (1, 10, 60)}
    result = {
        "rate_per_s": rate, "burst": burst, "limiters": args.limiters, "batch_mails": args.batch_mails,
        "big_tenant_mails": args.big, "a_published_s": round(a_published_s, 1),
        "limiters_held_peak_batches": held_peak,
        "big_backlog_vs_held": round(args.big / args.batch_mails / max(held_peak, 1), 1),
        "c_mails": args.c_mails, "c_backlogged_s": round(c_last - c_first, 1),
        "c_share_windows": len(shares), "c_share_min": round(min(shares), 3) if shares else None,
        "c_share_max": round(max(shares), 3) if shares else None, "c_share_target": C_WEIGHT / (C_WEIGHT + 1),
        "c_share_within_5pct": bool(shares) and all(abs(s - 0.75) <= 0.05 for s in shares),
        "small_tenants": args.small_tenants, "small_served": len(firsts),
        "small_first_mail_s": {"p50": _pct(latencies, 50), "p99": _pct(latencies, 99),
                               "max": round(latencies[-1], 3) if latencies else None},
        "small_first_mail_within_bound": sum(1 for e in excess if e <= 0.5),
        "small_first_mail_worst_over_bound_s": round(max(excess), 3) if excess else None,
        "worst_window_at_server": worst, "bound": bound,
        "within_bound": all(worst[k] <= bound[k] for k in worst),
        "exit_codes": codes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    draw(times, c_first, args.out / "fair_share.png", rate)
    print(json.dumps(result, indent=2))


def _pct(values: list[float], p: int) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(len(values) * p / 100))], 3)


def draw(times: dict[str, list[float]], origin: float, path: Path, rate: int) -> None:
    """Each tenant's share of the server's arrivals per 10 s: a, c, and the small ones together."""
    groups = {"a (weight 1)": times.get("a", []), "c (weight 3)": times.get("c", []),
              "small tenants, together": sorted(t for name, ts in times.items() if name.startswith("s") for t in ts)}
    end = max((ts[-1] for ts in groups.values() if ts), default=origin)
    start = min((ts[0] for ts in groups.values() if ts), default=origin)
    edges = [start + 10 * k for k in range(int((end - start) / 10) + 2)]
    totals = [sum(bisect.bisect_left(ts, hi) - bisect.bisect_left(ts, lo) for ts in groups.values())
              for lo, hi in itertools.pairwise(edges)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, ts in groups.items():
        counts = [bisect.bisect_left(ts, hi) - bisect.bisect_left(ts, lo) for lo, hi in itertools.pairwise(edges)]
        ax.plot([e - origin for e in edges[:-1]], [n / t if t else 0 for n, t in zip(counts, totals, strict=True)],
                label=label, linewidth=1.4)
    a_counts, c_counts = ([bisect.bisect_left(ts, hi) - bisect.bisect_left(ts, lo)
                           for lo, hi in itertools.pairwise(edges)]
                          for ts in (groups["a (weight 1)"], groups["c (weight 3)"]))
    both = [(e - origin, c / (a + c)) for e, a, c in zip(edges, a_counts, c_counts, strict=False) if a and c]
    ax.plot([x for x, _ in both], [y for _, y in both], label="c / (a + c): the weights say 0.75", linewidth=1.0,
            linestyle=":", color="black")
    ax.axhline(0.75, color="grey", linewidth=0.6, linestyle="--")
    ax.set(title=f"Each tenant's share of the server ({rate} mails/s), per 10 s; c starts at 0",
           xlabel="seconds", ylabel="share of arrivals", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
