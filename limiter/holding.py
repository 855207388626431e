"""What a limiter replica holds, and the pure decisions about it: which lanes to take from, how a
batch is split per tenant, what is left of a batch granted in part. No I/O here.

A held batch was taken from its lane with ``basic.get`` and is held unacked (and registered as a
hold in Redis) until all of it is granted, or what is left goes back into its lane.
"""

from __future__ import annotations

import dataclasses
from collections import Counter as Tally
from collections import deque
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

from mailpipe.amqp import Delivery
from mailpipe.codec import decode_job
from mailpipe.errors import InvalidMessage
from mailpipe.model import Batch, derived_id
from mailpipe.servers import Config

Line = tuple[str, str]  # (server, tenant): the batches of one tenant for one server, in order


@dataclass(eq=False)  # a held batch is itself: line.remove() and ``in`` go by identity
class Held:
    """A batch of one tenant taken from lane ``lane`` of its server; ``offset`` of its jobs are
    granted already (published to send as parts). ``member`` names its hold in Redis."""

    delivery: Delivery
    batch: Batch
    tenant: str
    lane: str
    member: str
    since: float  # monotonic: when it was taken
    due: float  # monotonic: when to ask Redis
    ahead: bool = False  # transactional mail within its tenant's ration: no turn to wait for
    offset: int = 0
    turn: bool = False  # last refused for another tenant's turn: asks as soon as its own comes
    sizes: list[int] | None = None  # each job's message bytes, read once the batch is split

    def bytes_of(self, start: int, end: int) -> int:
        """The message bytes of jobs ``[start, end)``: the batch's own figure for all of it, else
        the jobs' own, decoded only when a batch is split (decoding every job of every batch
        taken was 42% of the limiter's CPU). A job that does not decode counts its encoded size:
        the sender dead-letters it with its reason."""
        if start == 0 and end == self.batch.mails:
            return self.batch.bytes
        if self.sizes is None:
            self.sizes = [_size(raw) for raw in self.batch.jobs]
        return sum(self.sizes[start:end])

    @property
    def line(self) -> Line:
        return self.batch.server, self.tenant

    @property
    def remaining(self) -> int:
        return self.batch.mails - self.offset

    @property
    def part_id(self) -> str:
        """The id of the part asked for next: the batch's own for the first."""
        return self.batch.id if self.offset == 0 else derived_id(self.batch.id, f"from:{self.offset}")


@dataclass(frozen=True)
class Budget:
    """How much one replica holds: batches in all (each up to 80 MB in memory), per server (a
    quarter stays free for other servers), per lane (more only where no turn is waited for)."""

    total: int
    per_server: int
    per_lane_fair: int = 2

    def per_lane(self, fair: bool) -> int:
        return self.per_lane_fair if fair else self.per_server


def choose_takes(candidates: Sequence[tuple[str, int]], held: Mapping[str, int], waiting: Set[str],
                 server_held: int, total_held: int, budget: Budget, fair: bool,
                 empty_at: Mapping[str, int]) -> list[str]:
    """Which of a server's candidate lanes (from ``plan``, in order, with their versions) to take
    one batch from now: within the budget; not a lane found empty at this same version; and not
    a lane whose batch held here is waiting for a refusal to pass (the next would wait too)."""
    out: list[str] = []
    for lane, version in candidates:
        if total_held + len(out) >= budget.total or server_held + len(out) >= budget.per_server:
            break
        if held.get(lane, 0) >= budget.per_lane(fair) or lane in waiting or empty_at.get(lane) == version:
            continue
        out.append(lane)
    return out


def unknown_names(batch: Batch, tenants: Mapping[str, int], config: Config) -> str | None:
    """Why this batch cannot be limited: a server or tenant the servers file does not name."""
    if batch.server not in config.servers:
        return f"unknown server {batch.server!r}: not in the servers file"
    missing = sorted(t for t in tenants.keys() | batch.refund_tenants.keys() if t not in config.tenants)
    if missing:
        return f"unknown tenant(s) {', '.join(repr(t) for t in missing)}: not in the servers file"
    return None


def _size(raw: bytes) -> int:
    try:
        return decode_job(raw).size
    except InvalidMessage:
        return len(raw)


def by_tenant(batch: Batch) -> list[Batch]:
    """One batch per tenant, jobs in their order, with stable ids (the same on a redelivery),
    without the refund (applied when the batch is routed). A batch of one tenant keeps its id."""
    jobs: dict[str, list[bytes]] = {}
    sizes: Tally[str] = Tally()
    for raw in batch.jobs:
        job = decode_job(raw)
        jobs.setdefault(job.tenant, []).append(raw)
        sizes[job.tenant] += job.size
    if len(jobs) == 1:
        tenant = next(iter(jobs))
        return [dataclasses.replace(batch, tenants={tenant: batch.mails}, refund=0, refund_of=None,
                                    refund_tenants={}, grant_id=None, granted_ms=None, deadline_ms=None)]
    return [Batch(id=derived_id(batch.id, f"tenant:{tenant}"), server=batch.server, jobs=tuple(raws),
                  mails=len(raws), bytes=sizes[tenant], created_ms=batch.created_ms, tenants={tenant: len(raws)},
                  priority=batch.priority) for tenant, raws in jobs.items()]


def rest_of(batch: Batch, tenant: str, offset: int, rest_bytes: int) -> Batch:
    """The jobs of one tenant's ``batch`` from ``offset`` on, as a batch of its own (a stable new id)."""
    jobs = batch.jobs[offset:]
    return Batch(id=derived_id(batch.id, f"rest:{offset}"), server=batch.server, jobs=jobs, mails=len(jobs),
                 bytes=rest_bytes, created_ms=batch.created_ms, tenants={tenant: len(jobs)},
                 priority=batch.priority)


def lines_of(held: Sequence[Held]) -> dict[Line, deque[Held]]:
    """Held batches by line, transactional mail within its ration first, then in the order taken."""
    lines: dict[Line, deque[Held]] = {}
    for h in sorted(held, key=lambda h: (not h.ahead, h.since)):
        lines.setdefault(h.line, deque()).append(h)
    return lines
