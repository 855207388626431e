"""A stage started with a setting that cannot work exits at once with code 2, naming the
variable and the range that works (issue 21, item 4): before, it started and ran."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest

from mailpipe.settings import Settings
from tests.integration.test_sender import write_servers
from tests.stages import settings_env

pytestmark = pytest.mark.integration

_BAD = {
    "MAILPIPE_SEND_PREFETCH": ("0", "MAILPIPE_SEND_PREFETCH must be > 0, got 0"),
    "MAILPIPE_LIMITER_PREFETCH": ("0", "MAILPIPE_LIMITER_PREFETCH must be > 0, got 0"),
    "MAILPIPE_SENT_MARK_TTL_S": ("0", "MAILPIPE_SENT_MARK_TTL_S must be > MAILPIPE_WINDOW_S + "
                                      "MAILPIPE_SMTP_TIMEOUT_S (90, a claim's longest lease), got 0"),
    "MAILPIPE_IDEMPOTENCY_TTL_S": ("0", "MAILPIPE_IDEMPOTENCY_TTL_S must be > 0, got 0"),
    "MAILPIPE_LIMITER_PARK_S": ("0", "MAILPIPE_LIMITER_PARK_S must be > 0, got 0"),
    "MAILPIPE_SEND_MARGIN_S": ("60", "MAILPIPE_SEND_MARGIN_S must be below MAILPIPE_WINDOW_S (60), got 60"),
}
# A setting the limiter's rewrite removes (its park queues) leaves with its case.
BAD = {name: case for name, case in _BAD.items()
       if name in {f"MAILPIPE_{f.name.upper()}" for f in dataclasses.fields(Settings)}}


def test_each_setting_that_cannot_work_stops_the_stage_with_code_2(settings: Settings) -> None:
    """All started at once (each is a Python start-up, about half a second of CPU), with
    everything else a sender needs in place: only the bad value can stop it."""
    write_servers(settings, 25)
    base = settings_env(settings.replace(window_s=60.0, smtp_timeout_s=30.0))
    procs = {name: subprocess.Popen([sys.executable, "-m", "mailpipe", "run", "sender"],
                                    env={**base, name: value}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name, (value, _) in BAD.items()}
    outcomes: dict[str, tuple[int | None, str]] = {}
    deadline = time.monotonic() + 20
    try:
        for name, proc in procs.items():
            try:
                out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
                outcomes[name] = (proc.returncode, out.decode(errors="replace"))
            except subprocess.TimeoutExpired:
                outcomes[name] = (None, "still running after 20 s")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    wrong = {name: got for name, got in outcomes.items()
             if got[0] != 2 or BAD[name][1] not in got[1]}
    assert not wrong, "\n".join(f"{name}={BAD[name][0]}: exit {code}, said {out[-500:]!r}"
                                for name, (code, out) in wrong.items())
