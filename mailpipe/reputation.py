"""A tenant that hurts everyone's deliverability is stopped (issue 23).

Per tenant, over its last ``reputation_window_sends`` (1,000) sends on the platform's (shared)
servers: at ``reputation_warn_*`` (5% hard bounces, 0.1% complaints) an event warns; at
``reputation_pause_*`` (10%, 0.5%) its bulk mail (priority "normal") to shared servers is
paused, transactional mail still flows, until ``mailpipe tenants resume``.

The sender counts sends (``record_sends``); whoever learns of a hard bounce or a complaint on a
shared server (the sender, the inbound stage) records it (``record_report``), which weighs it in
one atomic script (``reputation.lua``) and returns the state before and after.

For the limiter: ``paused_tenants(client, namespace)`` is every paused tenant with why, from the
one hash ``<ns>:reputation:paused`` (field: tenant, value: JSON with reason, since_ms,
bounce_ratio, complaint_ratio). A Lua script may read it directly: ``HEXISTS <ns>:reputation:paused
<tenant>``. The pause applies to the tenant's priority-"normal" batches on servers marked
``platform = true``; nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

import redis
from redis.commands.core import Script

from mailpipe.settings import Settings

MARK_TTL_S = 40 * 86400
OK, WARNED, PAUSED = "ok", "warned", "paused"


def tenant_key(namespace: str, tenant: str) -> str:
    return f"{namespace}:reputation:{tenant}"


def paused_key(namespace: str) -> str:
    return f"{namespace}:reputation:paused"


@dataclass(frozen=True)
class Thresholds:
    window_sends: int = 1000
    min_sends: int = 200
    warn_bounce: float = 0.05
    pause_bounce: float = 0.10
    warn_complaint: float = 0.001
    pause_complaint: float = 0.005

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        return cls(window_sends=settings.reputation_window_sends, min_sends=settings.reputation_min_sends,
                   warn_bounce=settings.reputation_warn_bounce_ratio,
                   pause_bounce=settings.reputation_pause_bounce_ratio,
                   warn_complaint=settings.reputation_warn_complaint_ratio,
                   pause_complaint=settings.reputation_pause_complaint_ratio)


@dataclass(frozen=True)
class Standing:
    """A tenant's state after a report: ``before`` is "duplicate" for a report seen already."""

    tenant: str
    before: str
    after: str
    bounce_ratio: float
    complaint_ratio: float
    sends_in_window: int

    @property
    def changed(self) -> bool:
        return self.before not in (self.after, "duplicate")


@dataclass(frozen=True)
class Pause:
    tenant: str
    reason: str
    since_ms: int
    bounce_ratio: float
    complaint_ratio: float


_SCRIPT: Script | None = None


def _script(client: redis.Redis) -> Script:
    global _SCRIPT
    if _SCRIPT is None:
        _SCRIPT = client.register_script(resources.files("mailpipe").joinpath("reputation.lua")
                                         .read_text(encoding="utf-8"))
    return _SCRIPT


def record_sends(client: redis.Redis, namespace: str, sends: Mapping[str, int]) -> None:
    """Count mails accepted (250) on shared servers, per tenant: one round trip."""
    if not sends:
        return
    with client.pipeline(transaction=False) as pipe:
        for tenant, count in sends.items():
            pipe.hincrby(tenant_key(namespace, tenant), "sends", count)
        pipe.execute()


def record_report(client: redis.Redis, namespace: str, tenant: str, kind: str, thresholds: Thresholds,
                  now_ms: int, *, event_id: str = "") -> Standing:
    """Weigh a hard bounce (``kind`` "bounce") or a complaint of a mail sent on a shared server."""
    return record_reports(client, namespace, [(tenant, kind, event_id)], thresholds, now_ms)[0]


def record_reports(client: redis.Redis, namespace: str, reports: Sequence[tuple[str, str, str]],
                   thresholds: Thresholds, now_ms: int) -> list[Standing]:
    """Weigh several (tenant, "bounce" or "complaint", event id) in one round trip, in order."""
    if not reports:
        return []
    script = _script(client)
    t = thresholds
    with client.pipeline(transaction=False) as pipe:
        for tenant, kind, event_id in reports:
            if kind not in ("bounce", "complaint"):
                raise ValueError(f"kind must be bounce or complaint, not {kind!r}")
            keys = [tenant_key(namespace, tenant), paused_key(namespace),
                    f"{namespace}:applied:rep:{event_id}" if event_id else ""]
            script(keys=keys, args=[tenant, kind, t.window_sends, t.min_sends, t.warn_bounce, t.pause_bounce,
                                    t.warn_complaint, t.pause_complaint, now_ms, MARK_TTL_S], client=pipe)
        replies = cast(list[list[Any]], pipe.execute())
    return [Standing(tenant=tenant, before=_text(before), after=_text(after), bounce_ratio=float(_text(bounce)),
                     complaint_ratio=float(_text(complaint)), sends_in_window=int(in_window))
            for (tenant, _, _), (before, after, bounce, complaint, in_window) in zip(reports, replies, strict=True)]


def paused_tenants(client: redis.Redis, namespace: str) -> dict[str, Pause]:
    """Every paused tenant and why, in one round trip (what the limiter asks)."""
    raw = cast(dict[bytes, bytes], client.hgetall(paused_key(namespace)))
    out = {}
    for name, value in raw.items():
        tenant = _text(name)
        try:
            data = json.loads(value)
        except ValueError:
            data = {"reason": _text(value)}
        out[tenant] = Pause(tenant=tenant, reason=str(data.get("reason", "")), since_ms=int(data.get("since_ms", 0)),
                            bounce_ratio=float(data.get("bounce_ratio", 0)),
                            complaint_ratio=float(data.get("complaint_ratio", 0)))
    return out


def pause(client: redis.Redis, namespace: str, tenant: str, reason: str, now_ms: int) -> None:
    """Pause a tenant's bulk mail to shared servers by hand."""
    client.hset(paused_key(namespace), tenant, json.dumps({"reason": reason, "since_ms": now_ms}))
    client.hset(tenant_key(namespace, tenant), "state", PAUSED)


def resume(client: redis.Redis, namespace: str, tenant: str) -> bool:
    """Lift the pause and start a fresh window (the old one would pause it again at once)."""
    was = bool(client.hdel(paused_key(namespace), tenant))
    client.delete(tenant_key(namespace, tenant))
    return was


def standing(client: redis.Redis, namespace: str, tenant: str, thresholds: Thresholds) -> Standing:
    """A tenant's ratios now, without recording anything (``mailpipe status``)."""
    return _weighed(tenant, cast(dict[bytes, bytes], client.hgetall(tenant_key(namespace, tenant))), thresholds)


READ_CHUNK = 500  # tenants read per round trip by ``standings``: a reply of a few hundred kB at most


def standings(client: redis.Redis, namespace: str, tenants: Iterable[str], thresholds: Thresholds, *,
              and_paused: bool = False) -> list[Standing]:
    """``standing`` of each tenant (once each, sorted), in one round trip per READ_CHUNK tenants;
    ``and_paused``: every paused tenant's too (one round trip more, for their names)."""
    names = set(tenants)
    if and_paused:
        names.update(_text(name) for name in cast(list[bytes], client.hkeys(paused_key(namespace))))
    ordered = sorted(names)
    out: list[Standing] = []
    for start in range(0, len(ordered), READ_CHUNK):
        chunk = ordered[start:start + READ_CHUNK]
        with client.pipeline(transaction=False) as pipe:
            for tenant in chunk:
                pipe.hgetall(tenant_key(namespace, tenant))
            replies = cast(list[dict[bytes, bytes]], pipe.execute())
        out += [_weighed(tenant, data, thresholds) for tenant, data in zip(chunk, replies, strict=True)]
    return out


def _weighed(tenant: str, raw: Mapping[Any, Any], thresholds: Thresholds) -> Standing:
    """The ratios of a tenant's hash as ``reputation.lua`` weighs them (the same window)."""
    data = {_text(k): _text(v) for k, v in raw.items()}
    size = max(1, thresholds.window_sends // 10)
    sends = int(data.get("sends", 0))
    bucket = sends // size
    bounces = sum(int(data.get(f"b:{b}", 0)) for b in range(bucket - 9, bucket + 1))
    complaints = sum(int(data.get(f"c:{b}", 0)) for b in range(bucket - 9, bucket + 1))
    in_window = max(1, sends - max(0, (bucket - 9) * size))
    state = data.get("state", OK)
    return Standing(tenant, state, state, bounces / in_window, complaints / in_window, in_window)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
