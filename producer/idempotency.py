"""Idempotency keys at intake: a two-phase claim in Redis, scoped to the tenant.

A keyed job is claimed before it is published (``SET key "pending:<token>" NX PX lease``) and
marked "queued" once the broker has confirmed it. So of two copies of one request in flight,
only the one that claimed the key publishes; the other waits until the key is "queued" (a
duplicate, dropped) or gone (its holder died before the confirm and the lease ran out: it
claims the key and publishes). The lease ends the wait on a dead holder; a holder that dies
after its confirm but before "queued" costs one duplicate job (the sender's per-recipient
marks catch it), never a lost one.

The Redis key comes from the tenant and a hash of the idempotency key, never from the job id
on the wire: a tenant cannot reach, or collide with, another tenant's keys.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import redis

from mailpipe.errors import RedisUnavailable
from mailpipe.model import Job

log = logging.getLogger(__name__)

QUEUED = b"queued"
PENDING = b"pending:"

# Delete the claim only if it is still ours: after our lease ran out another holder may own it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Verdict(Enum):
    MINE = "mine"  # claimed by this call: publish it, then confirm
    DUPLICATE = "duplicate"  # queued already: ack and drop
    PENDING = "pending"  # another holder is publishing it: neither publish nor ack; ask again


@dataclass(frozen=True)
class Claim:
    token: str
    verdicts: tuple[Verdict, ...]  # one per job claimed, in order


class Idempotency:
    def __init__(self, client: redis.Redis, namespace: str, *, lease_s: float, ttl_s: int) -> None:
        self.redis = client
        self.namespace = namespace
        self.lease_ms = max(1, round(lease_s * 1000))  # PX 0 is an error in Redis
        self.ttl_s = ttl_s
        self._release = client.register_script(_RELEASE)

    def key(self, job: Job) -> str:
        assert job.idempotency_key is not None
        digest = hashlib.sha256(job.idempotency_key.encode("utf-8")).hexdigest()
        # The digest is fixed-length hex, so a tenant name holding ":" cannot forge another's key.
        return f"{self.namespace}:idem:{job.tenant}:{digest}"

    def claim(self, jobs: Sequence[Job]) -> Claim:
        """Claim every job's key that is free, in one round trip; say what each job is."""
        # A fresh token per call: two copies of one key in the same call are told apart by
        # which SET won, and a release deletes only the claims of this call.
        token = uuid.uuid4().hex
        if not jobs:
            return Claim(token, ())
        pending = PENDING + token.encode()
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for job in jobs:
                    key = self.key(job)
                    pipe.set(key, pending, nx=True, px=self.lease_ms)
                    pipe.get(key)
                found = pipe.execute()
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: cannot claim idempotency keys: {exc}") from exc
        verdicts = []
        for claimed, value in zip(found[::2], found[1::2], strict=True):
            if claimed:
                verdicts.append(Verdict.MINE)
            elif value is None or value.startswith(PENDING):
                # None: the holder's lease ran out between our SET and GET; ask again later.
                verdicts.append(Verdict.PENDING)
            else:
                verdicts.append(Verdict.DUPLICATE)
        return Claim(token, tuple(verdicts))

    def confirm(self, jobs: Sequence[Job]) -> None:
        """Mark the jobs queued: call only once the broker has confirmed their publish."""
        self.confirm_keys([self.key(job) for job in jobs])

    def confirm_keys(self, keys: Sequence[str]) -> None:
        """``confirm`` by the jobs' Redis keys (``key``): for jobs published while Redis refused
        to mark them, marked once it answers again."""
        if not keys:
            return
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(key, QUEUED, ex=self.ttl_s)
                pipe.execute()
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis: cannot mark idempotency keys queued: {exc}") from exc

    def release(self, jobs: Sequence[Job], token: str) -> None:
        """Give back the claims ``token`` made (their publish failed), so a retry need not wait
        out the lease. Best effort: if Redis fails too, the lease ends the claim."""
        if not jobs:
            return
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for job in jobs:
                    self._release(keys=[self.key(job)], args=[PENDING + token.encode()], client=pipe)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("cannot release %d idempotency claim(s), they expire with their lease: %s",
                        len(jobs), exc)
