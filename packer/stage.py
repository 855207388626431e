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

Bundles (issue 24): the enqueue stage sends the jobs of a round in jobs bundles of up to 100
and 256 KiB (producer/bundles.py); retries and scheduled jobs come back from the delay queues
alone. Each job of a bundle is packed, parked or dead-lettered (with its own bytes) on its own,
and may land in a different batch from the others; the bundle's delivery is acked once every
one of its jobs is done (in a confirmed batch, parked, or dead-lettered): a count per delivery.
The jobs are views of the delivery's bytes (packer/bundles.py), so what the packer holds is
still the unacked deliveries' bytes. Batches carry each job's own bytes: the limiter and the
sender never see a bundle.
"""

from __future__ import annotations

import logging
import time
from typing import cast

from prometheus_client import Counter, Histogram

from mailpipe import redis_client
from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.codec import BUNDLES, decode_job, encode_batch, kind_of
from mailpipe.errors import InvalidMessage, RedisUnavailable
from mailpipe.lanes import LaneBatch, LanePublisher, lane_id
from mailpipe.model import Batch, Category, new_id, now_ms
from mailpipe.settings import Settings
from mailpipe.stage import Stage
from packer.bundles import item_views
from packer.packing import OpenBatch, Packer

log = logging.getLogger(__name__)

BATCH_MAILS = Histogram("mailpipe_batch_mails", "Mails per batch the packer closed.", ["server"],
                        buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000))
PARKED = Counter("mailpipe_packer_scheduled_total", "Jobs parked in a delay queue until their send_at.")
BATCH_BYTES = Histogram("mailpipe_batch_bytes", "Bytes per batch the packer closed.", ["server"],
                        buckets=(1e4, 1e5, 1e6, 5e6, 1e7, 2e7, 4e7, 6e7, 8e7, 1e8))
JOBS_BUNDLE = BUNDLES["job"]


class PackerStage(Stage):
    name = "packer"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.packer = self._new_packer()
        self.redis = redis_client.connect(settings)
        self.lanes = LanePublisher(self.redis, settings.namespace, self.topology,
                                   wait_replicas=settings.redis_wait_replicas)
        self._redis_warned = False
        # Deliveries not acked yet: by tag, how many of their jobs are not done (shipped in a
        # confirmed batch, parked or dead-lettered). A delivery is acked when its count is 0.
        self._open: dict[int, int] = {}

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
        self._open.clear()

    def handle(self, broker: Broker, deliveries: list[Delivery]) -> None:
        now, wall_ms = time.monotonic(), now_ms()
        closed: list[OpenBatch] = []
        set_aside: list[tuple[int, Outgoing]] = []  # dead letters and parked jobs, by delivery tag
        for delivery in deliveries:
            for body in self.jobs_of(delivery, set_aside):
                # A copy to decode (the codec reads bytes); the batch keeps the view.
                raw = body if isinstance(body, bytes) else bytes(body)
                try:
                    job = decode_job(raw)
                    if not self.packer.fits_alone(job.size):
                        raise InvalidMessage(f"job.message: {job.size} bytes can never fit a "
                                             f"{self.settings.max_batch_bytes}-byte batch")
                except InvalidMessage as exc:
                    set_aside.append((delivery.tag, self.dead_letter(raw, exc.reason, Category.INVALID)))
                    continue
                if job.send_at_ms is not None and job.send_at_ms > wall_ms:  # "not before", never early
                    PARKED.inc()
                    queue = self.topology.schedule_queue(job.send_at_ms - wall_ms, len(raw))
                    set_aside.append((delivery.tag, Outgoing(queue, raw, message_id=job.id)))
                    continue
                closed += self.packer.add(job.server, job.tenant, body, job.size, delivery.tag, now,
                                          priority=job.priority)
        if set_aside:
            broker.publish([out for _, out in set_aside])
            self.settle(broker, [tag for tag, _ in set_aside])
        self.ship(broker, closed)

    def jobs_of(self, delivery: Delivery, set_aside: list[tuple[int, Outgoing]]) -> list[bytes | memoryview]:
        """The jobs of a delivery: itself, or the items of its bundle (views of its bytes). A
        bundle that does not decode as one is a single dead letter, with its reason."""
        if kind_of(delivery.body) != JOBS_BUNDLE:  # a job alone (its decoder says what is wrong)
            self._open[delivery.tag] = 1
            return [delivery.body]
        try:
            views = item_views(delivery.body, "job")
        except InvalidMessage as exc:
            self._open[delivery.tag] = 1
            set_aside.append((delivery.tag, self.dead_letter(delivery.body, exc.reason, Category.INVALID)))
            return []
        self._open[delivery.tag] = len(views)
        return list(views)

    def settle(self, broker: Broker, tags: list[int]) -> None:
        """A job of each delivery in ``tags`` (once per job) is done: ack each delivery whose last
        job this was, in one write."""
        done = []
        for tag in tags:
            left = self._open[tag] - 1
            if left:
                self._open[tag] = left
            else:
                del self._open[tag]
                done.append(tag)
        if done:
            broker.ack_all(done)

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
        the limiter routes into the lanes once it does. Then their jobs are settled: each delivery
        is acked once its last job is done."""
        # A job of a bundle is a view of its delivery's bytes: msgpack packs it as the bin it
        # views, and these Batch objects are only encoded, here.
        batches = [Batch(id=new_id(), server=b.server, jobs=cast("tuple[bytes, ...]", tuple(b.jobs)), mails=b.mails,
                         bytes=b.bytes, created_ms=now_ms(), tenants=dict(b.tenants), priority=b.priority)
                   for b in closed]
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
        self.settle(broker, [tag for open_batch in closed for tag in open_batch.tags])
        for batch in batches:
            BATCH_MAILS.labels(batch.server).observe(batch.mails)
            BATCH_BYTES.labels(batch.server).observe(batch.bytes)
            log.debug("batch %s: %d mails, %d bytes for %s", batch.id, batch.mails, batch.bytes,
                      batch.server)
