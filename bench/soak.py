"""Memory over a long run: every stage's RSS under a steady load, to Postfix's smtp-sink.

    python bench/soak.py [--minutes 10] [--rate 500]   (make bench runs it; prints one JSON object)

Publishes ``rate`` mails of 2 KB a second, evenly, for ``minutes``, through all four stages
as separate processes, and samples each stage's RSS (and mails passed on) every 5 s. Bounded
caches fill in the first minutes (the intake's address cache holds 65,536 addresses, three
minutes of distinct recipients at 500/s); a leak goes on growing. So RSS must stay flat over
the second half of the run: ``flat`` is true when no stage grew by more than 5% (or 5 MB,
whichever is larger) from halfway to its end.
``bench/out/soak_rss.png`` draws RSS per stage over the run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from charts import rss_png
from pipeline import ROOT, services_and_sink

from mailpipe.demo import run_pipeline
from mailpipe.settings import Settings


def growth(points: list[tuple[float, float, float]]) -> dict[str, float]:
    if not points:
        return {}
    halfway = points[-1][0] / 2
    second_half = [rss for t, _, rss in points if t >= halfway]
    first = second_half[0]
    return {"halfway_mb": round(first, 1), "end_mb": round(second_half[-1], 1),
            "max_mb": round(max(rss for _, _, rss in points), 1),
            "second_half_growth_mb": round(second_half[-1] - first, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=500.0, help="mails published per second")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="where the PNG goes")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env()
    mails = int(args.rate * args.minutes * 60)
    quiet = open("/dev/null", "w")  # noqa: SIM115 (lives as long as the run)
    with services_and_sink(settings) as port:
        summary, codes, _ = run_pipeline(settings, mails, 2048, None, smtp_port=port, out=quiet,
                                         publish_per_s=args.rate, sample_every_s=5.0,
                                         timeout_s=args.minutes * 60 + 600)
    samples = summary.get("samples", {})
    chart = args.out / "soak_rss.png"
    rss_png(samples, chart, f"RSS per stage, {args.rate:,.0f} mails/s for {args.minutes:g} minutes")
    stages = {stage: growth(points) for stage, points in samples.items()}
    flat = bool(stages) and all(
        g and g["second_half_growth_mb"] <= max(5.0, 0.05 * g["halfway_mb"]) for g in stages.values())
    print(json.dumps({
        "minutes": args.minutes, "rate_per_s": args.rate, "mails": mails, "sent": summary["sent"],
        "failed": summary["failed"], "mails_per_s": summary["mails_per_s"], "p99_ms": summary["p99_ms"],
        "rss": stages, "flat": flat, "clean_exit": all(c == 0 for c in codes.values()),
        "chart": str(chart.relative_to(ROOT) if chart.is_relative_to(ROOT) else chart),
    }))


if __name__ == "__main__":
    main()
