"""Run stages as the separate processes they are in production, for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path

from mailpipe.amqp import Broker
from mailpipe.settings import Settings
from mailpipe.topology import Topology


def settings_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for field in fields(settings):
        env[f"MAILPIPE_{field.name.upper()}"] = str(getattr(settings, field.name))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class StageProcesses:
    """``with StageProcesses(settings, log_dir, "producer", "packer", ...) as stages:`` starts each
    stage as ``python -m mailpipe run STAGE``; on exit, SIGTERM and wait for a clean exit."""

    def __init__(self, settings: Settings, log_dir: Path, *stages: str, replicas: int = 1,
                 metrics_ports: Mapping[str, int] | None = None) -> None:
        self.settings = settings
        # Stage -> first /metrics port; replica i of that stage serves on port + i.
        self.metrics_ports = dict(metrics_ports or {})
        self.log_dir = log_dir
        self.stages = stages
        self.replicas = replicas
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.exit_codes: dict[str, int] = {}

    def __enter__(self) -> StageProcesses:
        # As a deployment runs `mailpipe topology` first: the queues exist before anyone publishes.
        broker = Broker(self.settings.amqp_url, client_name="tests").connect()
        Topology.from_settings(self.settings).declare(broker.channel())
        broker.close()
        env = settings_env(self.settings)
        for stage in self.stages:
            for replica in range(self.replicas):
                name = f"{stage}-{replica}"
                port = self.metrics_ports.get(stage)
                metrics = ["--metrics-port", str(port + replica)] if port is not None else []
                with (self.log_dir / f"{name}.log").open("wb") as log:  # the child keeps its own copy
                    self.procs[name] = subprocess.Popen(
                        [sys.executable, "-m", "mailpipe", "run", stage, *metrics], env=env, stdout=log,
                        stderr=subprocess.STDOUT)
        return self

    def stop(self, timeout_s: float = 30.0) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                self.exit_codes[name] = proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                self.exit_codes[name] = -9
        return self.exit_codes

    def alive(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is None]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.log_dir.glob("*.log")))

    def __exit__(self, *_exc: object) -> None:
        self.stop()
