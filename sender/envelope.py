"""The envelope of one mail, and what the sender learns after the 250 (issue 23).

**Envelope.** On a server configured for it (a platform server while
``MAILPIPE_RETURN_PATH_DOMAIN`` is set, any server with ``return_path_domain`` in the servers
file), the envelope sender is a signed VERP address per recipient (mailpipe/verp.py), so each
recipient gets a transaction of its own; where the server announces DSN (RFC 3461), MAIL
carries ``RET=HDRS ENVID=<job>`` and each RCPT ``NOTIFY=FAILURE,DELAY ORCPT=rfc822;<recipient>``.
Anywhere else the envelope is the tenant's sender, as before, one transaction for all.

**Aftermath.** After a batch: the 250s on shared servers count as the tenant's sends
(mailpipe/reputation.py), each resets its address's soft bounces, and each final 5xx is a
synchronous bounce, recorded like a late one (mailpipe/feedback.py: suppression, reputation,
``bounced`` and ``suppressed`` events), and so is a 4xx past the retry age (expired: the mail is
not tried again; a soft bounce when the reply was the recipient's).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from mailpipe import feedback, reputation, suppression
from mailpipe.amqp import Outgoing
from mailpipe.feedback import FeedbackType, Finding, Source, encode_feedback
from mailpipe.model import Job, now_ms
from mailpipe.replies import BounceClass
from mailpipe.retry import Expire, RetryPolicy, retry_step
from mailpipe.servers import Config, ServerConfig
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from mailpipe.verp import Signer, xtext

if TYPE_CHECKING:
    from sender.delivery import JobOutcome


@dataclass(frozen=True)
class Transaction:
    """One MAIL transaction's envelope: its sender, its recipients, and the DSN parameters."""

    sender: str
    recipients: tuple[str, ...]
    mail_params: bytes = b""
    rcpt_params: dict[str, bytes] | None = None


Planner = Callable[[Job, Sequence[str], bool], list[Transaction]]


class Envelopes:
    def __init__(self, settings: Settings) -> None:
        self.signer = Signer.from_settings(settings)
        self.platform_domain = settings.return_path_domain

    def planner(self, server: ServerConfig, config: Config) -> Planner:
        """How the jobs of one delivery on ``server`` are sent: ``plan(job, recipients, dsn)``,
        ``dsn`` being whether the connection in use announces DSN."""
        def plan(job: Job, recipients: Sequence[str], announce: bool) -> list[Transaction]:
            domain = config.return_path_domain(server, job.tenant, self.platform_domain)
            if domain is None or self.signer is None:
                return [Transaction(job.sender, tuple(recipients))]
            mail_params = f" RET=HDRS ENVID={xtext(job.id)}".encode() if announce else b""
            return [Transaction(
                self.signer.return_path(job.tenant, job.id, recipient, domain, shared=server.platform), (recipient,),
                mail_params, {recipient: f" NOTIFY=FAILURE,DELAY ORCPT=rfc822;{xtext(recipient)}".encode()}
                if announce else None) for recipient in recipients]
        return plan


def aftermath(client: redis.Redis, settings: Settings, topology: Topology, server: ServerConfig,
              outcomes: Sequence[JobOutcome], ratios: feedback.RatioGauges | None = None) -> list[Outgoing]:
    """Record what a finished batch's replies say about its recipients and tenants; return the
    events to publish with the batch's outputs (``ratios``: told of the tenants whose reputation
    a bounce weighed in). Redis errors propagate (the caller logs them: a missed count is not
    worth a redelivery)."""
    delivered = [(o.job.tenant, r) for o in outcomes for r in o.sent]
    suppression.delivered(client, settings.namespace, delivered)
    if server.platform:
        reputation.record_sends(client, settings.namespace, Counter(tenant for tenant, _ in delivered))
    policy = suppression.Policy.from_settings(settings)
    thresholds = reputation.Thresholds.from_settings(settings)
    retry = RetryPolicy.from_settings(settings)
    findings: list[Finding] = []
    for outcome in outcomes:
        job = outcome.job
        at_ms = outcome.at_ms or now_ms()
        # A final 5xx, and a 4xx past the retry age (the same decision as sender/outputs.py's:
        # retry_step is pure): the mail will not be tried again.
        final = [(r, reply, f"{reply.code}") for r, reply in outcome.failed.items()]
        final += [(r, reply, "expired") for r, reply in outcome.deferred.items()
                  if isinstance(retry_step(job, (r,), reply, at_ms, retry), Expire)]
        findings += [Finding(type=FeedbackType.BOUNCED, tenant=job.tenant, recipient=recipient, source=Source.SYNC,
                             origin=f"sync\0{job.id}\0{job.attempt}\0{why}", at_ms=at_ms, job_id=job.id,
                             server=job.server, shared=server.platform, reply=reply, remote_mta=server.name)
                     for recipient, reply, why in final if reply.bounce != BounceClass.NONE]
    out: list[Outgoing] = []
    applied = feedback.apply_many(client, settings.namespace, findings, policy, thresholds)
    if ratios is not None:
        ratios.note(f.tenant for f in findings if feedback.weighs(f))
    for events in applied:
        for event in events:
            out.append(Outgoing(event.routing_key, encode_feedback(event), exchange=topology.events,
                                mandatory=False, message_id=event.id))
            feedback.count(event, tenant_label=settings.metrics_tenant_label,
                           suppression_kind=feedback.suppression_kind_of(event))
    return out


__all__ = ["Envelopes", "Transaction", "aftermath"]
