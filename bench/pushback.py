"""A server that pushes back (issue 22), followed down and back up. Prints JSON; draws
``bench/out/pushback.png``.

    python bench/pushback.py [--peer-per-min 120] [--peer-connections 2] [--times 5]
                             [--limited-s 300] [--quiet-s 20] [--step 0.05]

The peer (tests/smtp_peer.py) enforces a real limit, as a hosted relay's plan does: at most
``--peer-per-min`` mails in any 60 s (``451 4.7.1`` at RCPT above it) and ``--peer-connections``
sessions at once (``421 4.7.0`` at the greeting above it). The servers file says ``--times`` that
rate. Two limiter and two sender replicas (and a producer and a packer) run as processes.
After ``--limited-s`` the peer's limit is lifted; the run ends once the effective rate is back to
90% of the configured one (or after twice the recovery time the design notes give).

The pushback settings are production's but for the quiet period and step (``--quiet-s``,
``--step``; production: 300 s and 0.05), shortened so that a run takes minutes: recovery takes
(0.9 - e0) / step quiet periods, e0 the effective rate's share of the configured one at the lift.

Printed: the share of transactions the peer refused (deferred) after the first two minutes, and
in each minute; mails lost (published, never accepted, not waiting), received twice, dead-lettered;
the effective rate at the lift and the recovery time against its bound; connections refused. The
PNG shows the effective rate and the peer's accepted and refused mails per 10 s over time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# Run as a script, this file's folder (bench/, with its limiter.py) comes first on sys.path and
# would shadow the package of that name: drop it before importing the packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.smtp_peer

from mailpipe import redis_client  # noqa: E402
from mailpipe.amqp import Broker  # noqa: E402
from mailpipe.demo import delete_namespace, stage_env, wait_for_consumers  # noqa: E402
from mailpipe.model import IntakeRequest, new_id, now_ms  # noqa: E402
from mailpipe.pushback import Pushback  # noqa: E402
from mailpipe.services import ensure  # noqa: E402
from mailpipe.settings import Settings  # noqa: E402
from mailpipe.topology import Topology  # noqa: E402
from producer import Producer  # noqa: E402
from tests.smtp_peer import SmtpPeer  # noqa: E402

SERVER = "relay"
WARM_UP_S = 120.0
BUCKET_S = 10.0


def requests(n: int) -> list[IntakeRequest]:
    return [IntakeRequest(id=new_id(), tenant="acme", sender="hr@acme.example", created_ms=now_ms(),
                          to=(f"user{i}@example.com",), subject=f"Mail {i}", text="Hello.\n") for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer-per-min", type=int, default=120)
    parser.add_argument("--peer-connections", type=int, default=2)
    parser.add_argument("--times", type=float, default=5.0, help="the configured rate, in peer rates")
    parser.add_argument("--limited-s", type=float, default=300.0)
    parser.add_argument("--quiet-s", type=float, default=20.0)
    parser.add_argument("--step", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args()
    settings = Settings.from_env()
    problems = ensure(settings)
    if problems:
        sys.exit("; ".join(problems))
    namespace = f"bench-pushback-{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="mailpipe-pushback-"))
    settings = settings.replace(namespace=namespace)
    topology = Topology.from_settings(settings)
    conf_per_h = int(args.peer_per_min * 60 * args.times)
    # Enough mail to keep the server busy until the rate is back: the limited stretch at the
    # peer's pace, then the recovery at up to the configured rate.
    mails = int(args.peer_per_min * args.limited_s / 60 + conf_per_h / 3600 * args.quiet_s / args.step * 0.6)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    samples: list[tuple[float, float, int]] = []  # (time, effective mails/h, connection cap)
    stop = threading.Event()
    client = redis_client.connect(settings)
    pace = Pushback(client, namespace)

    def sample() -> None:
        while not stop.wait(1.0):
            state = pace.state([SERVER])[SERVER]
            samples.append((time.time(), float(state.get("eff") or conf_per_h), int(state.get("cap") or 0)))

    with SmtpPeer() as peer:
        peer.limit(args.peer_per_min, 60.0, args.peer_connections)
        servers_file = workdir / "servers.toml"
        servers_file.write_text(
            f'[servers.{SERVER}]\naddress = "[127.0.0.1]:{peer.port}"\ntls = "none"\nrate_per_hour = {conf_per_h}\n'
            f'\n[tenants.acme]\nserver = "{SERVER}"\ndaily_limit = 10000000\n', encoding="utf-8")
        env = stage_env(settings, namespace, servers_file, 200)
        env.update({"MAILPIPE_MAX_BATCH_MAILS": "50", "MAILPIPE_PUSHBACK_QUIET_S": str(args.quiet_s),
                    "MAILPIPE_PUSHBACK_STEP": str(args.step)})
        for name in ("producer", "packer", "limiter-0", "limiter-1", "sender-0", "sender-1"):
            with (workdir / f"{name}.log").open("wb") as log:
                procs[name] = subprocess.Popen([sys.executable, "-m", "mailpipe", "run", name.split("-")[0]],
                                               env=env, stdout=log, stderr=subprocess.STDOUT)
        broker = Broker(settings.amqp_endpoints, client_name="bench-pushback").connect()
        topology.declare(broker.channel())
        wait_for_consumers(broker, topology, procs)
        broker.close()  # idle for minutes otherwise: a fresh one counts the dead letters
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            t0 = time.time()
            with Producer(settings.amqp_url, namespace) as producer:
                batch = requests(mails)
                for first in range(0, mails, 500):
                    producer.publish_requests(batch[first:first + 500])
            time.sleep(max(0.0, t0 + args.limited_s - time.time()))  # the limited stretch, measured
            lifted_at = time.time()
            peer.limit(None)
            e0 = samples[-1][1] / conf_per_h if samples else 1.0
            bound_s = ((0.9 - e0) / args.step + 1) * args.quiet_s
            recovered_s = None
            while time.time() < lifted_at + 2 * bound_s + 60:
                if samples and samples[-1][0] > lifted_at and samples[-1][1] >= 0.9 * conf_per_h:
                    recovered_s = samples[-1][0] - lifted_at
                    break
                time.sleep(1.0)
            ended_at = time.time()
        finally:
            stop.set()
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            codes = {name: proc.wait(60) for name, proc in procs.items()}
            broker = Broker(settings.amqp_endpoints, client_name="bench-pushback").connect()
            dead = broker.message_count(topology.dead) or 0
            broker.close()
            delete_namespace(settings, topology)
            client.close()
        received = peer.messages
        refusals = peer.throttled

    accepted = sorted(m.time for m in received)
    refused = sorted(t for t, kind in refusals if kind == "rate")
    connections_refused = sum(1 for _, kind in refusals if kind == "connections")

    def share(lo: float, hi: float) -> float | None:
        a = sum(1 for t in accepted if lo <= t < hi)
        r = sum(1 for t in refused if lo <= t < hi)
        return round(r / (a + r), 4) if a + r else None

    twice = sum(1 for n in Counter(r for m in received for r in m.recipients).values() if n > 1)
    result = {
        "peer_per_min": args.peer_per_min, "peer_connections": args.peer_connections,
        "configured_per_min": conf_per_h / 60, "quiet_s": args.quiet_s, "step": args.step,
        "mails_published": mails, "limited_s": args.limited_s,
        "deferred_share_after_warm_up": share(t0 + WARM_UP_S, lifted_at),
        "deferred_share_per_minute": [share(t0 + 60 * k, min(t0 + 60 * (k + 1), lifted_at))
                                      for k in range(int((lifted_at - t0) // 60))],
        "accepted_per_min_while_limited": round(sum(1 for t in accepted if t0 + WARM_UP_S <= t < lifted_at)
                                                / max(1e-9, lifted_at - t0 - WARM_UP_S) * 60, 1),
        "connections_refused": connections_refused,
        "effective_share_at_lift": round(e0, 3), "recovery_bound_s": round(bound_s, 1),
        "recovered_to_90pct_s": round(recovered_s, 1) if recovered_s is not None else None,
        "received_twice": twice, "dead_letters": dead,
        "exit_codes": codes, "wall_s": round(ended_at - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    draw(samples, accepted, refused, t0, lifted_at, conf_per_h, args.peer_per_min, args.out / "pushback.png")
    print(json.dumps(result, indent=2))


def draw(samples: list[tuple[float, float, int]], accepted: list[float], refused: list[float], t0: float,
         lifted_at: float, conf_per_h: float, peer_per_min: int, path: Path) -> None:
    end = max([s[0] for s in samples] + accepted + [lifted_at]) - t0
    buckets = [k * BUCKET_S for k in range(int(end // BUCKET_S) + 1)]

    def per_min(times: list[float]) -> list[float]:
        counts = Counter(int((t - t0) // BUCKET_S) for t in times)
        return [counts.get(k, 0) * 60 / BUCKET_S for k in range(len(buckets))]

    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot([s[0] - t0 for s in samples], [s[1] / 60 for s in samples], label="effective rate (Redis)", color="C0")
    ax.step(buckets, per_min(accepted), where="post", label="accepted at the peer", color="C2")
    ax.step(buckets, per_min(refused), where="post", label="refused (451 4.7.1)", color="C3")
    ax.axhline(conf_per_h / 60, linestyle=":", color="grey", label="configured rate")
    ax.axhline(peer_per_min, linestyle="--", color="grey", label="the peer's limit (lifted later)")
    ax.axvline(lifted_at - t0, color="black", linewidth=0.8)
    ax.set_xlabel("seconds")
    ax.set_ylabel("mails per minute")
    ax.set_title("A server that pushes back: followed down, and back up once it lifts its limit")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
