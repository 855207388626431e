"""MailpipeStageFailingClosed (deploy/prometheus/rules.yml): a stage that holds its input while
Redis does not answer (``mailpipe_failing_closed``, mailpipe/stage.py RedisOutage) alerts after a
minute, by stage and instance; a blip of a few seconds does not. promtool's rule unit tests, on
series written here (no services)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.tools import require_tool
from tests.unit.test_deploy import DEPLOY


def test_a_stage_failing_closed_for_a_minute_alerts_and_a_blip_does_not(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "prometheus")
    series = [  # a sample every 15 s
        {"series": 'mailpipe_failing_closed{stage="inbound",instance="inbound-0:9100"}', "values": "0 1x10"},
        {"series": 'mailpipe_failing_closed{stage="producer",instance="producer-0:9100"}', "values": "0 1 0x9"},
        {"series": 'mailpipe_failing_closed{stage="producer",instance="producer-1:9100"}', "values": "0x10"},
    ]
    summary = "inbound at inbound-0:9100 fails closed: Redis does not answer, its input waits unacked"
    tests = {"rule_files": [str(DEPLOY / "prometheus" / "rules.yml")], "evaluation_interval": "15s",
             "tests": [{"interval": "15s", "input_series": series, "alert_rule_test": [
                 {"eval_time": "45s", "alertname": "MailpipeStageFailingClosed", "exp_alerts": []},
                 {"eval_time": "2m", "alertname": "MailpipeStageFailingClosed", "exp_alerts": [{
                     "exp_labels": {"stage": "inbound", "instance": "inbound-0:9100", "severity": "critical"},
                     "exp_annotations": {"summary": summary}}]}]}]}
    path = tmp_path / "tests.yml"
    path.write_text(yaml.safe_dump(tests), encoding="utf-8")
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
