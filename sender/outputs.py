"""What a finished delivery publishes, decided from its outcomes: no I/O here.

For each job: a ``sent`` event for its accepted recipients; for each refusal, what
``mailpipe/retry.py`` decides (a copy to its retry queue, or a dead letter, ``expired`` or
with the reply's category) and its event; and, for the mail not sent under this grant, one
new ungranted batch back to the limiter, refunding the tokens of the jobs nobody touched.
A batch's events go bundled: one message per routing key (``<outcome>.<tenant>``), each item a
whole event (``codec.decode_events`` reads either), since RabbitMQ's cost is per message (41.8 µs
for an event alone, 1.5 at 100 per message: docs/design-notes.md, "Where the time goes").
The sender stage publishes all of it in one confirmed call, then acks the batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from mailpipe import codec
from mailpipe.amqp import Outgoing
from mailpipe.model import Batch, Category, Event, Job, Outcome, derived_id, now_ms
from mailpipe.retry import Expire, Retry, RetryPolicy, Step, retry_step
from mailpipe.topology import Topology
from sender import metrics
from sender.delivery import BatchDelivery, JobOutcome
from sender.replies import SENT_REPLY, Reply

DeadLetter = Callable[..., Outgoing]  # Stage.dead_letter(body, reason, category, **headers)


class Outputs:
    def __init__(self, topology: Topology, policy: RetryPolicy, dead_letter: DeadLetter) -> None:
        self.topology = topology
        self.policy = policy
        self.dead_letter = dead_letter

    def of_delivery(self, batch: Batch, raws: list[bytes], jobs: list[Job], result: BatchDelivery,
                    owner: str) -> tuple[list[Outgoing], int]:
        """Everything a finished delivery publishes, and how many jobs it gives back."""
        outputs: list[Outgoing] = []
        for outcome in result.outcomes:
            outputs.extend(self.of_outcome(outcome, batch))
        outputs = bundle_events(outputs, self.topology.events)
        back = [i for i, o in enumerate(result.outcomes) if o.back]
        if back:
            outcomes = result.outcomes
            outputs.append(self.give_back(
                batch, [with_recipients(raws[i], outcomes[i]) for i in back],
                [replace(jobs[i], recipients=tuple(outcomes[i].back)) for i in back],
                result.stopped_by or "deadline", owner,
                refund=sum(1 for i in back if outcomes[i].refundable),
                refund_tenants=Counter(jobs[i].tenant for i in back if outcomes[i].refundable)))
        return outputs, len(back)

    def of_outcome(self, outcome: JobOutcome, batch: Batch) -> list[Outgoing]:
        job = outcome.job
        at_ms = outcome.at_ms or now_ms()
        out: list[Outgoing] = []
        sent = outcome.already_sent + outcome.sent
        if sent:  # already_sent too: an event lost with the holder that sent it is not lost
            out.append(self.event(job, batch, Outcome.SENT, sent, SENT_REPLY, at_ms))
            metrics.mails(job.server, Outcome.SENT, "").inc(len(outcome.sent))
        for reply, recipients in group({**outcome.deferred, **outcome.failed}):
            step = self.retry_step(job, tuple(recipients), reply, at_ms)
            if isinstance(step, Retry):
                outcome.retried.extend(recipients)  # released as "d": attempt + 1 carries them now
                body = codec.encode_job(step.job)  # a large job waits and comes back on jobs.large
                out.append(Outgoing(self.topology.retry_queue(step.job.attempt, len(body)), body,
                                    message_id=f"{job.id}:{step.job.attempt}", expiration_ms=step.expiration_ms))
                metrics.RETRIES.labels(job.server, str(min(step.job.attempt, 10))).inc(len(recipients))
                outcome_name, category = Outcome.DEFERRED, reply.category
            elif isinstance(step, Expire):
                out.append(self.dead(step.job, reply, Category.EXPIRED, step.reason))
                outcome_name, category = Outcome.EXPIRED, reply.category
            else:
                out.append(self.dead(step.job, reply, step.category, step.reason))
                outcome_name, category = Outcome.FAILED, step.category
            out.append(self.event(job, batch, outcome_name, recipients, reply, at_ms))
            metrics.mails(job.server, outcome_name, category).inc(len(recipients))
        return out

    def retry_step(self, job: Job, recipients: tuple[str, ...], reply: Reply, at_ms: int) -> Step:
        """``mailpipe/retry.py``'s decision, with the mail's age counted from when mailpipe took it
        in (``enqueued_ms``, the enqueue stage's clock), not from the publisher's ``created_ms``:
        a publisher's clock or unit must not dead-letter its mail at the first 4xx (greylisting
        answers every first mail so). A job made elsewhere, without ``enqueued_ms``, counts from
        ``created_ms`` as before. The copies it makes keep the publisher's ``created_ms``."""
        if not job.enqueued_ms or job.enqueued_ms == job.created_ms:
            return retry_step(job, recipients, reply, at_ms, self.policy)
        step = retry_step(replace(job, created_ms=job.enqueued_ms), recipients, reply, at_ms, self.policy)
        return step._replace(job=replace(step.job, created_ms=job.created_ms))

    def dead(self, job: Job, reply: Reply, category: str, reason: str) -> Outgoing:
        headers: dict[str, Any] = {
            "x-mailpipe-code": reply.code, "x-mailpipe-text": reply.text[:1000],
            "x-mailpipe-enhanced": reply.enhanced or "", "x-mailpipe-reply-category": reply.category,
            "x-mailpipe-advice": reply.advice, "x-mailpipe-tenant": job.tenant,
            "x-mailpipe-job-id": job.id, "x-mailpipe-server": job.server,
            "x-mailpipe-attempt": job.attempt}
        return self.dead_letter(codec.encode_job(job), reason, category, **headers)

    def event(self, job: Job, batch: Batch, outcome: str, recipients: list[str], reply: Reply,
              at_ms: int) -> Outgoing:
        event = Event(job_id=job.id, tenant=job.tenant, server=job.server, outcome=outcome,
                      recipients=tuple(recipients), attempt=job.attempt, created_ms=job.created_ms,
                      at_ms=at_ms, code=reply.code, text=reply.text[:1000], category=reply.category,
                      advice=reply.advice, batch_id=batch.id, findings=job.findings)
        return Outgoing(f"{outcome}.{job.tenant}", codec.encode_event(event), exchange=self.topology.events,
                        mandatory=False)

    def give_back(self, batch: Batch, raws: list[bytes], jobs: list[Job], reason: str, owner: str, *,
                  refund: int, refund_tenants: dict[str, int] | None = None) -> Outgoing:
        """Mail not sent under this grant, as a new ungranted batch; ``refund`` of its jobs give
        their tokens back to this batch's grant (the limiter applies that once per grant)."""
        back = Batch(id=derived_id(batch.id, f"{batch.grant_id}:{owner}:back"),
                     server=batch.server, jobs=tuple(raws), mails=len(raws),
                     bytes=sum(job.size for job in jobs), created_ms=batch.created_ms,
                     priority=batch.priority,  # transactional mail stays ahead after a give-back
                     refund=refund, tenants=dict(Counter(job.tenant for job in jobs)),
                     refund_of=batch.id if refund else None, refund_tenants=dict(refund_tenants or {}))
        metrics.REFUNDS.labels(batch.server, reason).inc(len(raws))
        return Outgoing(self.topology.batches, codec.encode_batch(back), message_id=back.id)


def bundle_events(outputs: list[Outgoing], exchange: str) -> list[Outgoing]:
    """``outputs`` with their events to ``exchange`` bundled: one message per routing key (at
    most ``codec.EVENTS_PER_BUNDLE`` events each), in the order of each key's first event, after
    the other outputs. A key with one event keeps it as it is (a plain event)."""
    others: list[Outgoing] = []
    by_key: dict[str, list[bytes]] = {}
    for out in outputs:
        if out.exchange == exchange:
            by_key.setdefault(out.routing_key, []).append(out.body)
        else:
            others.append(out)
    for key, bodies in by_key.items():
        for start in range(0, len(bodies), codec.EVENTS_PER_BUNDLE):
            chunk = bodies[start:start + codec.EVENTS_PER_BUNDLE]
            body = chunk[0] if len(chunk) == 1 else codec.encode_bundle("event", chunk)
            others.append(Outgoing(key, body, exchange=exchange, mandatory=False))
    return others


def with_recipients(raw: bytes, outcome: JobOutcome) -> bytes:
    """The job's bytes as they came, or re-encoded for the recipients still to send."""
    if list(outcome.back) == list(outcome.job.recipients):
        return raw
    return codec.encode_job(replace(outcome.job, recipients=tuple(outcome.back)))


def group(replies: dict[str, Reply]) -> list[tuple[Reply, list[str]]]:
    """Recipients that got the same reply, together: one retry copy or dead letter per reply."""
    groups: dict[Reply, list[str]] = {}
    for recipient, reply in replies.items():
        groups.setdefault(reply, []).append(recipient)
    return list(groups.items())
