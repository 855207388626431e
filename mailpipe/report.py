"""``mailpipe report``: the send rate per server next to its limit, and the queue depths, from a
Prometheus, drawn into a PNG: the two top panels of the Grafana dashboard, for people who look
rather than read.

The expressions are the dashboard's (``deploy/grafana/mailpipe.json``; a test keeps them equal),
with Grafana's variables filled in the way Grafana does: every server, and a rate window of
four scrape intervals at least.
"""

from __future__ import annotations

import base64
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from mailpipe.errors import ConfigError, PrometheusError
from mailpipe.settings import redact_url

# (expression, legend) per panel, as in the dashboard, with $server and $__rate_interval.
SEND_RATE = (
    ('sum by (server) (rate(mailpipe_sender_mails_total{outcome="sent", server=~"$server"}'
     '[$__rate_interval])) * 3600', "{{server}} sent"),
    ('max by (server) (mailpipe_server_limit_mails_per_hour{server=~"$server"})', "{{server}} limit"),
)
QUEUE_DEPTHS = (
    ("max by (queue, state) (mailpipe_queue_messages)", "{{queue}} {{state}}"),
)


@dataclass(frozen=True)
class Series:
    legend: str
    times: list[float]  # unix seconds
    values: list[float]


def grafana_vars(expr: str, rate_window_s: int, server: str = ".*") -> str:
    """Fill in the dashboard's variables as Grafana would for "All" servers."""
    return expr.replace("$__rate_interval", f"{rate_window_s}s").replace("$server", server)


def rate_window_s(step_s: float, scrape_interval_s: float) -> int:
    """Grafana's ``$__rate_interval``: max(step + scrape interval, 4 x scrape interval)."""
    return math.ceil(max(step_s + scrape_interval_s, 4 * scrape_interval_s))


def legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def query_range(url: str, expr: str, start: float, end: float, step_s: float,
                timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """``/api/v1/query_range``: the matrix of ``expr``; a query Prometheus refuses raises."""
    params = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                     "step": f"{step_s:g}"})
    parts = urllib.parse.urlsplit(url.rstrip("/"))
    headers = {}
    if parts.username is not None:  # a Prometheus behind basic auth: urllib wants a header
        userinfo = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode()
        parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
    request = urllib.request.Request(f"{urllib.parse.urlunsplit(parts)}/api/v1/query_range?{params}",
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:  # 400 for a bad expression: Prometheus says why
        try:
            reason = json.load(exc).get("error", exc.reason)
        except ValueError:
            reason = exc.reason
        raise PrometheusError(f"Prometheus refused {expr!r}: {reason}") from None
    except (OSError, ValueError) as exc:
        raise PrometheusError(f"cannot query Prometheus at {redact_url(url)}: {exc}") from None
    if body.get("status") != "success":
        raise PrometheusError(f"Prometheus refused {expr!r}: {body.get('error')}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def fetch(url: str, panel: tuple[tuple[str, str], ...], start: float, end: float, step_s: float,
          window_s: int) -> list[Series]:
    series = []
    for expr, template in panel:
        for item in query_range(url, grafana_vars(expr, window_s), start, end, step_s):
            points = [(float(t), float(v)) for t, v in item["values"]]
            series.append(Series(legend(template, item["metric"]), [t for t, _ in points],
                                 [v for _, v in points]))
    return series


def render(send_rate: list[Series], depths: list[Series], out: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("mailpipe report needs matplotlib: pip install 'mailpipe[report]'") from None
    matplotlib.use("Agg")  # no display: a file
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    # A namespace has a dozen queues, most of them empty most of the time: draw the others.
    busy = [s for s in depths if any(v for v in s.values if math.isfinite(v))]
    queues_heading = "Queue depths"
    if len(busy) < len(depths):
        queues_heading += f" ({len(depths) - len(busy)} series empty throughout, not drawn)"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 8), sharex=True, constrained_layout=True)
    for ax, series, ylabel, heading in (
            (top, send_rate, "mails / hour", "Send rate per server, next to its limit"),
            (bottom, busy, "messages", queues_heading)):
        for s in series:
            style = "--" if s.legend.endswith(" limit") else "-"
            ax.plot([datetime.fromtimestamp(t) for t in s.times], s.values, style, label=s.legend)
        ax.set_title(heading)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
    bottom.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))  # type: ignore[no-untyped-call]
    fig.suptitle(title)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def report(url: str, out: Path, *, minutes: float = 60.0, end: float | None = None,
           step_s: float | None = None, scrape_interval_s: float = 15.0) -> dict[str, int]:
    """Write the PNG; return how many series each panel drew (the command prints it)."""
    end = time.time() if end is None else end
    start = end - minutes * 60
    # About 300 points across the picture, never finer than a scrape.
    step = step_s or max(scrape_interval_s, (end - start) / 300)
    window = rate_window_s(step, scrape_interval_s)
    send_rate = fetch(url, SEND_RATE, start, end, step, window)
    depths = fetch(url, QUEUE_DEPTHS, start, end, step, window)
    render(send_rate, depths, out, f"mailpipe, last {minutes:g} min, from {redact_url(url)}")
    return {"send_rate_series": len(send_rate), "queue_series": len(depths)}
