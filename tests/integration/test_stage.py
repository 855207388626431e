"""The stage runner against a real RabbitMQ: a message that crashes a stage every time is
dead-lettered with the error on its last delivery, and the stage goes on with the rest."""

from __future__ import annotations

import threading

import pika
import pytest

from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.settings import Settings
from mailpipe.stage import Stage, run
from mailpipe.topology import DEAD_REASON, Topology

pytestmark = pytest.mark.integration


class Fragile(Stage):
    """Copies jobs to the batches queue, and crashes on any message that says "poison"."""

    name = "fragile"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.crashes = 0
        self.done = threading.Event()
        self.handled: list[bytes] = []

    @property
    def input_queue(self) -> str:
        return self.topology.jobs

    def handle(self, broker: Broker, deliveries: list[Delivery]) -> None:
        if any(b"poison" in d.body for d in deliveries):
            self.crashes += 1
            raise RuntimeError("a bug that this message sets off every time")
        broker.publish([Outgoing(self.topology.batches, d.body) for d in deliveries])
        for d in deliveries:
            broker.ack(d.tag)
        self.handled += [d.body for d in deliveries]
        if len(self.handled) == 3:
            self.done.set()


def test_a_poison_message_is_dead_lettered_with_the_error_and_the_others_pass(settings: Settings) -> None:
    settings = settings.replace(delivery_limit=3, reconnect_max_s=0.2)
    topology = Topology.from_settings(settings)
    broker = Broker(settings.amqp_url, client_name="test").connect()
    topology.declare(broker.channel())
    broker.publish([Outgoing(topology.jobs, body) for body in (b"one", b"poison", b"two", b"three")])
    broker.close()

    stage = Fragile(settings)
    assert run(stage, stop=lambda: stage.done.is_set() and stage.crashes > 0) == 0

    assert sorted(stage.handled) == [b"one", b"three", b"two"]
    assert stage.crashes == settings.delivery_limit + 1, "one crash per delivery, the last one caught"
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    method, props, body = conn.channel().basic_get(topology.dead, auto_ack=True)
    conn.close()
    assert method is not None and body == b"poison"
    reason = props.headers[DEAD_REASON]
    assert "fragile failed on this message 4 times" in reason
    assert "RuntimeError: a bug that this message sets off every time" in reason


def test_sigterm_during_start_up_is_a_clean_exit(settings: Settings) -> None:
    """A rolling restart may stop a replica that is still importing: that is exit 0 too."""
    import signal
    import subprocess
    import sys
    import time

    from tests.stages import settings_env

    proc = subprocess.Popen([sys.executable, "-m", "mailpipe", "run", "packer"], env=settings_env(settings),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.15)  # the interpreter is up; the stage is not yet
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
