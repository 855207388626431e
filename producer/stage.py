"""The enqueue stage: intake -> jobs.

Consume intake requests; decode and validate them; route each to its tenant's SMTP server;
render the RFC 5322 message once (every later size is exact); publish the jobs, confirmed;
then ack. A request that fails any check goes to the dead-letter queue with a reason that
names the problem, and the stage goes on.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter

from mailpipe import metrics
from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.codec import decode_intake, encode_job
from mailpipe.errors import ConfigError, InvalidMessage
from mailpipe.model import IntakeRequest, Job, now_ms
from mailpipe.servers import Config, ConfigWatcher
from mailpipe.settings import Settings
from mailpipe.stage import Stage
from producer.compose import render, validate

log = logging.getLogger(__name__)

REJECTS = Counter("mailpipe_intake_rejects_total", "Intake requests refused, by reason.", ["reason"])


class EnqueueStage(Stage):
    name = "producer"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.config = ConfigWatcher(settings.servers_path)

    @property
    def input_queue(self) -> str:
        return self.topology.intake

    def handle(self, broker: Broker, deliveries: list[Delivery]) -> None:
        config = self.config.current()
        out: list[Outgoing] = []
        for delivery in deliveries:
            try:
                job = self.to_job(decode_intake(delivery.body, self.settings.max_message_bytes), config)
            except InvalidMessage as exc:
                REJECTS.labels("invalid").inc()
                out.append(self.dead_letter(delivery.body, exc.reason, "invalid"))
            except ConfigError as exc:
                REJECTS.labels("routing").inc()
                out.append(self.dead_letter(delivery.body, exc.reason, "routing"))
            else:
                out.append(Outgoing(self.topology.jobs, encode_job(job), message_id=job.id))
        broker.publish(out)
        metrics.MESSAGES_OUT.labels(self.name, self.topology.jobs).inc(
            sum(1 for o in out if o.routing_key == self.topology.jobs))
        broker.ack(deliveries[-1].tag, multiple=True)

    def to_job(self, req: IntakeRequest, config: Config) -> Job:
        recipients = validate(req, self.settings.max_message_bytes, self.settings.max_recipients)
        tenant = config.tenant(req.tenant)
        server = config.server(req.server or tenant.server)
        message = render(req, req.id)
        if len(message) > self.settings.max_message_bytes:
            raise InvalidMessage(f"message: {len(message)} bytes rendered, over the "
                                 f"{self.settings.max_message_bytes}-byte limit")
        return Job(
            id=req.id, tenant=tenant.name, server=server.name, sender=req.sender,
            recipients=recipients, message=message, created_ms=req.created_ms,
            enqueued_ms=now_ms(), idempotency_key=req.idempotency_key,
        )
