"""PNG charts of a benchmark's samples (``mailpipe.demo.Sampler``): mails per second per stage,
and RSS per stage, over time. Imported by the benchmarks; not a benchmark itself."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen here
import matplotlib.pyplot as plt

Samples = dict[str, list[tuple[float, float, float]]]  # stage -> [(seconds, mails, rss_mb)]


def rates(points: list[tuple[float, float, float]], window: int = 2) -> tuple[list[float], list[float]]:
    """Mails per second between samples ``window`` apart (a little smoothing), at their midpoints."""
    times, per_s = [], []
    for (t0, m0, _), (t1, m1, _) in zip(points, points[window:], strict=False):
        if t1 > t0:
            times.append((t0 + t1) / 2)
            per_s.append((m1 - m0) / (t1 - t0))
    return times, per_s


def throughput_png(samples: Samples, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for stage, points in samples.items():
        ax.plot(*rates(points), label=stage, linewidth=1.4)
    ax.set(title=title, xlabel="seconds", ylabel="mails per second")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rss_png(samples: Samples, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for stage, points in samples.items():
        ax.plot([t / 60 for t, _, _ in points], [rss for _, _, rss in points], label=stage, linewidth=1.4)
    ax.set(title=title, xlabel="minutes", ylabel="RSS (MB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
