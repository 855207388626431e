"""The packer stage: jobs -> batches, into their lanes.

Consume jobs; a job scheduled for later (``send_at``) is parked in a delay queue until it is
due; the others are grouped per SMTP server, tenant and priority; when a batch closes (500 mails,
80 MB, or its linger), publish it into its lane (``mailpipe/lanes.py``: the server's queue for
that tenant and priority), confirmed, and only then ack the jobs it holds. The jobs' bytes are
forwarded as they came, never re-encoded.

Jobs come from two queues, one open batch per server, tenant and priority for both: ``jobs`` (each at
most ``large_message_bytes``, 1,000 unacked) and ``jobs.large`` (up to 25 MiB each, 4 unacked),
so the jobs held are at most 1,000 x 256 KiB + 4 x 25 MiB whatever their sizes. A parked job
goes to the delay queue of its size class, which brings it back to the queue it came from.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Histogram

from mailpipe import redis_client
from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.codec import decode_job, encode_batch
from mailpipe.errors import InvalidMessage, RedisUnavailable
from mailpipe.lanes import LaneBatch, LanePublisher, lane_id
from mailpipe.model import Batch, Category, new_id, now_ms
from mailpipe.settings import Settings
from mailpipe.stage import Stage
from packer.packing import OpenBatch, Packer

log = logging.getLogger(__name__)

BATCH_MAILS = Histogram("mailpipe_batch_mails", "Mails per batch the packer closed.", ["server"],
                        buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000))
PARKED = Counter("mailpipe_packer_scheduled_total", "Jobs parked in a delay queue until their send_at.")
BATCH_BYTES = Histogram("mailpipe_batch_bytes", "Bytes per batch the packer closed.", ["server"],
                        buckets=(1e4, 1e5, 1e6, 5e6, 1e7, 2e7, 4e7, 6e7, 8e7, 1e8))


class PackerStage(Stage):
    name = "packer"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.packer = self._new_packer()
        self.redis = redis_client.connect(settings)
        self.lanes = LanePublisher(self.redis, settings.namespace, self.topology,
                                   wait_replicas=settings.redis_wait_replicas)
        self._redis_warned = False

    def _new_packer(self) -> Packer:
        s = self.settings
        return Packer(s.max_batch_mails, s.max_batch_bytes, s.linger_ms / 1000)

    @property
    def input_queue(self) -> str:
        return self.topology.jobs

    @property
    def prefetch(self) -> int:
        # A batch can only fill if its jobs fit the unacked window at once.
        return max(self.settings.prefetch, 2 * self.settings.max_batch_mails)

    @property
    def inputs(self) -> list[tuple[str, int]]:
        return [(self.topology.jobs, self.prefetch), (self.topology.jobs_large, self.settings.large_prefetch)]

    def start(self, broker: Broker) -> None:
        self.packer = self._new_packer()  # what it held is being redelivered

    def handle(self, broker: Broker, deliveries: list[Delivery]) -> None:
        now, wall_ms = time.monotonic(), now_ms()
        closed: list[OpenBatch] = []
        set_aside: list[tuple[Delivery, Outgoing]] = []  # dead letters and parked jobs
        for delivery in deliveries:
            try:
                job = decode_job(delivery.body)
                if not self.packer.fits_alone(job.size):
                    raise InvalidMessage(f"job.message: {job.size} bytes can never fit a "
                                         f"{self.settings.max_batch_bytes}-byte batch")
            except InvalidMessage as exc:
                set_aside.append((delivery, self.dead_letter(delivery.body, exc.reason, Category.INVALID)))
                continue
            if job.send_at_ms is not None and job.send_at_ms > wall_ms:  # "not before", never early
                PARKED.inc()
                queue = self.topology.schedule_queue(job.send_at_ms - wall_ms, len(delivery.body))
                set_aside.append((delivery, Outgoing(queue, delivery.body, message_id=job.id)))
                continue
            closed += self.packer.add(job.server, job.tenant, delivery.body, job.size, delivery.tag, now,
                                      priority=job.priority)
        if set_aside:
            broker.publish([out for _, out in set_aside])
            broker.ack_all(delivery.tag for delivery, _ in set_aside)
        self.ship(broker, closed)

    def tick(self, broker: Broker) -> None:
        self.ship(broker, self.packer.due(time.monotonic()))
        self.lanes.mark_pending()

    def drain(self, broker: Broker, deadline: float) -> None:
        self.ship(broker, self.packer.close_all())

    def busy(self) -> bool:
        return self.packer.held > 0

    def close(self) -> None:
        self.redis.close()

    def ship(self, broker: Broker, closed: list[OpenBatch]) -> None:
        """Publish the closed batches, confirmed, then ack their jobs: in rounds of at most one
        full batch's bytes (small batches still share a confirm), so the encoded copies in
        memory are one batch's worth, not every batch one poll closed."""
        group: list[OpenBatch] = []
        size = 0
        for open_batch in closed:
            if group and size + open_batch.bytes > self.settings.max_batch_bytes:
                self._ship(broker, group)
                group, size = [], 0
            group.append(open_batch)
            size += open_batch.bytes
        if group:
            self._ship(broker, group)

    def _ship(self, broker: Broker, closed: list[OpenBatch]) -> None:
        """Into each batch's lane (its server's queue for its tenant and priority), so that the
        limiter sees every tenant's backlog; while Redis does not answer, to ``batches``, which
        the limiter routes into the lanes once it does. Then the jobs are acked."""
        batches = [Batch(id=new_id(), server=b.server, jobs=tuple(b.jobs), mails=b.mails, bytes=b.bytes,
                         created_ms=now_ms(), tenants=dict(b.tenants), priority=b.priority) for b in closed]
        encoded = [encode_batch(b) for b in batches]
        try:
            self.lanes.publish(broker, [LaneBatch(b.server, lane_id(next(iter(b.tenants)), b.priority), b.mails,
                                                  body, b.id) for b, body in zip(batches, encoded, strict=True)])
        except RedisUnavailable as exc:
            if not self._redis_warned:
                log.warning("%s: batches go to %s until Redis answers", exc.reason, self.topology.batches)
            self._redis_warned = True
            broker.publish([Outgoing(self.topology.batches, body, message_id=b.id)
                            for b, body in zip(batches, encoded, strict=True)])
        else:
            self._redis_warned = False
        broker.ack_all(tag for open_batch in closed for tag in open_batch.tags)
        for batch in batches:
            BATCH_MAILS.labels(batch.server).observe(batch.mails)
            BATCH_BYTES.labels(batch.server).observe(batch.bytes)
            log.debug("batch %s: %d mails, %d bytes for %s", batch.id, batch.mails, batch.bytes,
                      batch.server)
