"""Packing jobs into batches: pure decisions, no I/O.

One open batch per SMTP server, tenant and priority: a grant serves one tenant, so the limiter
can share a server between tenants (limiter/gcra.py), and a small tenant's batch never waits
to fill up behind a large one's. A batch closes when the next job would take it
over ``max_mails`` or ``max_bytes`` (the rendered messages' bytes: the seeds' 500 mails and
80 MB), when it reaches either exactly, or when its first job has waited ``linger_s``. A
high-priority batch (transactional mail) does not linger: it closes at the next tick.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class OpenBatch:
    server: str
    opened_at: float
    priority: str = "normal"
    jobs: list[bytes | memoryview] = field(default_factory=list)  # a bundle's jobs are views of it
    tags: list[int] = field(default_factory=list)  # each job's delivery, to settle once it is confirmed
    bytes: int = 0
    tenants: Counter[str] = field(default_factory=Counter)

    @property
    def mails(self) -> int:
        return len(self.jobs)


class Packer:
    def __init__(self, max_mails: int, max_bytes: int, linger_s: float) -> None:
        self.max_mails = max_mails
        self.max_bytes = max_bytes
        self.linger_s = linger_s
        self.open: dict[tuple[str, str, str], OpenBatch] = {}

    def fits_alone(self, size: int) -> bool:
        return size <= self.max_bytes

    def add(self, server: str, tenant: str, job: bytes | memoryview, size: int, tag: int, now: float,
            priority: str = "normal") -> list[OpenBatch]:
        """Add a job; return the batches this closes (zero, one or two)."""
        if not self.fits_alone(size):
            raise ValueError(f"a {size}-byte job can never fit a {self.max_bytes}-byte batch")
        closed: list[OpenBatch] = []
        key = (server, tenant, priority)
        batch = self.open.get(key)
        if batch is not None and (batch.mails + 1 > self.max_mails or batch.bytes + size > self.max_bytes):
            closed.append(self.open.pop(key))
            batch = None
        if batch is None:
            batch = self.open[key] = OpenBatch(server=server, opened_at=now, priority=priority)
        batch.jobs.append(job)
        batch.tags.append(tag)
        batch.bytes += size
        batch.tenants[tenant] += 1
        if batch.mails == self.max_mails or batch.bytes == self.max_bytes:
            closed.append(self.open.pop(key))
        return closed

    def due(self, now: float) -> list[OpenBatch]:
        """Batches whose first job has waited ``linger_s``; high-priority ones at once."""
        keys = [k for k, b in self.open.items() if b.priority == "high" or now - b.opened_at >= self.linger_s]
        return [self.open.pop(k) for k in keys]

    def close_all(self) -> list[OpenBatch]:
        closed = list(self.open.values())
        self.open.clear()
        return closed

    @property
    def held(self) -> int:
        return sum(b.mails for b in self.open.values())
