"""``mailpipe dead list|replay``: look at failed mail and send it again.

A dead letter keeps the original bytes and says why it is there: our stages set
``x-mailpipe-reason``/``-stage``/``-category``; RabbitMQ's own dead-lettering (the delivery
limit) sets ``x-first-death-queue``/``-reason``. Replay publishes the bytes back to the queue
they came from (confirmed), then acks the dead letter; what does not match stays.
"""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass
from typing import Any

from mailpipe.amqp import Broker, Outgoing
from mailpipe.settings import Settings
from mailpipe.topology import DEAD_REASON, DEAD_STAGE, Topology


@dataclass(frozen=True)
class DeadLetter:
    tag: int
    body: bytes
    headers: dict[str, Any]

    def _text(self, name: str) -> str:
        value = self.headers.get(name, "")
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    @property
    def reason(self) -> str:
        return self._text(DEAD_REASON) or f"rabbitmq: {self._text('x-first-death-reason')}"

    @property
    def stage(self) -> str:
        return self._text(DEAD_STAGE)

    @property
    def category(self) -> str:
        return self._text("x-mailpipe-category") or self._text("x-first-death-reason")

    @property
    def tenant(self) -> str:
        return self._text("x-mailpipe-tenant")

    @property
    def job_id(self) -> str:
        return self._text("x-mailpipe-job-id")

    @property
    def at(self) -> str:
        ms = self.headers.get("x-mailpipe-at-ms")
        if isinstance(ms, int):
            return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        return ""

    def origin(self, topology: Topology) -> str:
        """The queue to replay into."""
        first = self._text("x-first-death-queue")
        if first:
            return first
        return {"producer": topology.intake, "packer": topology.jobs, "limiter": topology.batches,
                "sender": topology.jobs}.get(self.stage, topology.intake)


def _fetch_all(broker: Broker, topology: Topology, limit: int) -> list[DeadLetter]:
    """Take up to ``limit`` dead letters without acking them (closing the channel returns them)."""
    channel = broker.channel()
    letters: list[DeadLetter] = []
    while len(letters) < limit:
        method, properties, body = channel.basic_get(topology.dead, auto_ack=False)
        if method is None:
            break
        letters.append(DeadLetter(method.delivery_tag, body, dict(properties.headers or {})))
    return letters


def list_dead(settings: Settings, limit: int = 50) -> int:
    topology = Topology.from_settings(settings)
    broker = Broker(settings.amqp_url, client_name="mailpipe-dead").connect()
    try:
        topology.declare(broker.channel())
        total = broker.channel().queue_declare(topology.dead, passive=True).method.message_count
        letters = _fetch_all(broker, topology, limit)
    finally:
        broker.close()
    print(f"{total} dead letter(s) in {topology.dead}" + (f", first {len(letters)}:" if letters else ""))
    for d in letters:
        print(f"{d.at:19}  {d.stage or '-':8}  {d.category or '-':14}  {d.tenant or '-':12}  "
              f"{d.job_id or '-':32}  {d.reason}")
    return 0


def replay(settings: Settings, reason: str | None = None, tenant: str | None = None) -> int:
    topology = Topology.from_settings(settings)
    broker = Broker(settings.amqp_url, client_name="mailpipe-dead").connect()
    replayed = 0
    try:
        topology.declare(broker.channel())
        total = broker.channel().queue_declare(topology.dead, passive=True).method.message_count
        for d in _fetch_all(broker, topology, total):
            if (reason and reason not in d.reason) or (tenant and tenant != d.tenant):
                continue
            broker.publish([Outgoing(d.origin(topology), d.body, headers={"x-mailpipe-replayed": 1})])
            broker.ack(d.tag)
            replayed += 1
    finally:
        broker.close()
    print(f"replayed {replayed} dead letter(s)", file=sys.stderr)
    return 0
