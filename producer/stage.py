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

Bundles (issue 24; producer/bundles.py): a delivery is one request or an intake bundle of up to
100. Each request of a bundle is handled exactly as a request alone (checks, idempotency,
suppression, rendering, routing; held for a claim or for Redis on its own), an invalid one
dead-lettered alone with its own bytes (so ``mailpipe dead replay`` puts it back as a request
alone); the delivery is acked once every request in it is done: queued, dead-lettered or a
duplicate. The jobs of a round go to the packer bundled in the same way. The prefetch counts
deliveries, and a bundle is at most ``large_message_bytes`` like a request alone on intake, so
what the stage holds is bounded in bytes as before (prefetch x ``large_message_bytes`` +
``large_prefetch`` x the largest request); in mails it is up to 100 times more.

Acks are exact: the runner hands over redelivered messages apart from fresh ones, and held
requests stay unacked, so a multiple ack up to the last tag would ack what is not handled yet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TypeVar

import redis
from prometheus_client import Counter

from mailpipe import redis_client, suppression
from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.codec import BUNDLES, decode_intake, encode_event, encode_job, items_of, kind_of
from mailpipe.errors import ConfigError, InvalidMessage, RedisUnavailable, TransientError
from mailpipe.model import Category, Event, IntakeRequest, Job, Outcome, now_ms
from mailpipe.servers import Config, ConfigWatcher
from mailpipe.settings import Settings
from mailpipe.stage import RedisOutage, Stage
from mailpipe.verp import Signer
from producer.bundles import bundled
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
# Mails, not messages: an intake bundle and a jobs bundle each carry up to 100.
QUEUED = Counter("mailpipe_intake_queued_total", "Jobs queued for the packer (each mail of a bundle counted).")

CHUNK_BYTES = 16 * 1024 * 1024  # requests rendered and published at once, at most (or one larger)
RECHECK_S = 1.0  # how often a held request asks again about the key another holder claimed
# Redis calls of the producer fail after at most this (as the limiter's): a frozen Redis must not
# stall the loop that also serves RabbitMQ, whose heartbeats a longer wait can miss (the broker
# then closes the connection and redelivers, and counts, everything unacked).
PRODUCER_REDIS_TIMEOUT_S = 1.0
HOLDING = "intake requests held unacked"
INTAKE_BUNDLE = BUNDLES["intake"]

T = TypeVar("T")


class Item:
    """One intake request of a delivery (the delivery's body, or one item of its bundle): the
    delivery's tag, to ack it once its last request is done, and the request's own bytes (its
    dead letter's body). Not the delivery: a request held through an outage keeps its own bytes,
    not its whole bundle's as well."""

    __slots__ = ("body", "tag")

    def __init__(self, tag: int, body: bytes) -> None:
        self.tag = tag
        self.body = body


def _chunks(things: list[T], size: Callable[[T], int]) -> Iterator[list[T]]:
    """``things`` in chunks of at most CHUNK_BYTES (or one larger thing)."""
    chunk: list[T] = []
    total = 0
    for thing in things:
        if chunk and total + size(thing) > CHUNK_BYTES:
            yield chunk
            chunk, total = [], 0
        chunk.append(thing)
        total += size(thing)
    if chunk:
        yield chunk


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
        # Deliveries not acked yet: by tag, how many of their requests are not done (queued,
        # dead-lettered or a duplicate). A delivery is acked when its count reaches 0.
        self._open: dict[int, int] = {}
        # Requests whose key another holder has claimed, unacked; asked again on tick() at the
        # earliest at _recheck_at (monotonic).
        self._held: list[tuple[Item, Job]] = []
        self._recheck_at = 0.0
        # While Redis does not answer: requests that need it, unacked, as they came; and the
        # Redis keys of jobs published whose claim could not be marked "queued".
        self.outage = RedisOutage(self.name)
        self._waiting: list[Item] = []
        self._unconfirmed: list[str] = []
        self._warned: Config | None = None
        self.warn_unchecked(self.config.current())

    @property
    def input_queue(self) -> str:
        return self.topology.intake

    @property
    def inputs(self) -> list[tuple[str, int]]:
        # Requests and bundles of at most large_message_bytes on intake, the larger requests few
        # at a time.
        return [(self.topology.intake, self.prefetch),
                (self.topology.intake_large, self.settings.large_prefetch)]

    def start(self, broker: Broker) -> None:
        self._open.clear()  # unacked on the old connection: redelivered
        self._held.clear()
        self._waiting.clear()
        self.outage.holding(0)

    def handle(self, broker: Broker, deliveries: list[Delivery]) -> None:
        # In chunks of at most CHUNK_BYTES of deliveries (or one larger delivery): what a request
        # costs beyond its delivery (its own bytes out of a bundle, decoded, rendered, encoded, in
        # pika's buffer) is then held for one chunk at a time, not for the whole unacked window.
        for chunk in _chunks(deliveries, lambda delivery: len(delivery.body)):
            items, refused = self.split(chunk)
            self.handle_items(broker, items, refused)

    def split(self, deliveries: list[Delivery]) -> tuple[list[Item], list[tuple[Item, Outgoing]]]:
        """The requests of each delivery: itself, or the items of its bundle. A bundle that does
        not decode as one is a single dead letter, with its reason."""
        items: list[Item] = []
        refused: list[tuple[Item, Outgoing]] = []
        for delivery in deliveries:
            if kind_of(delivery.body) != INTAKE_BUNDLE:  # a request alone (its decoder says what is wrong)
                self._open[delivery.tag] = 1
                items.append(Item(delivery.tag, delivery.body))
                continue
            try:
                bodies = items_of(delivery.body, "intake")
            except InvalidMessage as exc:
                REJECTS.labels(Category.INVALID).inc()
                self._open[delivery.tag] = 1
                refused.append((Item(delivery.tag, delivery.body),
                                self.dead_letter(delivery.body, exc.reason, Category.INVALID)))
                continue
            self._open[delivery.tag] = len(bodies)
            items += [Item(delivery.tag, body) for body in bodies]
        return items, refused

    def handle_items(self, broker: Broker, items: list[Item], refused: list[tuple[Item, Outgoing]]) -> None:
        jobs, invalid = self.to_jobs(items)
        refused = refused + invalid
        if self.outage.ask():
            out = [dead for _item, dead in refused]
            try:
                kept = self.drop_suppressed(jobs, out)
                self.enqueue(broker, [item for item, _dead in refused] + [item for item, _job in jobs], kept, out)
                return
            except RedisUnavailable as exc:  # raised before anything was published: hold them all
                self.outage.failed(exc, HOLDING)
        # Redis is away: what is refused needs no Redis, the rest waits for it as it came.
        if refused:
            broker.publish([dead for _item, dead in refused])
            self.settle(broker, [item for item, _dead in refused])
        self._waiting += [item for item, _job in jobs]
        self.outage.holding(len(self._waiting))

    def to_jobs(self, items: list[Item]) -> tuple[list[tuple[Item, Job]], list[tuple[Item, Outgoing]]]:
        """Decode, check and render each request (no Redis): its job, or its dead letter."""
        config = self.config.current()
        self.warn_unchecked(config)
        refused: list[tuple[Item, Outgoing]] = []
        jobs: list[tuple[Item, Job]] = []
        for item in items:
            req: IntakeRequest | None = None
            try:
                req = decode_intake(item.body, self.settings.max_message_bytes)
                jobs.append((item, self.to_job(req, config)))
            except InvalidMessage as exc:
                REJECTS.labels(Category.INVALID).inc()
                refused.append((item, self.dead_letter(item.body, exc.reason, Category.INVALID)))
            except ConfigError as exc:
                REJECTS.labels(Category.ROUTING).inc()
                refused.append((item, self.dead_letter(item.body, exc.reason, Category.ROUTING)))
            except (TransientError, redis.RedisError):
                raise  # RabbitMQ or Redis: the request is fine, the stage retries it
            except Exception as exc:
                # A bug of ours or of a library on this one request (the email package's
                # ValueError on a header, a UnicodeError): its dead letter, not a crash of the
                # stage that would redeliver it and everything with it up to the delivery limit.
                REJECTS.labels(Category.INVALID).inc()
                log.debug("request %s failed to render", req.id if req else "?", exc_info=True)
                refused.append((item, self.dead_letter(item.body, f"message: cannot be rendered: "
                                                                  f"{type(exc).__name__}: {exc}",
                                                       Category.INVALID)))
        return jobs, refused

    def enqueue(self, broker: Broker, items: list[Item], jobs: list[tuple[Item, Job]], out: list[Outgoing]) -> None:
        """Publish ``out`` and the jobs whose key is free or that have none, confirmed; then
        settle every request of ``items`` except those whose key another holder has claimed:
        those are held. Raises RedisUnavailable only before it publishes anything."""
        keyed = [(i, j) for i, j in jobs if j.idempotency_key is not None]
        claim = self.idempotency.claim([j for _i, j in keyed])
        verdicts = {id(i): v for (i, _j), v in zip(keyed, claim.verdicts, strict=True)}
        queued = [j for i, j in jobs if verdicts.get(id(i), Verdict.MINE) is Verdict.MINE]
        claimed = [j for i, j in keyed if verdicts[id(i)] is Verdict.MINE]
        held = [(i, j) for i, j in keyed if verdicts[id(i)] is Verdict.PENDING]
        out += self.job_messages(queued)
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
            self.outage.failed(exc, HOLDING)
        QUEUED.inc(len(queued))
        DUPLICATES.inc(sum(1 for v in verdicts.values() if v is Verdict.DUPLICATE))
        waiting = {id(i) for i, _j in held}
        self.settle(broker, [i for i in items if id(i) not in waiting])
        if held and not self._held:
            self._recheck_at = time.monotonic() + RECHECK_S
        self._held += held

    def settle(self, broker: Broker, items: list[Item]) -> None:
        """These requests are done (queued, dead-lettered, duplicates): ack each delivery whose
        last request was among them, in one write."""
        done = []
        for item in items:
            left = self._open[item.tag] - 1
            if left:
                self._open[item.tag] = left
            else:
                del self._open[item.tag]
                done.append(item.tag)
        if done:
            broker.ack_all(done)

    def job_messages(self, jobs: list[Job]) -> list[Outgoing]:
        """The jobs on ``jobs`` in bundles of up to 100 and ``large_message_bytes``; a job whose
        encoded body is over that alone on ``jobs.large``: the packer holds few large ones at a
        time."""
        return bundled("job", [(job.id, encode_job(job)) for job in jobs], self.topology.jobs_for,
                       self.topology.large_message_bytes)

    def tick(self, broker: Broker) -> None:
        if self.outage.down:
            if self.outage.retry():
                self.try_redis_again(broker)
            if self.outage.down:
                return
        if not self._held or time.monotonic() < self._recheck_at:
            return
        self._recheck_at = time.monotonic() + RECHECK_S
        held, self._held = self._held, []
        try:
            self.enqueue(broker, [i for i, _j in held], held, [])
        except RedisUnavailable as exc:
            self._held = held
            self.outage.failed(exc, HOLDING)

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
            self.outage.failed(exc, HOLDING)
            return
        self._unconfirmed = []
        waiting, self._waiting = self._waiting, []
        for chunk in _chunks(waiting, lambda item: len(item.body)):
            self.handle_items(broker, chunk, [])
        self.outage.holding(len(self._waiting))
        self.outage.tried(f"{len(waiting) - len(self._waiting)} held intake request(s) handed over")

    def busy(self) -> bool:
        return bool(self._held or self._waiting)

    def drain(self, broker: Broker, deadline: float) -> None:
        # Held requests wait for another holder, or for Redis: leave them unacked, the broker
        # gives them back to another replica (a bundle whole, its requests done already
        # included: those are duplicates then, or queued again without an idempotency key).
        if self._waiting:
            log.info("%d intake request(s) held until Redis answers left unacked, for another replica",
                     len(self._waiting))
        if self._unconfirmed:
            log.warning("%d idempotency key(s) of queued jobs not marked queued (Redis did not answer): "
                        "their claims end with their lease", len(self._unconfirmed))
        self._open.clear()
        self._held.clear()
        self._waiting.clear()
        self.outage.holding(0)

    def drop_suppressed(self, jobs: list[tuple[Item, Job]], out: list[Outgoing]) -> list[tuple[Item, Job]]:
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
        for (item, job), blocked in zip(jobs, found, strict=True):
            if not blocked:
                kept.append((item, job))
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
                kept.append((item, replace(job, recipients=remaining)))
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
