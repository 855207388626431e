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


# -- where the CPU per mail goes (bench/pipeline.py, issue 24) -------------------------------------

PROCESSES = ("publisher", "producer", "packer", "limiter", "sender", "rabbitmq", "redis")


def cpu_png(runs: dict[str, dict[str, float]], path: Path, title: str, target_us: float | None = 700) -> None:
    """One horizontal bar per run (``runs[label][process]``: microseconds of CPU per delivered
    mail), a segment per process, the total at its end; the issue's target as a line."""
    labels = list(runs)
    fig, ax = plt.subplots(figsize=(10, 2.2 + 0.7 * len(labels)))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    left = [0.0] * len(labels)
    for i, process in enumerate(PROCESSES):
        widths = [float(runs[label].get(process) or 0.0) for label in labels]
        bars = ax.barh(labels, widths, left=left, color=colours[i % len(colours)], label=process)
        for bar, width in zip(bars, widths, strict=True):
            if width >= 40:
                ax.text(bar.get_x() + width / 2, bar.get_y() + bar.get_height() / 2, f"{width:.0f}",
                        ha="center", va="center", fontsize=8, color="white")
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for y, total in enumerate(left):
        ax.text(total + 8, y, f"{total:,.0f} µs", va="center", fontsize=9)
    if target_us:
        ax.axvline(target_us, color="black", linestyle="--", linewidth=1)
        ax.text(target_us, len(labels) - 0.45, f" target {target_us:.0f}", fontsize=8)
    ax.set_title(title, pad=28)
    ax.set(xlabel="µs of CPU (user + system) per delivered mail")
    ax.set_xlim(0, max([*left, target_us or 0]) * 1.15)
    ax.invert_yaxis()
    ax.legend(ncol=len(PROCESSES), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    # python bench/charts.py OUT.png RUN.json [RUN.json ...]: where the CPU per mail goes, from
    # bench/pipeline.py's JSON of each run (its file name is its label).
    import json
    import sys

    out, *files = sys.argv[1:]
    cpu_png({Path(f).stem: json.loads(Path(f).read_text())["system_cpu_us_per_mail"] for f in files}, Path(out),
            "CPU per delivered mail, every process of the system (µs)")


def groups_png(stages: dict[str, list[tuple[str, float]]], path: Path, title: str, min_us: float = 1.0) -> None:
    """Where each process's CPU per mail goes: a panel per process, a bar per cost group
    (microseconds per mail, the largest on top; groups under ``min_us`` left out)."""
    rows = {stage: [(g, us) for g, us in groups if us >= min_us] for stage, groups in stages.items()}
    heights = [max(len(r), 1) for r in rows.values()]
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 1.2 + 0.28 * sum(heights) + 0.5 * len(rows)),
                             gridspec_kw={"height_ratios": heights}, sharex=True, squeeze=False)
    top = max((us for r in rows.values() for _, us in r), default=1.0)
    for ax, (stage, groups) in zip(axes[:, 0], rows.items(), strict=True):
        total = sum(us for _, us in stages[stage])
        ax.barh([g for g, _ in groups], [us for _, us in groups], color="tab:blue")
        for y, (_, us) in enumerate(groups):
            ax.text(us + top * 0.01, y, f"{us:.0f}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{stage}: {total:.0f} µs per mail", fontsize=10, loc="left")
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("µs of CPU per delivered mail")
    axes[-1, 0].set_xlim(0, top * 1.12)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
