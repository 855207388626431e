"""The enqueue stage: intake -> jobs.

Consume intake requests; decode and validate them; route each to its tenant's SMTP server;
render the RFC 5322 message once (every later size is exact); publish the jobs, confirmed;
then ack. A request that fails any check goes to the dead-letter queue with a reason that
names the problem, and the stage goes on.

Tenants (mailpipe/servers.py): a request goes through the tenant's default server, or the one
it names in ``server`` if that is one of the tenant's own or a platform server; any other is
refused (category ``routing``, the reason names ``server``). The sender and the From header
(parsed from a raw message too) must be at the tenant's verified domains (producer/domains.py):
refused (category ``invalid``) or, with ``domain_policy = "warn"``, queued with a finding.

No request crashes the stage: an unexpected error while one request is checked or rendered (a
ValueError of the email library, say) becomes that request's dead letter, category ``invalid``,
with the exception named. Only errors of the infrastructure (RabbitMQ, Redis) propagate.

Idempotency (producer/idempotency.py): a job with an idempotency key claims it in Redis before
its publish and marks it "queued" after the confirm. A request whose key is queued already (a
retrying upstream) is acked and dropped as a duplicate. A request whose key another holder has
claimed (a copy in flight) is neither published nor acked: the stage holds it and asks again
about every second, until the key is queued (a duplicate) or its lease has run out (the holder
died: claim it and go on).

Redis unreachable (the suppression check, a claim): fail closed without losing the session. The
requests that need Redis are held unacked, as they came (``_waiting``); a malformed one is still
dead-lettered at once, with its reason (that needs no Redis). Redis is asked again with a backoff
(mailpipe/stage.py ``RedisOutage``: one warning per outage, ``mailpipe_failing_closed``, not
ready), and once it answers the held requests go through as if they had just come. Dropping
the session instead had the whole unacked window redelivered about once a second, each time
counted, until the quorum queue dead-lettered it at the delivery limit. Jobs published just
before Redis refused to mark their keys "queued" are acked (they are on ``jobs``) and marked
once it answers. Stopping during an outage leaves the held requests unacked: the broker gives
them back once, to another replica.

Acks are exact: the runner hands over redelivered messages apart from fresh ones, and held
requests stay unacked, so a multiple ack up to the last tag would ack what is not handled yet.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import redis
from prometheus_client import Counter

from mailpipe import redis_client, suppression
from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.codec import decode_intake, encode_event, encode_job
from mailpipe.errors import ConfigError, InvalidMessage, RedisUnavailable, TransientError
from mailpipe.model import Category, Event, IntakeRequest, Job, Outcome, now_ms
from mailpipe.servers import Config, ConfigWatcher
from mailpipe.settings import Settings
from mailpipe.stage import RedisOutage, Stage
from mailpipe.verp import Signer
from producer.compose import dkim_sign, render, validate
from producer.domains import check_domains
from producer.idempotency import Idempotency, Verdict
from producer.lint import RULES, Finding, lint, text_from_html
from producer.unsubscribe import has_list_unsubscribe
from producer.unsubscribe import headers as unsubscribe_headers

log = logging.getLogger(__name__)

REJECTS = Counter("mailpipe_intake_rejects_total", "Intake requests refused, by reason.", ["reason"])
LINT_FINDINGS = Counter("mailpipe_intake_lint_findings_total",
                        "Deliverability warnings found on queued mail, by rule.", ["rule"])
DUPLICATES = Counter("mailpipe_intake_duplicates_total",
                     "Intake requests dropped because their idempotency key was queued already.")

CHUNK_BYTES = 16 * 1024 * 1024  # requests rendered and published at once, at most (or one larger)
RECHECK_S = 1.0  # how often a held request asks again about the key another holder claimed
# Redis calls of the producer fail after at most this (as the limiter's): a frozen Redis must not
# stall the loop that also serves RabbitMQ, whose heartbeats a longer wait can miss (the broker
# then closes the connection and redelivers, and counts, everything unacked).
PRODUCER_REDIS_TIMEOUT_S = 1.0


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
        self.redis = redis_client.connect(settings, min(PRODUCER_REDIS_TIMEOUT_S, settings.redis_timeout_s))
        self.signer = Signer.from_settings(settings)  # bulk mail's unsubscribe links
        self.idempotency = Idempotency(self.redis, settings.namespace, lease_s=settings.idempotency_lease_s,
                                       ttl_s=settings.idempotency_ttl_s)
        # Requests whose key another holder has claimed, unacked, by delivery tag; asked again
        # on tick() at the earliest at _recheck_at (monotonic).
        self._held: dict[int, tuple[Delivery, Job]] = {}
        self._recheck_at = 0.0
        # While Redis does not answer: requests that need it, unacked, as they came; and the
        # Redis keys of jobs published whose claim could not be marked "queued".
        self.outage = RedisOutage(self.name)
        self._waiting: list[Delivery] = []
        self._unconfirmed: list[str] = []
        self._warned: Config | None = None
        self.warn_unchecked(self.config.current())

    @property
    def input_queue(self) -> str:
        return self.topology.intake

    @property
    def inputs(self) -> list[tuple[str, int]]:
        # Requests of at most large_message_bytes on intake, the larger ones few at a time.
        return [(self.topology.intake, self.prefetch),
                (self.topology.intake_large, self.settings.large_prefetch)]

    def start(self, broker: Broker) -> None:
        self._held.clear()  # unacked on the old connection: redelivered
        self._waiting.clear()
        self.outage.holding(0)

    def handle(self, broker: Broker, deliveries: list[Delivery]) -> None:
        # In chunks of at most CHUNK_BYTES of requests (or one larger request): what a request
        # costs beyond its delivery (decoded, rendered, encoded, in pika's buffer) is then
        # held for one chunk at a time, not for the whole unacked window.
        chunk: list[Delivery] = []
        size = 0
        for delivery in deliveries:
            if chunk and size + len(delivery.body) > CHUNK_BYTES:
                self.handle_chunk(broker, chunk)
                chunk, size = [], 0
            chunk.append(delivery)
            size += len(delivery.body)
        if chunk:
            self.handle_chunk(broker, chunk)

    def handle_chunk(self, broker: Broker, deliveries: list[Delivery]) -> None:
        jobs, refused = self.to_jobs(deliveries)
        if self.outage.ask():
            out = [dead for _delivery, dead in refused]
            try:
                kept = self.drop_suppressed(jobs, out)
                self.enqueue(broker, deliveries, kept, out)
                return
            except RedisUnavailable as exc:  # raised before anything was published: hold them all
                self.outage.failed(exc, "intake requests held unacked")
        # Redis is away: what is refused needs no Redis, the rest waits for it as it came.
        if refused:
            broker.publish([dead for _delivery, dead in refused])
            broker.ack_all(delivery.tag for delivery, _dead in refused)
        self._waiting += [delivery for delivery, _job in jobs]
        self.outage.holding(len(self._waiting))

    def to_jobs(self, deliveries: list[Delivery]) -> tuple[list[tuple[Delivery, Job]], list[tuple[Delivery, Outgoing]]]:
        """Decode, check and render each request (no Redis): its job, or its dead letter."""
        config = self.config.current()
        self.warn_unchecked(config)
        refused: list[tuple[Delivery, Outgoing]] = []
        jobs: list[tuple[Delivery, Job]] = []
        for delivery in deliveries:
            try:
                jobs.append((delivery, self.to_job(decode_intake(delivery.body, self.settings.max_message_bytes),
                                                   config)))
            except InvalidMessage as exc:
                REJECTS.labels(Category.INVALID).inc()
                refused.append((delivery, self.dead_letter(delivery.body, exc.reason, Category.INVALID)))
            except ConfigError as exc:
                REJECTS.labels(Category.ROUTING).inc()
                refused.append((delivery, self.dead_letter(delivery.body, exc.reason, Category.ROUTING)))
            except (TransientError, redis.RedisError):
                raise  # RabbitMQ or Redis: the request is fine, the stage retries it
            except Exception as exc:
                # A bug of ours or of a library on this one request (the email package's
                # ValueError on a header, a UnicodeError): its dead letter, not a crash of the
                # stage that would redeliver it and everything with it up to the delivery limit.
                REJECTS.labels(Category.INVALID).inc()
                log.debug("request %s failed to render", delivery.message_id, exc_info=True)
                refused.append((delivery, self.dead_letter(delivery.body, f"message: cannot be rendered: "
                                                                        f"{type(exc).__name__}: {exc}",
                                                           Category.INVALID)))
        return jobs, refused

    def enqueue(self, broker: Broker, deliveries: list[Delivery], jobs: list[tuple[Delivery, Job]],
                out: list[Outgoing]) -> None:
        """Publish ``out`` and the jobs whose key is free or that have none, confirmed; then ack
        every delivery except those whose key another holder has claimed: those are held. Raises
        RedisUnavailable only before it publishes anything."""
        keyed = [(d, j) for d, j in jobs if j.idempotency_key is not None]
        claim = self.idempotency.claim([j for _d, j in keyed])
        verdicts = {d.tag: v for (d, _j), v in zip(keyed, claim.verdicts, strict=True)}
        queued = [j for d, j in jobs if verdicts.get(d.tag, Verdict.MINE) is Verdict.MINE]
        claimed = [j for d, j in keyed if verdicts[d.tag] is Verdict.MINE]
        held = {d.tag: (d, j) for d, j in keyed if verdicts[d.tag] is Verdict.PENDING}
        out += [self.job_message(j) for j in queued]
        try:
            broker.publish(out)
        except BaseException:
            self.idempotency.release(claimed, claim.token)  # a retry need not wait out the lease
            raise
        try:
            self.idempotency.confirm(claimed)
        except RedisUnavailable as exc:
            # They are on ``jobs``: acked below, marked "queued" once Redis answers (until then
            # their claims hold a copy of the request back, for their lease).
            self._unconfirmed += [self.idempotency.key(j) for j in claimed]
            self.outage.failed(exc, "intake requests held unacked")
        DUPLICATES.inc(sum(1 for v in verdicts.values() if v is Verdict.DUPLICATE))
        done = [d.tag for d in deliveries if d.tag not in held]
        if done:
            broker.ack_all(done)
        if held and not self._held:
            self._recheck_at = time.monotonic() + RECHECK_S
        self._held.update(held)

    def job_message(self, job: Job) -> Outgoing:
        """The job on ``jobs``, or on ``jobs.large`` when its encoded body is over
        ``large_message_bytes``: the packer holds few large ones at a time."""
        body = encode_job(job)
        return Outgoing(self.topology.jobs_for(len(body)), body, message_id=job.id)

    def tick(self, broker: Broker) -> None:
        if self.outage.down:
            if self.outage.retry():
                self.try_redis_again(broker)
            if self.outage.down:
                return
        if not self._held or time.monotonic() < self._recheck_at:
            return
        self._recheck_at = time.monotonic() + RECHECK_S
        held, self._held = list(self._held.values()), {}
        try:
            self.enqueue(broker, [d for d, _j in held], held, [])
        except RedisUnavailable as exc:
            self._held.update((d.tag, (d, j)) for d, j in held)
            self.outage.failed(exc, "intake requests held unacked")

    def try_redis_again(self, broker: Broker) -> None:
        """Redis did not answer: ask again (PING: rendering every held request for nothing costs
        more), mark what was published meanwhile, then hand the held requests over again."""
        try:
            try:
                self.redis.ping()
            except redis.RedisError as exc:
                raise RedisUnavailable(f"Redis: {exc}") from exc
            self.idempotency.confirm_keys(self._unconfirmed)
        except RedisUnavailable as exc:
            self.outage.failed(exc, "intake requests held unacked")
            return
        self._unconfirmed = []
        waiting, self._waiting = self._waiting, []
        self.handle(broker, waiting)
        self.outage.holding(len(self._waiting))
        self.outage.tried(f"{len(waiting) - len(self._waiting)} held intake request(s) handed over")

    def busy(self) -> bool:
        return bool(self._held or self._waiting)

    def drain(self, broker: Broker, deadline: float) -> None:
        # Held requests wait for another holder, or for Redis: leave them unacked, the broker
        # gives them back to another replica.
        if self._waiting:
            log.info("%d intake request(s) held until Redis answers left unacked, for another replica",
                     len(self._waiting))
        if self._unconfirmed:
            log.warning("%d idempotency key(s) of queued jobs not marked queued (Redis did not answer): "
                        "their claims end with their lease", len(self._unconfirmed))
        self._held.clear()
        self._waiting.clear()
        self.outage.holding(0)

    def drop_suppressed(self, jobs: list[tuple[Delivery, Job]],
                        out: list[Outgoing]) -> list[tuple[Delivery, Job]]:
        """Fail the recipients suppressed for their tenant (an event each; the whole job to the
        dead-letter queue when none is left); return the jobs with what remains."""
        if not jobs:
            return jobs
        try:
            found = suppression.suppressed(self.redis, self.settings.namespace,
                                           [(job.tenant, job.recipients) for _, job in jobs],
                                           shared=self.settings.suppress_hard_shared)
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: cannot check suppressed recipients: {exc}") from exc
        kept = []
        for (delivery, job), blocked in zip(jobs, found, strict=True):
            if not blocked:
                kept.append((delivery, job))
                continue
            REJECTS.labels(Category.SUPPRESSED).inc(len(blocked))
            reason = "suppressed: " + "; ".join(f"{r} ({why})" for r, why in blocked.items())
            out.append(Outgoing(f"failed.{job.tenant}", encode_event(Event(
                job_id=job.id, tenant=job.tenant, server=job.server, outcome=Outcome.FAILED,
                recipients=tuple(blocked), attempt=job.attempt, created_ms=job.created_ms, at_ms=now_ms(),
                text=reason, category=Category.SUPPRESSED, findings=job.findings,
                advice="the address bounced, complained or unsubscribed before; once that is fixed (or it "
                       "asked again), lift it with `mailpipe suppression remove`")), exchange=self.topology.events,
                mandatory=False))
            remaining = tuple(r for r in job.recipients if r not in blocked)
            if remaining:
                kept.append((delivery, replace(job, recipients=remaining)))
            else:
                out.append(self.dead_letter(encode_job(job), reason, Category.SUPPRESSED,
                                            **{"x-mailpipe-tenant": job.tenant, "x-mailpipe-job-id": job.id}))
        return kept

    def to_job(self, req: IntakeRequest, config: Config) -> Job:
        recipients = validate(req, self.settings.max_message_bytes, self.settings.max_recipients)
        tenant = config.tenant(req.tenant)
        server = config.route(tenant, req.server or None)  # "" is no server, as before
        findings = check_domains(req, tenant, server)  # raises for refuse; findings for warn
        findings += lint(req, server)
        refused = [f for f in findings if f.rule in self.refuse]
        if refused:
            raise InvalidMessage("; ".join(str(f) for f in refused))
        for finding in findings:
            LINT_FINDINGS.labels(finding.rule).inc()
        if req.html is not None and req.text is None and not req.is_raw:
            req = replace(req, text=text_from_html(req.html))
        message = render(req, req.id)
        if req.bulk:
            message, unsubscribe = self.with_unsubscribe(message, req, tenant.name, recipients[0],
                                                         config.return_path_domain(server, tenant.name,
                                                                                   self.settings.return_path_domain))
            findings += unsubscribe
        message = dkim_sign(message, req.sender, tenant.dkim)
        if len(message) > self.settings.max_message_bytes:
            raise InvalidMessage(f"message: {len(message)} bytes rendered, over the "
                                 f"{self.settings.max_message_bytes}-byte limit")
        return Job(
            id=req.id, tenant=tenant.name, server=server.name, sender=req.sender,
            recipients=recipients, message=message, created_ms=req.created_ms,
            enqueued_ms=now_ms(), idempotency_key=req.idempotency_key,
            findings=tuple(str(f) for f in findings), send_at_ms=req.send_at_ms, priority=req.priority,
        )

    def with_unsubscribe(self, message: bytes, req: IntakeRequest, tenant: str, recipient: str,
                         domain: str | None) -> tuple[bytes, list[Finding]]:
        """Bulk mail with its List-Unsubscribe and List-Unsubscribe-Post headers on top (signed
        by DKIM after this); a raw message's own List-Unsubscribe is kept. Without keys or a
        place to unsubscribe, the mail goes as it is, with a finding that says why."""
        if req.is_raw and has_list_unsubscribe(message):
            return message, []
        lines = b""
        if self.signer is not None:
            lines = unsubscribe_headers(self.signer, tenant, req.id, recipient, url=self.settings.unsubscribe_url,
                                        mailto_domain=domain or self.settings.return_path_domain)
        if not lines:
            return message, [Finding("unsubscribe_missing", "bulk mail without List-Unsubscribe: set "
                                     "MAILPIPE_VERP_KEYS and MAILPIPE_UNSUBSCRIBE_URL (or a return-path domain); "
                                     "Gmail and Yahoo refuse bulk mail without one-click unsubscribe")]
        return lines + message, []

    def warn_unchecked(self, config: Config) -> None:
        """Once per loaded config: say loudly which tenants send from any domain."""
        if config is self._warned:
            return
        self._warned = config
        unchecked = config.unchecked_tenants()
        if unchecked:
            log.warning("tenant(s) %s have no `domains` in the servers file: their senders and From "
                        "headers are NOT checked, so they can send as any domain; list each tenant's "
                        "verified domains", ", ".join(unchecked))

    def ready(self) -> bool:
        if self.outage.down:
            return False
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self.redis.close()
