"""What happens to mail a server did not accept: the whole retry policy, in one pure function.

A reply says (``sender/replies.py``) whether the mail may go later (4xx, a connection that
failed: ``Reply.transient``) or never (5xx). ``retry_step`` answers what to do with the
recipients that got it:

- ``Fail``: refused for good: a dead letter, categorised by the reply.
- ``Expire``: may go later, but the mail is older than ``max_age_s``: a dead letter, "expired".
- ``Retry``: the same job for those recipients, one attempt more, through the retry queue of
  its delay. Delays double from ``base_s`` to ``max_s`` (the topology declares one queue per
  delay, ``<ns>.retry.<delay>s``, which dead-letters back to ``jobs``); each message waits
  80% to 100% of its queue's delay (its own expiration), so mail deferred together by a busy
  server does not come back all at once.

The sender encodes and publishes what this returns; nothing else decides it.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from mailpipe.model import Job
from mailpipe.settings import Settings

JITTER = 0.2  # a retry waits (1 - JITTER) to 100% of its delay


class Refusal(Protocol):
    """What ``retry_step`` needs of a reply (``sender.replies.Reply`` is one; ``str()`` of it
    is how it reads in a dead letter's reason)."""

    @property
    def transient(self) -> bool: ...

    @property
    def category(self) -> str: ...


def retry_delays(base_s: float, max_s: float) -> tuple[int, ...]:
    """base, 2 x base, 4 x base ... up to max, in whole seconds: one retry queue each."""
    delays: list[int] = []
    delay = max(1.0, base_s)
    while True:
        step = max(1, int(min(delay, max_s)))  # a max below 1 s must not make a 0 s TTL: no delay
        if step not in delays:
            delays.append(step)
        if delay >= max_s:
            return tuple(delays)
        delay *= 2


@dataclass(frozen=True)
class RetryPolicy:
    delays_s: tuple[int, ...] = (60,)
    max_age_s: float = 4 * 24 * 3600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(retry_delays(settings.retry_base_s, settings.retry_max_s), settings.retry_max_age_s)

    def delay_s(self, attempt: int) -> int:
        return delay_for(self.delays_s, attempt)


def delay_for(delays_s: tuple[int, ...], attempt: int) -> int:
    """The delay before a job's ``attempt``-th retry (1-based), the last one from then on."""
    return delays_s[min(max(attempt, 1), len(delays_s)) - 1]


class Retry(NamedTuple):
    job: Job  # the recipients to try again, ``attempt`` one more
    expiration_ms: int  # how long it waits in its retry queue (jittered)


class Expire(NamedTuple):
    job: Job
    reason: str


class Fail(NamedTuple):
    job: Job
    category: str
    reason: str


Step = Retry | Expire | Fail


def retry_step(job: Job, recipients: tuple[str, ...], reply: Refusal, now_ms: int, policy: RetryPolicy,
               rng: random.Random | None = None) -> Step:
    """What to do with ``recipients`` of ``job`` after ``reply``, at ``now_ms``."""
    copy = dataclasses.replace(job, recipients=recipients)
    if not reply.transient:
        return Fail(copy, reply.category, f"refused by {job.server}: {reply}")
    if now_ms - job.created_ms > policy.max_age_s * 1000:
        return Expire(copy, f"expired after {job.attempt + 1} attempt(s); last reply: {reply}")
    again = dataclasses.replace(copy, attempt=job.attempt + 1)
    delay_ms = policy.delay_s(again.attempt) * 1000
    return Retry(again, int(delay_ms * (rng or random).uniform(1 - JITTER, 1.0)))
