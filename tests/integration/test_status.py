"""`mailpipe status --json` against real RabbitMQ and Redis: queues, limits and dead letters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mailpipe.amqp import Broker, Outgoing
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from tests.stages import settings_env

pytestmark = pytest.mark.integration


def test_status_shows_queues_limits_and_dead_letters_by_reason(settings: Settings) -> None:
    Path(settings.servers_file).write_text(
        '[servers.own]\naddress = "[127.0.0.1]:2525"\nrate_per_hour = 6000\n'
        '[tenants.acme]\nserver = "own"\ndaily_limit = 500\n', encoding="utf-8")
    topology = Topology.from_settings(settings)
    broker = Broker(settings.amqp_url, client_name="test").connect()
    topology.declare(broker.channel())
    broker.publish([Outgoing(topology.batches, b"waiting"),
                    *(Outgoing(topology.dead, b"x", headers={"x-mailpipe-category": c})
                      for c in ("invalid", "invalid", "spam_rejected"))])
    broker.close()

    done = subprocess.run([sys.executable, "-m", "mailpipe", "status", "--json"], env=settings_env(settings),
                          capture_output=True, text=True, timeout=60, check=True)
    status = json.loads(done.stdout)
    assert status["queues"][topology.batches] == 1
    assert status["dead_by_reason"] == {"invalid": 2, "spam_rejected": 1}
    rows = json.dumps(status["limits"])
    assert "6000" in rows and "500" in rows, rows
