"""created_ms from the wire (issue 21, item 6): milliseconds or refused at intake, naming the
field and the unit; and the retry age of a job already queued counts from when mailpipe took
the mail in, so a publisher's clock (or unit) cannot dead-letter it at its first 4xx."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from mailpipe import codec
from mailpipe.errors import InvalidMessage
from mailpipe.model import Job, now_ms
from mailpipe.settings import Settings
from sender.delivery import JobOutcome
from sender.replies import classify
from sender.stage import SenderStage
from tests.unit.test_sender_logic import BATCH

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def intake(created_ms: Any) -> bytes:
    return msgpack.packb({"v": 1, "kind": "intake", "id": "m1", "tenant": "acme", "sender": "a@acme.example",
                          "created_ms": created_ms, "to": ["x@example.com"], "subject": "s", "text": "t"})


@pytest.mark.parametrize(("value", "reads_as"), [
    (NOW_MS // 1000, "1970-01-21"),  # seconds
    (0, "1970-01-01"),
    (999_999_999_999, "2001-09-09"),
    (NOW_MS * 1000, "microseconds"),  # microseconds: year 57970
])
def test_a_time_not_in_milliseconds_is_refused_naming_the_field_and_the_unit(value: int, reads_as: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        codec.decode_intake(intake(value), 1024 * 1024)
    reason = info.value.reason
    assert reason.startswith(f"intake.created_ms: {value} is not milliseconds since the Unix epoch"), reason
    assert reads_as in reason and "milliseconds" in reason


@pytest.mark.parametrize("value", [1_000_000_000_000, NOW_MS, 99_999_999_999_999])
def test_milliseconds_are_accepted(value: int) -> None:
    assert codec.decode_intake(intake(value), 1024 * 1024).created_ms == value


def test_created_ms_is_still_required() -> None:
    with pytest.raises(InvalidMessage, match=r"intake\.created_ms: missing"):
        codec.decode_intake(intake(None), 1024 * 1024)


@pytest.fixture
def stage() -> SenderStage:
    return SenderStage(Settings(namespace="unit", retry_base_s=60, retry_max_s=240))


def deferred(job: Job, stage: SenderStage) -> list[str]:
    outcome = JobOutcome(job, attempted=True, at_ms=now_ms())
    outcome.deferred = {job.recipients[0]: classify(451, "4.7.1 greylisted, try again later")}
    out = stage.outputs.of_outcome(outcome, BATCH)
    return [codec.decode_event(o.body).outcome for o in out if o.exchange]


def job(**changes: Any) -> Job:
    fields: dict[str, Any] = {"id": "j1", "tenant": "acme", "server": "smtp", "sender": "hr@acme.example",
                              "recipients": ("r@x",), "message": b"x", "created_ms": now_ms(),
                              "enqueued_ms": now_ms()}
    return Job(**{**fields, **changes})


def test_a_job_queued_with_created_ms_in_seconds_is_retried_at_its_first_4xx(stage: SenderStage) -> None:
    """Greylisting answers 451 to every first mail: before, such a job was dead-lettered as expired."""
    seconds = job(created_ms=now_ms() // 1000)
    assert deferred(seconds, stage) == ["deferred"]
    assert deferred(job(created_ms=0), stage) == ["deferred"]


def test_the_retry_copy_keeps_the_publishers_created_ms(stage: SenderStage) -> None:
    original = job(created_ms=12345)
    outcome = JobOutcome(original, attempted=True, at_ms=now_ms())
    outcome.deferred = {"r@x": classify(451, "4.7.1 later")}
    [retry] = [o for o in stage.outputs.of_outcome(outcome, BATCH) if o.routing_key.startswith("unit.retry.")]
    copy = codec.decode_job(retry.body)
    assert (copy.created_ms, copy.enqueued_ms, copy.attempt) == (12345, original.enqueued_ms, 1)


def test_the_age_counts_from_when_mailpipe_took_the_mail_in(stage: SenderStage) -> None:
    max_age_ms = int(stage.settings.retry_max_age_s * 1000)
    old = now_ms() - max_age_ms - 60_000
    assert deferred(job(created_ms=now_ms(), enqueued_ms=old), stage) == ["expired"]
    # A job made elsewhere, without enqueued_ms: its created_ms, as before.
    assert deferred(job(created_ms=old, enqueued_ms=0), stage) == ["expired"]
    assert deferred(job(created_ms=now_ms(), enqueued_ms=0), stage) == ["deferred"]
