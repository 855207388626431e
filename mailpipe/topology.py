"""Every queue and exchange of one pipeline, named under its namespace, declared idempotently.

All queues are durable quorum queues. The work queues dead-letter to ``<ns>.dead`` after
``delivery_limit`` deliveries (a poison message cannot loop forever), at least once (the
dead-lettered copy is confirmed before the original goes). Retry queues hold a 4xx-deferred
job for their TTL and then dead-letter it back to ``<ns>.jobs``. Each retry queue is named by
its delay, so changing the delays declares new queues rather than clashing with old ones.

Size classes: a request or job whose encoded body is over ``large_message_bytes`` (256 KiB)
travels on the ``.large`` sibling of its queue (``<ns>.intake.large``, ``<ns>.jobs.large``,
and the ``.large`` retry and scheduled queues, which dead-letter back to ``<ns>.jobs.large``).
RabbitMQ ignores a prefetch in bytes, so a stage's memory is bounded by prefetch count x the
largest message its queue can carry: the small queues keep their large prefetch for
throughput, the large ones are consumed with ``large_prefetch`` (4), and a stage holds at most
prefetch x 256 KiB + large_prefetch x 25 MiB of messages (docs/design-notes.md, "Operating
limits").

Prefetch and delivery limit go together: a stage that crashes gets its whole unacked window
redelivered, and each message in it counts one delivery. With a limit of 20, a message must
be in the window of 20 crashes before it is dead-lettered, so a poison message is caught
after 20 crashes while its innocent neighbours, redelivered far fewer times, are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from mailpipe.errors import ConfigError
from mailpipe.retry import delay_for, retry_delays
from mailpipe.settings import Settings

# Delay steps for mail scheduled with send_at: it waits in the longest step that fits, again
# and again, so it is released at most a second late however far ahead it was scheduled.
SCHEDULE_STEPS_S = (1, 10, 60, 600, 3600)

# Messages over this many encoded bytes go on the ``.large`` queues (MAILPIPE_LARGE_MESSAGE_BYTES).
LARGE_MESSAGE_BYTES = Settings.large_message_bytes
LARGE = ".large"

DEAD_REASON = "x-mailpipe-reason"
DEAD_STAGE = "x-mailpipe-stage"


@dataclass(frozen=True)
class Topology:
    namespace: str
    delivery_limit: int = 20
    retry_delays_s: tuple[int, ...] = (60,)
    large_message_bytes: int = LARGE_MESSAGE_BYTES
    quorum_group_size: int = 0  # members a new quorum queue starts with; 0: every node
    reports_keep_days: int = 30  # the inbound stage's raw reports, in a stream (issue 23)

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        return cls(namespace=settings.namespace, delivery_limit=settings.delivery_limit,
                   retry_delays_s=retry_delays(settings.retry_base_s, settings.retry_max_s),
                   large_message_bytes=settings.large_message_bytes,
                   quorum_group_size=settings.quorum_group_size,
                   reports_keep_days=settings.reports_keep_days)

    def is_large(self, size: int) -> bool:
        """Whether a message of ``size`` encoded bytes goes on the ``.large`` queues."""
        return size > self.large_message_bytes

    def _sized(self, queue: str, size: int) -> str:
        return f"{queue}{LARGE}" if self.is_large(size) else queue

    def _q(self, name: str) -> str:
        return f"{self.namespace}.{name}"

    @property
    def intake(self) -> str:
        return self._q("intake")

    @property
    def intake_large(self) -> str:
        return self._q("intake" + LARGE)

    def intake_for(self, size: int) -> str:
        """Where an intake request of ``size`` encoded bytes is published."""
        return self._sized(self.intake, size)

    @property
    def jobs(self) -> str:
        return self._q("jobs")

    @property
    def jobs_large(self) -> str:
        return self._q("jobs" + LARGE)

    def jobs_for(self, size: int) -> str:
        """Where a job of ``size`` encoded bytes is published."""
        return self._sized(self.jobs, size)

    @property
    def batches(self) -> str:
        return self._q("batches")

    @property
    def send(self) -> str:
        return self._q("send")

    @property
    def dead(self) -> str:
        return self._q("dead")

    @property
    def events(self) -> str:
        """A topic exchange; routing key ``<outcome>.<tenant>``."""
        return self._q("events")

    def schedule_queue(self, wait_ms: int, size: int = 0) -> str:
        """The delay queue for a job of ``size`` bytes not due for ``wait_ms``: the longest step
        that does not overshoot (a job comes back to ``jobs``, or ``jobs.large``, and is parked
        again until it is due)."""
        fitting = [d for d in SCHEDULE_STEPS_S if d * 1000 <= wait_ms] or [SCHEDULE_STEPS_S[0]]
        return self._sized(self._q(f"scheduled.{fitting[-1]}s"), size)

    def retry_delay_s(self, attempt: int) -> int:
        """The delay before a job's ``attempt``-th retry (1-based): mailpipe/retry.py's policy."""
        return delay_for(self.retry_delays_s, attempt)

    def retry_queue(self, attempt: int, size: int = 0) -> str:
        """The retry queue of a job of ``size`` bytes; it dead-letters back to ``jobs_for(size)``."""
        return self._sized(self._q(f"retry.{self.retry_delay_s(attempt)}s"), size)

    # -- the inbound stage (issue 23): reports in, the unreadable ones out, the raw ones kept ------
    @property
    def reports(self) -> str:
        """Raw reports (DSN, ARF, unsubscribes) the inbound stage's receiver took, to be read."""
        return self._q("reports")

    @property
    def reports_review(self) -> str:
        """Reports nothing could read or attribute: kept for a person, never dropped."""
        return self._q("reports.review")

    @property
    def reports_archive(self) -> str:
        """A stream: every raw report for reports_keep_days, for its tenant to see."""
        return self._q("reports.archive")

    @property
    def streams(self) -> tuple[str, ...]:
        """Streams (not in all_queues: a stream cannot be purged, and its depth is not a backlog)."""
        return (self.reports_archive,)

    @property
    def work_queues(self) -> tuple[str, ...]:
        return (self.intake, self.intake_large, self.jobs, self.jobs_large, self.batches, self.send)

    def _delay_queues(self) -> list[tuple[str, int, str]]:
        """(queue, TTL in seconds, where it dead-letters to) of every delay queue."""
        queues = []
        for size_class in ("", LARGE):
            back_to = self.jobs + size_class
            queues += [(self._q(f"retry.{d}s{size_class}"), d, back_to) for d in self.retry_delays_s]
            queues += [(self._q(f"scheduled.{d}s{size_class}"), d, back_to) for d in SCHEDULE_STEPS_S]
        return queues

    @property
    def all_queues(self) -> tuple[str, ...]:
        return (*self.work_queues, self.dead, *(queue for queue, _, _ in self._delay_queues()),
                self.reports, self.reports_review)

    def _quorum(self) -> dict[str, Any]:
        """Quorum queues: replicated by Raft, a publisher confirm means a majority has the message."""
        if self.quorum_group_size:
            return {"x-queue-type": "quorum", "x-quorum-initial-group-size": self.quorum_group_size}
        return {"x-queue-type": "quorum"}

    def _work_arguments(self) -> dict[str, Any]:
        """A work queue's: quorum, dead-lettered (at least once) after the delivery limit."""
        return {**self._quorum(), "x-dead-letter-exchange": "", "x-dead-letter-routing-key": self.dead,
                "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish",
                "x-delivery-limit": self.delivery_limit}

    def declare_lane(self, channel: BlockingChannel, queue: str) -> None:
        """A lane (mailpipe/lanes.py), declared by whoever publishes into it first: a work queue."""
        _declare(channel, queue, durable=True, arguments=self._work_arguments())

    def declare(self, channel: BlockingChannel) -> None:
        _declare(channel, self.dead, durable=True, arguments=self._quorum())
        for queue in self.work_queues:
            _declare(channel, queue, durable=True, arguments=self._work_arguments())
        for queue, delay_s, back_to in self._delay_queues():
            _declare(channel, queue, durable=True, arguments={
                **self._quorum(), "x-message-ttl": delay_s * 1000, "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": back_to, "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish"})
        self._declare_reports(channel, dead_letter_to=self.dead)
        channel.exchange_declare(self.events, exchange_type="topic", durable=True)

    def _declare_reports(self, channel: BlockingChannel, dead_letter_to: str) -> None:
        """The inbound stage's: a work queue, a review queue that never expires, the archive stream."""
        _declare(channel, self.reports, durable=True, arguments={
            **self._quorum(), "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead_letter_to,
            "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish",
            "x-delivery-limit": self.delivery_limit})
        _declare(channel, self.reports_review, durable=True, arguments=self._quorum())
        stream: dict[str, Any] = {"x-queue-type": "stream", "x-max-age": f"{self.reports_keep_days}D"}
        if self.quorum_group_size:
            stream["x-initial-cluster-size"] = self.quorum_group_size
        _declare(channel, self.reports_archive, durable=True, arguments=stream)


def _declare(channel: BlockingChannel, queue: str, durable: bool, arguments: dict[str, Any]) -> None:
    try:
        channel.queue_declare(queue, durable=durable, arguments=arguments)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise
        raise ConfigError(f"queue {queue} exists with other arguments ({exc.reply_text}): delete it, "
                          f"or use another MAILPIPE_NAMESPACE") from None
