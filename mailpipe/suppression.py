"""Recipients a tenant must not mail any more, per tenant and address, fair to the recipient.

- A hard bounce (the address does not exist: 5.1.x, 5.2.1) suppresses at once, for
  ``suppress_hard_days`` (180); with ``suppress_hard_shared`` it does so for every tenant.
- Soft bounces (4.x, a full mailbox, an unknown failure) are counted, one a day at most, and
  suppress at ``soft_bounce_limit`` (3) within ``soft_bounce_window_days`` (30), for
  ``suppress_soft_days``. A delivery (a 250) resets the count.
- A complaint, an unsubscribe or a suppression by hand lasts until the tenant lifts it
  (``mailpipe suppression remove``).
- A sender- or reputation-caused failure (5.7.x, a blocklist) never suppresses anyone.

The intake fails later mail to a suppressed address (``suppressed``); the sender and the inbound
stage record (``record``), each recording atomically (``suppression.lua``) and at most once per
report (its event id). One Redis key per (tenant, address), expiring by itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import cast

import redis
from redis.commands.core import Script

from mailpipe.settings import Settings
from mailpipe.verp import today

MARK_TTL_S = 40 * 86400  # a report redelivered within this is recognised (tokens live 30 days)


class Kind(StrEnum):
    HARD_BOUNCE = "hard_bounce"
    SOFT_BOUNCE = "soft_bounce"
    COMPLAINT = "complaint"
    UNSUBSCRIBE = "unsubscribe"
    MANUAL = "manual"


UNTIL_LIFTED = (Kind.COMPLAINT, Kind.UNSUBSCRIBE, Kind.MANUAL)


def key(namespace: str, tenant: str, recipient: str) -> str:
    return f"{namespace}:suppressed:{tenant}:{recipient.lower()}"


def shared_key(namespace: str, recipient: str) -> str:
    """A hard bounce shared by every tenant (``suppress_hard_shared``)."""
    return f"{namespace}:suppressed-shared:{recipient.lower()}"


def soft_key(namespace: str, tenant: str, recipient: str) -> str:
    return f"{namespace}:soft-bounces:{tenant}:{recipient.lower()}"


def mark_key(namespace: str, event_id: str) -> str:
    return f"{namespace}:applied:{event_id}"


@dataclass(frozen=True)
class Policy:
    hard_days: int = 180
    soft_limit: int = 3
    soft_window_days: int = 30
    soft_days: int = 30
    hard_shared: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(hard_days=settings.suppress_hard_days, soft_limit=settings.soft_bounce_limit,
                   soft_window_days=settings.soft_bounce_window_days, soft_days=settings.suppress_soft_days,
                   hard_shared=settings.suppress_hard_shared)


class Outcome(StrEnum):
    SUPPRESSED = "suppressed"  # newly: worth a suppressed event
    EXTENDED = "extended"  # was already, now for longer
    COUNTED = "counted"  # a soft bounce counted, not (yet) suppressed; or a stronger one stands
    DUPLICATE = "duplicate"  # this report was recorded before


@dataclass(frozen=True)
class Recorded:
    outcome: Outcome
    soft_count: int
    days: int  # how long it is suppressed for, 0: until lifted (meaningful when suppressed)
    ttl_s: int = -2  # the address's suppression after this: seconds left, -1 until lifted, -2 none


@dataclass(frozen=True)
class Suppressed:
    tenant: str
    recipient: str
    reason: str
    expires_in_s: int  # -1: until lifted

    @property
    def kind(self) -> str:
        head = self.reason.partition(":")[0]
        return head if head in set(Kind) else Kind.HARD_BOUNCE  # older entries: bad_recipient


_SCRIPT: Script | None = None


def _script(client: redis.Redis) -> Script:
    """The script, sent once and then called by its SHA (EVALSHA, reloaded if Redis forgot it)."""
    global _SCRIPT
    if _SCRIPT is None:
        _SCRIPT = client.register_script(resources.files("mailpipe").joinpath("suppression.lua")
                                         .read_text(encoding="utf-8"))
    return _SCRIPT


@dataclass(frozen=True)
class Record:
    """One thing to record: a bounce (hard or soft), a complaint, an unsubscribe, a manual one."""

    tenant: str
    recipient: str
    kind: Kind
    reason: str
    event_id: str = ""  # recorded at most once per id (a redelivered report)
    day: int | None = None


def record(client: redis.Redis, namespace: str, tenant: str, recipient: str, kind: Kind, reason: str,
           policy: Policy, *, event_id: str = "", day: int | None = None) -> Recorded:
    """Record one bounce (hard or soft), complaint, unsubscribe or manual suppression."""
    return record_many(client, namespace, [Record(tenant, recipient, kind, reason, event_id, day)], policy)[0]


def record_many(client: redis.Redis, namespace: str, records: Sequence[Record], policy: Policy) -> list[Recorded]:
    """Record several in one round trip (each atomically, by the script)."""
    if not records:
        return []
    script = _script(client)
    days_of = [{Kind.HARD_BOUNCE: policy.hard_days, Kind.SOFT_BOUNCE: policy.soft_days}.get(r.kind, 0)
               for r in records]
    with client.pipeline(transaction=False) as pipe:
        for r, days in zip(records, days_of, strict=True):
            keys = [key(namespace, r.tenant, r.recipient), soft_key(namespace, r.tenant, r.recipient),
                    mark_key(namespace, r.event_id) if r.event_id else ""]
            action = "soft" if r.kind == Kind.SOFT_BOUNCE else "suppress"
            day = today() if r.day is None else r.day
            script(keys=keys, args=[action, f"{r.kind}: {r.reason}"[:2000], days * 86400, day, policy.soft_limit,
                                    policy.soft_window_days, MARK_TTL_S], client=pipe)
            if r.kind == Kind.HARD_BOUNCE and policy.hard_shared:  # never weakens: harmless when repeated
                script(keys=[shared_key(namespace, r.recipient), soft_key(namespace, "", r.recipient), ""],
                       args=["suppress", f"{r.kind}: (shared) a hard bounce for another tenant", days * 86400, 0, 0,
                             0, 0], client=pipe)
        replies = cast(list[list[int]], pipe.execute())
    if policy.hard_shared:  # drop the shared records' replies
        own, i = [], 0
        for r in records:
            own.append(replies[i])
            i += 2 if r.kind == Kind.HARD_BOUNCE else 1
        replies = own
    out = []
    for (code, counted, ttl_s), days in zip(replies, days_of, strict=True):
        outcome = {1: Outcome.SUPPRESSED, 2: Outcome.EXTENDED, -1: Outcome.DUPLICATE}.get(code, Outcome.COUNTED)
        out.append(Recorded(outcome=outcome, soft_count=counted, days=days, ttl_s=ttl_s))
    return out


def delivered(client: redis.Redis, namespace: str, pairs: Iterable[tuple[str, str]]) -> None:
    """A delivery resets the address's soft bounces: one round trip for a batch's recipients."""
    names = [soft_key(namespace, tenant, recipient) for tenant, recipient in pairs]
    if names:
        client.unlink(*names)


def suppress(client: redis.Redis, namespace: str, tenant: str, recipient: str, reason: str,
             days: int) -> None:
    """Suppress for ``days`` (the older API: a bad recipient the sender saw)."""
    client.set(key(namespace, tenant, recipient), reason.encode(), ex=days * 86400)


def suppressed(client: redis.Redis, namespace: str, lookups: Sequence[tuple[str, Sequence[str]]], *,
               shared: bool = False) -> list[dict[str, str]]:
    """For each (tenant, recipients), the recipients suppressed for that tenant (or, with
    ``shared``, by a hard bounce of any tenant), with why; all in one round trip."""
    with client.pipeline(transaction=False) as pipe:
        for tenant, recipients in lookups:
            pipe.mget([key(namespace, tenant, r) for r in recipients])
            if shared:
                pipe.mget([shared_key(namespace, r) for r in recipients])
        found = cast(list[list[bytes | None]], pipe.execute())
    step = 2 if shared else 1
    out = []
    for i, (_, recipients) in enumerate(lookups):
        marks = found[i * step]
        if shared:
            marks = [m or s for m, s in zip(marks, found[i * step + 1], strict=True)]
        out.append({r: v.decode("utf-8", "replace") for r, v in zip(recipients, marks, strict=True) if v is not None})
    return out


def list_suppressed(client: redis.Redis, namespace: str, tenant: str | None = None) -> list[Suppressed]:
    prefix = f"{namespace}:suppressed:"
    pattern = f"{prefix}{tenant}:*" if tenant else f"{prefix}*"
    rows = []
    for raw in client.scan_iter(match=pattern, count=1000):
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        owner, _, recipient = name[len(prefix):].partition(":")
        if tenant is not None and owner != tenant:  # a tenant named like "acme:x" is another's
            continue
        reason = cast(bytes | None, client.get(name))
        ttl = cast(int, client.ttl(name))
        if reason is not None:
            rows.append(Suppressed(owner, recipient, reason.decode("utf-8", "replace"), ttl))
    return sorted(rows, key=lambda s: (s.tenant, s.recipient))


def add(client: redis.Redis, namespace: str, tenant: str, recipient: str, reason: str) -> bool:
    """Suppress by hand, until lifted; True when it was not suppressed before."""
    done = record(client, namespace, tenant, recipient, Kind.MANUAL, reason or "added by hand", Policy())
    return done.outcome == Outcome.SUPPRESSED


def remove(client: redis.Redis, namespace: str, tenant: str, recipient: str) -> bool:
    """Lift a suppression (and forget the address's soft bounces)."""
    removed = client.delete(key(namespace, tenant, recipient))
    client.delete(soft_key(namespace, tenant, recipient))
    return bool(removed)
