"""Recipients that failed permanently as ``bad_recipient``, suppressed per tenant for a while.

The sender records them; the intake fails later mail to them with reason ``suppressed``;
``mailpipe suppression list|remove`` manages them. One Redis key per tenant and recipient,
expiring by itself after ``suppress_days``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import redis


def key(namespace: str, tenant: str, recipient: str) -> str:
    return f"{namespace}:suppressed:{tenant}:{recipient.lower()}"


@dataclass(frozen=True)
class Suppressed:
    tenant: str
    recipient: str
    reason: str
    expires_in_s: int


def suppress(client: redis.Redis, namespace: str, tenant: str, recipient: str, reason: str,
             days: int) -> None:
    client.set(key(namespace, tenant, recipient), reason.encode(), ex=days * 86400)


def suppressed(client: redis.Redis, namespace: str,
               lookups: Sequence[tuple[str, Sequence[str]]]) -> list[dict[str, str]]:
    """For each (tenant, recipients), the recipients suppressed for that tenant, with why; all
    in one round trip."""
    with client.pipeline(transaction=False) as pipe:
        for tenant, recipients in lookups:
            pipe.mget([key(namespace, tenant, r) for r in recipients])
        found = cast(list[list[bytes | None]], pipe.execute())
    return [{r: v.decode("utf-8", "replace") for r, v in zip(recipients, marks, strict=True) if v is not None}
            for (_, recipients), marks in zip(lookups, found, strict=True)]


def list_suppressed(client: redis.Redis, namespace: str, tenant: str | None = None) -> list[Suppressed]:
    prefix = f"{namespace}:suppressed:"
    pattern = f"{prefix}{tenant}:*" if tenant else f"{prefix}*"
    rows = []
    for raw in client.scan_iter(match=pattern, count=1000):
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        owner, _, recipient = name[len(prefix):].partition(":")
        reason = cast(bytes | None, client.get(name))
        ttl = cast(int, client.ttl(name))
        if reason is not None:
            rows.append(Suppressed(owner, recipient, reason.decode("utf-8", "replace"), ttl))
    return sorted(rows, key=lambda s: (s.tenant, s.recipient))


def remove(client: redis.Redis, namespace: str, tenant: str, recipient: str) -> bool:
    return bool(client.delete(key(namespace, tenant, recipient)))
