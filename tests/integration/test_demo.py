"""``mailpipe demo``'s engine (run_pipeline) end to end: the four stages as processes, the local
sink, the summary, and the per-stage samples the benchmarks draw."""

from __future__ import annotations

import io

import pytest

from mailpipe.demo import run_pipeline
from mailpipe.settings import Settings

pytestmark = pytest.mark.integration


def test_run_pipeline_delivers_every_mail_and_samples_each_stage(amqp_url: str, redis_url: str) -> None:
    settings = Settings(amqp_url=amqp_url, redis_url=redis_url)
    out = io.StringIO()
    summary, codes, progress = run_pipeline(settings, 300, 1024, None, timeout_s=120, out=out,
                                            sample_every_s=0.2, linger_ms=100)
    assert (summary["sent"], summary["failed"], summary["received"]) == (300, 0, 300), out.getvalue()
    assert codes == dict.fromkeys(("producer", "packer", "limiter", "sender"), 0)
    assert len(progress.latencies_ms) == 300 and summary["p99_ms"] > 0
    samples = summary["samples"]
    assert set(samples) == set(codes)
    for stage, points in samples.items():
        mails = [m for _, m, _ in points]
        assert mails == sorted(mails) and mails[-1] == 300, (stage, mails)  # the last: as the run ends
        assert all(rss > 10 for _, _, rss in points), stage  # a Python process: tens of MB
    assert all(usage["cpu_s"] > 0 and usage["peak_rss_mb"] > 10 for usage in summary["stages"].values())
