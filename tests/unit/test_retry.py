"""The retry policy (mailpipe/retry.py), alone: what happens to recipients a server did not accept."""

from __future__ import annotations

import dataclasses
import random

from mailpipe.model import Job
from mailpipe.retry import Expire, Fail, Retry, RetryPolicy, retry_delays, retry_step
from mailpipe.settings import Settings
from sender.replies import classify, connection_failure

DAY_MS = 86_400_000
JOB = Job(id="j1", tenant="acme", server="s1", sender="hr@acme.example", recipients=("a@x.example", "b@x.example"),
          message=b"Subject: hi\r\n\r\nhello\r\n", created_ms=1_000_000, attempt=0)
POLICY = RetryPolicy(delays_s=(60, 120, 240), max_age_s=4 * 86_400)


def test_a_permanent_refusal_fails_with_the_replys_category() -> None:
    step = retry_step(JOB, ("a@x.example",), classify(550, "5.1.1 no such user"), JOB.created_ms, POLICY)
    assert isinstance(step, Fail)
    assert step.job.recipients == ("a@x.example",) and step.job.attempt == 0
    assert step.category == "bad_recipient" and step.reason == "refused by s1: 550 5.1.1 no such user"


def test_a_transient_refusal_retries_one_attempt_later_with_jittered_delay() -> None:
    rng = random.Random(1)
    steps = [retry_step(JOB, ("b@x.example",), classify(451, "try later"), JOB.created_ms + 1000, POLICY, rng)
             for _ in range(200)]
    assert all(isinstance(s, Retry) and s.job.attempt == 1 and s.job.recipients == ("b@x.example",) for s in steps)
    waits = [s.expiration_ms for s in steps if isinstance(s, Retry)]
    assert 48_000 <= min(waits) < 50_000 and 58_000 < max(waits) <= 60_000  # 80% to 100% of 60 s


def test_delays_double_and_stay_at_the_last() -> None:
    later = [retry_step(dataclasses.replace(JOB, attempt=n), ("a@x.example",), connection_failure("refused"),
                        JOB.created_ms, POLICY, random.Random(0)) for n in range(5)]
    assert [s.job.attempt for s in later if isinstance(s, Retry)] == [1, 2, 3, 4, 5]
    assert [POLICY.delay_s(s.job.attempt) for s in later] == [60, 120, 240, 240, 240]


def test_past_its_maximum_age_a_deferred_mail_expires() -> None:
    step = retry_step(dataclasses.replace(JOB, attempt=6), JOB.recipients, classify(421, "busy"),
                      JOB.created_ms + 4 * DAY_MS + 1, POLICY)
    assert isinstance(step, Expire)
    assert step.reason == "expired after 7 attempt(s); last reply: 421 busy"
    exactly = retry_step(JOB, JOB.recipients, classify(421, "busy"), JOB.created_ms + 4 * DAY_MS, POLICY)
    assert isinstance(exactly, Retry)  # at the limit, not past it


def test_the_policy_comes_from_the_settings() -> None:
    policy = RetryPolicy.from_settings(Settings(retry_base_s=30, retry_max_s=100, retry_max_age_s=3600))
    assert policy == RetryPolicy((30, 60, 100), 3600)
    assert retry_delays(60, 3600) == (60, 120, 240, 480, 960, 1920, 3600)
