"""The enqueue stage: intake -> jobs.

Consume intake requests; decode and validate them; route each to its tenant's SMTP server;
render the RFC 5322 message once (every later size is exact); publish the jobs, confirmed;
then ack. A request that fails any check goes to the dead-letter queue with a reason that
names the problem, and the stage goes on.

Idempotency: a job with an idempotency key is marked "queued" in Redis once its publish is
confirmed; a later request with the same key (a retrying upstream) is acked and dropped as
a duplicate. The mark is set after the confirm, never before, so a crash in between queues
the job twice rather than never (the sender's per-recipient marks catch that duplicate).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import cast

import redis
from prometheus_client import Counter

from mailpipe import metrics, suppression
from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.codec import decode_intake, encode_event, encode_job
from mailpipe.errors import ConfigError, InvalidMessage, LimiterUnavailable
from mailpipe.model import Event, IntakeRequest, Job, now_ms
from mailpipe.servers import Config, ConfigWatcher
from mailpipe.settings import Settings
from mailpipe.stage import Stage
from producer.compose import dkim_sign, render, validate
from producer.lint import RULES, lint, text_from_html

log = logging.getLogger(__name__)

REJECTS = Counter("mailpipe_intake_rejects_total", "Intake requests refused, by reason.", ["reason"])
LINT_FINDINGS = Counter("mailpipe_intake_lint_findings_total",
                        "Deliverability warnings found on queued mail, by rule.", ["rule"])
DUPLICATES = Counter("mailpipe_intake_duplicates_total",
                     "Intake requests dropped because their idempotency key was queued already.")


class EnqueueStage(Stage):
    name = "producer"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.config = ConfigWatcher(settings.servers_path)
        self.refuse = frozenset(r.strip() for r in settings.lint_refuse.split(",") if r.strip())
        unknown = self.refuse - set(RULES)
        if unknown:
            raise ConfigError(f"MAILPIPE_LINT_REFUSE: unknown rule(s) {sorted(unknown)}; "
                              f"known: {', '.join(RULES)}")
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5)

    @property
    def input_queue(self) -> str:
        return self.topology.intake

    def handle(self, broker: Broker, deliveries: list[Delivery]) -> None:
        config = self.config.current()
        out: list[Outgoing] = []
        jobs: list[Job] = []
        for delivery in deliveries:
            try:
                jobs.append(self.to_job(decode_intake(delivery.body, self.settings.max_message_bytes), config))
            except InvalidMessage as exc:
                REJECTS.labels("invalid").inc()
                out.append(self.dead_letter(delivery.body, exc.reason, "invalid"))
            except ConfigError as exc:
                REJECTS.labels("routing").inc()
                out.append(self.dead_letter(delivery.body, exc.reason, "routing"))
        jobs = self.drop_suppressed(jobs, out)
        duplicates = self.already_queued([j for j in jobs if j.idempotency_key is not None])
        DUPLICATES.inc(len(duplicates))
        queued = [j for j in jobs if j.id not in duplicates]
        out += [Outgoing(self.topology.jobs, encode_job(j), message_id=j.id) for j in queued]
        broker.publish(out)
        self.mark_queued([j for j in queued if j.idempotency_key is not None])
        metrics.MESSAGES_OUT.labels(self.name, self.topology.jobs).inc(len(queued))
        broker.ack(deliveries[-1].tag, multiple=True)

    def drop_suppressed(self, jobs: list[Job], out: list[Outgoing]) -> list[Job]:
        """Fail the recipients suppressed for their tenant (an event each; the whole job to the
        dead-letter queue when none is left); return the jobs with what remains."""
        if not jobs:
            return jobs
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for job in jobs:
                    pipe.mget([suppression.key(self.settings.namespace, job.tenant, r) for r in job.recipients])
                found = pipe.execute()
        except redis.RedisError as exc:
            raise LimiterUnavailable(f"Redis: cannot check suppressed recipients: {exc}") from exc
        kept = []
        for job, marks in zip(jobs, found, strict=True):
            blocked = {r: m.decode("utf-8", "replace") for r, m in zip(job.recipients, marks, strict=True) if m}
            if not blocked:
                kept.append(job)
                continue
            REJECTS.labels("suppressed").inc(len(blocked))
            reason = "suppressed: " + "; ".join(f"{r} ({why})" for r, why in blocked.items())
            out.append(Outgoing(f"failed.{job.tenant}", encode_event(Event(
                job_id=job.id, tenant=job.tenant, server=job.server, outcome="failed",
                recipients=tuple(blocked), attempt=job.attempt, created_ms=job.created_ms, at_ms=now_ms(),
                text=reason, category="suppressed", findings=job.findings,
                advice="the address failed permanently before; remove it with `mailpipe suppression "
                       "remove` once it is fixed")), exchange=self.topology.events, mandatory=False))
            remaining = tuple(r for r in job.recipients if r not in blocked)
            if remaining:
                kept.append(replace(job, recipients=remaining))
            else:
                out.append(self.dead_letter(encode_job(job), reason, "suppressed",
                                            **{"x-mailpipe-tenant": job.tenant, "x-mailpipe-job-id": job.id}))
        return kept

    def to_job(self, req: IntakeRequest, config: Config) -> Job:
        recipients = validate(req, self.settings.max_message_bytes, self.settings.max_recipients)
        tenant = config.tenant(req.tenant)
        server = config.server(req.server or tenant.server)
        findings = lint(req, server)
        refused = [f for f in findings if f.rule in self.refuse]
        if refused:
            raise InvalidMessage("; ".join(str(f) for f in refused))
        for finding in findings:
            LINT_FINDINGS.labels(finding.rule).inc()
        if req.html is not None and req.text is None and not req.is_raw:
            req = replace(req, text=text_from_html(req.html))
        message = dkim_sign(render(req, req.id), req.sender, tenant.dkim)
        if len(message) > self.settings.max_message_bytes:
            raise InvalidMessage(f"message: {len(message)} bytes rendered, over the "
                                 f"{self.settings.max_message_bytes}-byte limit")
        return Job(
            id=req.id, tenant=tenant.name, server=server.name, sender=req.sender,
            recipients=recipients, message=message, created_ms=req.created_ms,
            enqueued_ms=now_ms(), idempotency_key=req.idempotency_key,
            findings=tuple(str(f) for f in findings), send_at_ms=req.send_at_ms, priority=req.priority,
        )

    def _key(self, job: Job) -> str:
        return f"{self.settings.namespace}:queued:{job.id}"

    def already_queued(self, jobs: list[Job]) -> set[str]:
        if not jobs:
            return set()
        try:
            found = cast(list[bytes | None], self.redis.mget([self._key(j) for j in jobs]))
        except redis.RedisError as exc:
            raise LimiterUnavailable(f"Redis: cannot check idempotency keys: {exc}") from exc
        return {j.id for j, mark in zip(jobs, found, strict=True) if mark is not None}

    def mark_queued(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for job in jobs:
                    pipe.set(self._key(job), b"1", ex=self.settings.idempotency_ttl_s)
                pipe.execute()
        except redis.RedisError as exc:
            raise LimiterUnavailable(f"Redis: cannot mark idempotency keys: {exc}") from exc

    def ready(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self.redis.close()
