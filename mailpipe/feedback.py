"""What comes back after the 250, told to the tenant: ``feedback`` events on ``<ns>.events``.

Routing key ``<type>.<tenant>``: ``bounced`` (hard, soft or reputation, with the status code,
the diagnostic text, the reporting server and the source: sync, dsn, arf ...), ``complained``,
``unsubscribed``, ``suppressed`` (the address will get no more of the tenant's mail, and for how
long) and ``reputation`` (the tenant warned or paused for its bounce or complaint rate).

Each has an ``id`` derived from what it is about (the report's bytes or the sync reply, the
type, the recipient), so a redelivered report publishes the same ids again and a subscriber
that keeps the ids it has seen can drop the copy. docs/wire-format.md, section 8, is the
contract; decoding follows the codec's rules (mailpipe/codec.py).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgpack
import redis
from prometheus_client import Counter, Gauge

from mailpipe import reputation, suppression
from mailpipe.codec import _Fields, _pack, _unpack
from mailpipe.errors import InvalidMessage
from mailpipe.replies import BounceClass, Reply


class FeedbackType(StrEnum):
    BOUNCED = "bounced"
    COMPLAINED = "complained"
    UNSUBSCRIBED = "unsubscribed"
    SUPPRESSED = "suppressed"
    REPUTATION = "reputation"


class Source(StrEnum):
    SYNC = "sync"  # the server's reply on the sender's own connection
    DSN = "dsn"  # a delivery status notification (RFC 3464)
    ARF = "arf"  # a feedback-loop report (RFC 5965)
    LEGACY = "legacy"  # an older bounce format, read by flufl.bounce
    HTTP = "http"  # the one-click unsubscribe endpoint (RFC 8058)
    MAILTO = "mailto"  # the mailto: unsubscribe address
    MANUAL = "manual"


@dataclass(frozen=True)
class Feedback:
    id: str
    type: str
    tenant: str
    at_ms: int
    source: str
    recipient: str = ""
    job_id: str = ""
    server: str = ""
    bounce_class: str = ""  # bounced: hard, soft, reputation, none
    code: int = 0  # the SMTP reply code
    status: str = ""  # the RFC 3463 enhanced status code
    text: str = ""  # the diagnostic text, at most 1,000 characters
    category: str = ""
    rule: str = ""  # the rule of mailpipe/replies.toml that classified it
    advice: str = ""
    reporting_mta: str = ""  # who sent the report
    remote_mta: str = ""  # the server that refused (a DSN's Remote-MTA)
    feedback_type: str = ""  # complained: the ARF Feedback-Type (abuse, fraud, virus, other)
    report_id: str = ""  # the raw report in <ns>.reports.archive (mailpipe reports show ID)
    until_ms: int = 0  # suppressed: until when; 0 until the tenant lifts it
    reason: str = ""  # suppressed, reputation: why
    state: str = ""  # reputation: ok, warned or paused
    bounce_ratio: float = 0.0  # reputation: over the tenant's last sends on shared servers
    complaint_ratio: float = 0.0

    @property
    def routing_key(self) -> str:
        return f"{self.type}.{self.tenant}"


def event_id(*parts: str) -> str:
    """A stable id made of what an event is about: the same report gives the same ids."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def encode_feedback(feedback: Feedback) -> bytes:
    fields: dict[str, Any] = {name: getattr(feedback, name) for name in Feedback.__dataclass_fields__}
    return _pack("feedback", fields)


def decode_feedback(data: bytes) -> Feedback:
    f = _Fields("feedback", _unpack(data, "feedback", max_bin=1024 * 1024))
    kind = f.text("type", max_len=32)
    if kind not in set(FeedbackType):
        raise InvalidMessage(f"feedback.type: {kind!r} is not one of {', '.join(FeedbackType)}")

    def ratio(name: str) -> float:
        value = f.obj.get(name) or 0.0
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InvalidMessage(f"feedback.{name}: expected a number")
        return float(value)

    return Feedback(
        id=f.text("id", max_len=64), type=kind, tenant=f.text("tenant", max_len=255), at_ms=f.integer("at_ms"),
        source=f.text("source", max_len=32), recipient=f.text("recipient", required=False) or "",
        job_id=f.text("job_id", required=False, max_len=64) or "",
        server=f.text("server", required=False, max_len=255) or "",
        bounce_class=f.text("bounce_class", required=False, max_len=32) or "",
        code=f.integer("code", required=False), status=f.text("status", required=False, max_len=32) or "",
        text=f.text("text", required=False) or "", category=f.text("category", required=False) or "",
        rule=f.text("rule", required=False) or "", advice=f.text("advice", required=False) or "",
        reporting_mta=f.text("reporting_mta", required=False) or "",
        remote_mta=f.text("remote_mta", required=False) or "",
        feedback_type=f.text("feedback_type", required=False) or "",
        report_id=f.text("report_id", required=False, max_len=64) or "",
        until_ms=f.integer("until_ms", required=False), reason=f.text("reason", required=False) or "",
        state=f.text("state", required=False, max_len=32) or "", bounce_ratio=ratio("bounce_ratio"),
        complaint_ratio=ratio("complaint_ratio"))


# -- metrics, the same whichever stage learns of it ---------------------------------------------------

BOUNCES = Counter("mailpipe_bounces_total", "Bounces recorded, by class and source.", ["class", "source"])
COMPLAINTS = Counter("mailpipe_complaints_total", "Complaints (ARF) recorded, by feedback type.", ["feedback_type"])
UNSUBSCRIBES = Counter("mailpipe_unsubscribes_total", "Unsubscribes recorded, by source.", ["source"])
SUPPRESSIONS = Counter("mailpipe_suppressions_total", "Addresses newly suppressed, by why.", ["kind"])
# Per tenant: one series per tenant, so only with MAILPIPE_METRICS_TENANT_LABEL=true.
TENANT_BOUNCES = Counter("mailpipe_tenant_bounces_total", "Bounces per tenant and class.", ["tenant", "class"])
TENANT_COMPLAINTS = Counter("mailpipe_tenant_complaints_total", "Complaints per tenant.", ["tenant"])
TENANT_UNSUBSCRIBES = Counter("mailpipe_tenant_unsubscribes_total", "Unsubscribes per tenant.", ["tenant"])
TENANT_SUPPRESSIONS = Counter("mailpipe_tenant_suppressions_total", "Addresses newly suppressed per tenant.",
                              ["tenant", "kind"])
TENANT_BOUNCE_RATIO = Gauge("mailpipe_tenant_bounce_ratio",
                            "Hard bounces over the tenant's last sends on shared servers, read again every 10 s.",
                            ["tenant"])
TENANT_COMPLAINT_RATIO = Gauge("mailpipe_tenant_complaint_ratio",
                               "Complaints over the tenant's last sends on shared servers, read again every 10 s.",
                               ["tenant"])
TENANT_WINDOW_SENDS = Gauge("mailpipe_tenant_window_sends",
                            "Sends on shared servers in the window of the tenant's ratios (judged from "
                            "MAILPIPE_REPUTATION_MIN_SENDS on), read again every 10 s.", ["tenant"])
PAUSED_TENANTS = Gauge("mailpipe_reputation_paused_tenants",
                       "Tenants whose bulk mail to shared servers is paused (mailpipe tenants resume).")


def count(feedback: Feedback, *, tenant_label: bool, suppression_kind: str = "") -> None:
    """Count one event in the metrics (per tenant too when ``tenant_label``). A ``reputation``
    event's ratios are those of its moment, so they are not set here: RatioGauges reads them."""
    tenant = feedback.tenant
    if feedback.type == FeedbackType.BOUNCED:
        BOUNCES.labels(feedback.bounce_class, feedback.source).inc()
        if tenant_label:
            TENANT_BOUNCES.labels(tenant, feedback.bounce_class).inc()
    elif feedback.type == FeedbackType.COMPLAINED:
        COMPLAINTS.labels(feedback.feedback_type or "abuse").inc()
        if tenant_label:
            TENANT_COMPLAINTS.labels(tenant).inc()
    elif feedback.type == FeedbackType.UNSUBSCRIBED:
        UNSUBSCRIBES.labels(feedback.source).inc()
        if tenant_label:
            TENANT_UNSUBSCRIBES.labels(tenant).inc()
    elif feedback.type == FeedbackType.SUPPRESSED:
        SUPPRESSIONS.labels(suppression_kind).inc()
        if tenant_label:
            TENANT_SUPPRESSIONS.labels(tenant, suppression_kind).inc()


RATIOS_SOON_S = 1.0  # a tenant's ratios after its report: exported within about this
RATIOS_EVERY_S = 10.0  # every exported ratio read again this often
RATIOS_FORGET_S = 600.0  # a tenant at 0% and 0%, neither noted nor paused this long: its series goes
RATIOS_MAX_TENANTS = 10_000  # beyond, the tenant that mattered least recently goes


class RatioGauges:
    """Per tenant (MAILPIPE_METRICS_TENANT_LABEL), the hard-bounce and complaint ratios, and the
    sends they are over (a tenant is judged from reputation_min_sends on), as they are now, in
    every process that weighs reports (the sender: synchronous bounces; the inbound stage: DSNs
    and complaints). The dashboard and the alerts take ``max by (tenant)`` across processes, so
    no process may keep a value that is no longer true: every series this process exports is
    read again every RATIOS_EVERY_S (its window slides with sends made by any sender; ``mailpipe
    tenants resume`` resets it), or removed.

    Exported: the tenants ``note``d here (within RATIOS_SOON_S of the note), and every paused
    tenant (a replica that starts after the pause shows it too). A tenant whose ratios read 0 and
    0, and that was neither noted nor paused for RATIOS_FORGET_S, is forgotten and its series
    removed: it can only come back by a report, which notes it again; one still above 0 stays, so
    its alert holds while its sends are few. A Redis error skips the read; the next full read
    (RATIOS_EVERY_S later) tries again. One thread: the stage's."""

    def __init__(self, client: redis.Redis, namespace: str, thresholds: reputation.Thresholds, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._namespace = namespace
        self._thresholds = thresholds
        self._clock = clock
        self._mattered: dict[str, float] = {}  # exported tenant -> when it last mattered, oldest first
        self._due: set[str] = set()  # noted, not read since
        self._soon_at = -math.inf  # the last read of the noted ones
        self._every_at = -math.inf  # the last full read

    @property
    def tenants(self) -> frozenset[str]:
        """The tenants whose series this process exports."""
        return frozenset(self._mattered)

    def note(self, tenants: Iterable[str]) -> None:
        """These tenants' ratios changed (a report weighed in them): exported soon, then kept."""
        now = self._clock()
        for tenant in tenants:
            self._matters(tenant, now)
            self._due.add(tenant)
        self._bound()

    def tick(self) -> None:
        """Read the ratios due: every one each RATIOS_EVERY_S, the noted ones within RATIOS_SOON_S."""
        now = self._clock()
        if now - self._every_at >= RATIOS_EVERY_S:
            self._every_at = self._soon_at = now
            self._read(self._mattered, full=True)
        elif self._due and now - self._soon_at >= RATIOS_SOON_S:
            self._soon_at = now
            self._read(self._due, full=False)

    def _read(self, tenants: Iterable[str], *, full: bool) -> None:
        try:
            standings = reputation.standings(self._client, self._namespace, tenants, self._thresholds,
                                             and_paused=full)
        except (redis.RedisError, ValueError):  # ValueError: a hash that reputation.lua did not write
            # Not again before the next full read (it has the noted ones): a Redis that hangs
            # would hold the stage's thread for its timeout on every try.
            self._due.clear()
            return
        now = self._clock()
        for standing in standings:
            tenant = standing.tenant
            self._due.discard(tenant)
            TENANT_BOUNCE_RATIO.labels(tenant).set(standing.bounce_ratio)
            TENANT_COMPLAINT_RATIO.labels(tenant).set(standing.complaint_ratio)
            TENANT_WINDOW_SENDS.labels(tenant).set(standing.sends_in_window)
            if (tenant not in self._mattered  # a paused one, new here
                    or standing.bounce_ratio or standing.complaint_ratio or standing.after == reputation.PAUSED):
                self._matters(tenant, now)
        if full:
            for tenant in [t for t, at in self._mattered.items() if now - at > RATIOS_FORGET_S]:
                self._forget(tenant)
        self._bound()

    def _matters(self, tenant: str, now: float) -> None:
        self._mattered.pop(tenant, None)  # to the end: the order is of when each last mattered
        self._mattered[tenant] = now

    def _bound(self) -> None:
        while len(self._mattered) > RATIOS_MAX_TENANTS:
            self._forget(next(iter(self._mattered)))

    def _forget(self, tenant: str) -> None:
        del self._mattered[tenant]
        self._due.discard(tenant)
        TENANT_BOUNCE_RATIO.remove(tenant)
        TENANT_COMPLAINT_RATIO.remove(tenant)
        TENANT_WINDOW_SENDS.remove(tenant)


# -- from a finding to its records and events ---------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    """One thing learnt about one recipient of one mail: a bounce (with its classified reply), a
    complaint or an unsubscribe. ``origin`` names what it came from (the report's id, or the
    sync reply's job and attempt): the events' ids derive from it."""

    type: str
    tenant: str
    recipient: str
    source: str
    origin: str
    at_ms: int
    job_id: str = ""
    server: str = ""
    shared: bool = False  # sent through a platform server: it weighs in the tenant's reputation
    reply: Reply | None = None
    feedback_type: str = ""
    reporting_mta: str = ""
    remote_mta: str = ""
    report_id: str = ""


def apply(client: redis.Redis, namespace: str, finding: Finding, policy: suppression.Policy,
          thresholds: reputation.Thresholds) -> list[Feedback]:
    """Record a finding (suppression, reputation), once however often it is applied, and return
    its events: the finding's own, ``suppressed`` when the address is (newly, or still, after a
    redelivery), ``reputation`` when the tenant's standing changed. Redis errors propagate."""
    return apply_many(client, namespace, [finding], policy, thresholds)[0]


def apply_many(client: redis.Redis, namespace: str, findings: Sequence[Finding], policy: suppression.Policy,
               thresholds: reputation.Thresholds) -> list[list[Feedback]]:
    """``apply`` for several findings, in two round trips (suppressions, then reputations)."""
    primaries = [_primary(f) for f in findings]
    kinds = [_suppression_kind(f) for f in findings]
    todo = [(i, k) for i, k in enumerate(kinds) if k is not None]
    recorded = suppression.record_many(client, namespace, [
        suppression.Record(findings[i].tenant, findings[i].recipient, k, _why(findings[i], primaries[i]),
                           primaries[i].id) for i, k in todo], policy)
    events = [[p] for p in primaries]
    weighed: list[int] = []
    for (i, kind), done in zip(todo, recorded, strict=True):
        finding, primary = findings[i], primaries[i]
        ttl = done.ttl_s
        shown = done.outcome in (suppression.Outcome.SUPPRESSED, suppression.Outcome.EXTENDED) or (
            done.outcome == suppression.Outcome.DUPLICATE and ttl != -2)  # a redelivery: the same event again
        if shown and ttl != -2:
            events[i].append(Feedback(
                id=event_id(primary.id, FeedbackType.SUPPRESSED), type=FeedbackType.SUPPRESSED,
                tenant=finding.tenant, at_ms=finding.at_ms, source=finding.source, recipient=finding.recipient,
                job_id=finding.job_id, server=finding.server, report_id=finding.report_id,
                until_ms=0 if ttl < 0 else finding.at_ms + ttl * 1000,
                reason=f"{kind}" + (f" ({done.soft_count} soft bounces)" if kind == suppression.Kind.SOFT_BOUNCE
                                    else ""),
                code=primary.code, status=primary.status, text=primary.text))
        if weighs(finding):
            weighed.append(i)
    standings = reputation.record_reports(client, namespace, [
        (findings[i].tenant, "complaint" if findings[i].type == FeedbackType.COMPLAINED else "bounce", primaries[i].id)
        for i in weighed], thresholds, findings[weighed[0]].at_ms if weighed else 0)
    for i, standing in zip(weighed, standings, strict=True):
        if standing.changed:
            events[i].append(Feedback(
                id=event_id(primaries[i].id, FeedbackType.REPUTATION), type=FeedbackType.REPUTATION,
                tenant=findings[i].tenant, at_ms=findings[i].at_ms, source=findings[i].source, state=standing.after,
                bounce_ratio=standing.bounce_ratio, complaint_ratio=standing.complaint_ratio,
                reason=_reputation_reason(standing, thresholds)))
    return events


def weighs(finding: Finding) -> bool:
    """Whether a finding weighs in its tenant's reputation: a hard bounce or a complaint of a
    mail sent through a shared (platform) server."""
    return finding.shared and (finding.type == FeedbackType.COMPLAINED
                               or _suppression_kind(finding) == suppression.Kind.HARD_BOUNCE)


def _primary(finding: Finding) -> Feedback:
    reply = finding.reply
    return Feedback(
        id=event_id(finding.origin, finding.type, finding.recipient.lower()), type=finding.type,
        tenant=finding.tenant, at_ms=finding.at_ms, source=finding.source, recipient=finding.recipient,
        job_id=finding.job_id, server=finding.server,
        bounce_class=reply.bounce if reply is not None and finding.type == FeedbackType.BOUNCED else "",
        code=reply.code if reply is not None else 0, status=(reply.enhanced or "") if reply is not None else "",
        text=reply.text[:1000] if reply is not None else "", category=reply.category if reply is not None else "",
        rule=reply.rule if reply is not None else "", advice=reply.advice if reply is not None else "",
        reporting_mta=finding.reporting_mta, remote_mta=finding.remote_mta, feedback_type=finding.feedback_type,
        report_id=finding.report_id)


def _why(finding: Finding, primary: Feedback) -> str:
    why = f"{finding.source} {primary.code or ''} {primary.status} {primary.text or finding.feedback_type}"
    return " ".join(why.split())[:500]


def _suppression_kind(finding: Finding) -> suppression.Kind | None:
    if finding.type == FeedbackType.COMPLAINED:
        return suppression.Kind.COMPLAINT
    if finding.type == FeedbackType.UNSUBSCRIBED:
        return suppression.Kind.UNSUBSCRIBE
    if finding.type == FeedbackType.BOUNCED and finding.reply is not None:
        return {BounceClass.HARD: suppression.Kind.HARD_BOUNCE,
                BounceClass.SOFT: suppression.Kind.SOFT_BOUNCE}.get(BounceClass(finding.reply.bounce))
    return None


def _reputation_reason(standing: reputation.Standing, thresholds: reputation.Thresholds) -> str:
    rates = (f"{standing.bounce_ratio:.1%} hard bounces and {standing.complaint_ratio:.2%} complaints over its last "
             f"{standing.sends_in_window} sends on shared servers")
    if standing.after == reputation.PAUSED:
        return (f"bulk mail to shared servers paused: {rates} (pause at {thresholds.pause_bounce:.0%} / "
                f"{thresholds.pause_complaint:.1%}); clean the list, then `mailpipe tenants resume`")
    return f"warning: {rates} (warned at {thresholds.warn_bounce:.0%} / {thresholds.warn_complaint:.1%})"


def suppression_kind_of(feedback: Feedback) -> str:
    """The metrics' kind label of a suppressed event."""
    return feedback.reason.partition(" ")[0]


def is_feedback(body: bytes) -> bool:
    """Whether a message of the events exchange is a feedback event (kind "feedback") rather
    than a delivery event (kind "event"): a subscriber bound to every key gets both."""
    try:
        obj = msgpack.unpackb(body, raw=False, max_bin_len=1024 * 1024, max_str_len=1024 * 1024)
    except Exception:  # not msgpack at all: not ours to say
        return False
    return isinstance(obj, dict) and obj.get("kind") == "feedback"
