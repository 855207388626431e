"""The whole pipeline's throughput, latency and cost, to Postfix's smtp-sink on this machine.

    python bench/pipeline.py [--mails 20000]   (make bench runs it; prints one JSON object)

- throughput: N mails of 2 KB through all four stages as separate processes, limits lifted,
  from the first publish to the last 250, beside the raw aiosmtplib-to-smtp-sink figure of
  the same run (8 connections) and their ratio;
- latency: p50/p99 enqueue-to-250 at half that load, published evenly;
- the seed's batch: 500 mails of 160 KB (80 MB) as one batch, packed, granted and delivered,
  in seconds (the median of three runs);
- CPU per mail per stage (user + system microseconds) and peak RSS per stage;
- ``bench/out/pipeline_throughput.png``: mails per second per stage over the full-load run,
  from each stage's /metrics, sampled every half second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiosmtplib
from charts import throughput_png

from mailpipe.demo import run_pipeline
from mailpipe.services import ensure
from mailpipe.settings import Settings
from mailpipe.sink import free_port

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mails", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="where the PNG goes")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env()
    quiet = open("/dev/null", "w")  # noqa: SIM115 (lives as long as the run)
    with services_and_sink(settings) as port:
        raw = asyncio.run(raw_rate(port, 8000, 8, 2048))
        full, _, _ = run_pipeline(settings, args.mails, 2048, None, smtp_port=port, out=quiet,
                                  sample_every_s=0.5)
        half_rate = max(1.0, full["mails_per_s"] / 2)
        half, _, _ = run_pipeline(settings, min(args.mails, int(half_rate * 20)), 2048, None,
                                  smtp_port=port, publish_per_s=half_rate, out=quiet)
        # A linger of 5 s: the batch closes at 500 mails (80 MB), not on time. Three runs, the
        # median counts: now and then RabbitMQ pauses to roll its quorum-queue log over.
        bigs = [run_pipeline(settings, 500, 160 * 1024 - 2500, None, smtp_port=port, out=quiet,
                             linger_ms=5000)[0] for _ in range(3)]
        big = sorted(bigs, key=lambda run: float(run["seconds"]))[1]
    chart = args.out / "pipeline_throughput.png"
    throughput_png(full.get("samples", {}), chart,
                   f"{full['sent']:,} mails of 2 KB through four stages: mails per second per stage")
    print(json.dumps({
        "mails": full["sent"], "mails_per_s": full["mails_per_s"], "seconds": full["seconds"],
        "raw_aiosmtplib_8_connections_mails_per_s": round(raw, 1),
        "ratio_to_raw": round(full["mails_per_s"] / raw, 3),
        "half_load_mails_per_s": round(half_rate, 1), "half_load_p50_ms": half["p50_ms"],
        "half_load_p99_ms": half["p99_ms"],
        "batch_80mb_mails": big["sent"], "batch_80mb_batches": big["batches"],
        "batch_80mb_seconds": big["seconds"], "batch_80mb_runs_s": [run["seconds"] for run in bigs],
        "cpu_us_per_mail": per_mail_us(full, full["sent"] or 1),
        "peak_rss_mb": {s: u.get("peak_rss_mb") for s, u in full["stages"].items()},
        "chart": str(chart.relative_to(ROOT) if chart.is_relative_to(ROOT) else chart),
        "target_mails_per_s": 1500, "target_batch_80mb_s": 3.0, "target_half_load_p99_ms": 2000,
    }))


if __name__ == "__main__":
    main()
