"""The sender's pure pieces: error translation, TLS contexts, the outputs of a finished batch."""

from __future__ import annotations

import ssl
from typing import Any

import aiosmtplib
import pytest

from mailpipe import codec
from mailpipe.errors import SmtpPermanent, SmtpTransient
from mailpipe.model import Batch, Job, now_ms
from mailpipe.servers import parse_config
from mailpipe.settings import Settings
from sender.delivery import JobOutcome
from sender.outputs import group
from sender.replies import SENT_REPLY, classify, connection_failure
from sender.smtp import tls_context
from sender.stage import SenderStage
from sender.translate import error_for, reply_of, translate


def test_translate_keeps_code_text_and_category() -> None:
    err = translate(aiosmtplib.SMTPResponseException(553, "5.7.1 Unable to relay"), "s", "sending")
    assert isinstance(err, SmtpPermanent)
    assert (err.code, err.text, err.category) == (553, "5.7.1 Unable to relay", "relay_denied")
    err = translate(aiosmtplib.SMTPAuthenticationError(535, "5.7.8 Bad credentials"), "s", "AUTH")
    assert isinstance(err, SmtpPermanent) and err.category == "auth_failed"
    err = translate(aiosmtplib.SMTPResponseException(421, "4.3.2 Service shutting down"), "s", "sending")
    assert isinstance(err, SmtpTransient) and err.category == "connection"


@pytest.mark.parametrize("exc", [
    aiosmtplib.SMTPServerDisconnected("Unexpected EOF"), aiosmtplib.SMTPReadTimeoutError("Timed out"),
    ConnectionRefusedError(111, "Connection refused"), TimeoutError(),
])
def test_connection_level_failures_are_transient(exc: BaseException) -> None:
    err = translate(exc, "s", "connect")
    assert isinstance(err, SmtpTransient) and err.category == "connection" and err.code == 0


def test_tls_errors_are_tls_failed_even_when_wrapped() -> None:
    wrapped = aiosmtplib.SMTPConnectError("Error connecting")
    wrapped.__cause__ = ssl.SSLCertVerificationError("certificate verify failed")
    err = translate(wrapped, "s", "connect")
    assert isinstance(err, SmtpTransient) and err.category == "tls_failed"


def test_reply_round_trips_through_the_error() -> None:
    for reply in (classify(451, "4.7.1 later"), classify(550, "5.1.1 unknown"),
                  connection_failure("refused"), connection_failure("no STARTTLS", "tls_failed")):
        back = reply_of(error_for(reply, "x"))
        assert (back.code, back.outcome, back.category) == (reply.code, reply.outcome, reply.category)


def test_tls_context_verifies_unless_told_not_to() -> None:
    servers = parse_config({"servers": {
        "a": {"address": "smtp.example.com:587"},
        "b": {"address": "smtp.example.com:465", "tls_verify": False},
    }}, "t", {}).servers
    assert tls_context(servers["a"]).verify_mode == ssl.CERT_REQUIRED
    assert tls_context(servers["a"]).check_hostname
    assert tls_context(servers["b"]).verify_mode == ssl.CERT_NONE


def make_job(*recipients: str, **changes: Any) -> Job:
    fields: dict[str, Any] = {"id": "j1", "tenant": "acme", "server": "smtp", "sender": "hr@acme.example",
                              "recipients": recipients, "message": b"x", "created_ms": now_ms(),
                              "attempt": 1}
    fields.update(changes)
    return Job(**fields)


@pytest.fixture
def stage() -> SenderStage:
    return SenderStage(Settings(namespace="unit", retry_base_s=60, retry_max_s=240))


BATCH = Batch(id="b1", server="smtp", jobs=(), mails=0, bytes=0, created_ms=0, grant_id="g1",
              granted_ms=0, deadline_ms=60_000)


def test_outputs_of_a_mixed_job(stage: SenderStage) -> None:
    job = make_job("ok@x", "busy@x", "busy2@x", "bad@x")
    outcome = JobOutcome(job, attempted=True, sent=["ok@x"], at_ms=now_ms())
    later = classify(451, "4.7.1 later")
    outcome.deferred = {"busy@x": later, "busy2@x": later}
    outcome.failed = {"bad@x": classify(550, "5.1.1 unknown")}
    out = stage.outputs.of_outcome(outcome, BATCH)
    retry = [o for o in out if o.routing_key.startswith("unit.retry.")]
    assert [codec.decode_job(o.body).recipients for o in retry] == [("busy@x", "busy2@x")]
    assert retry[0].routing_key == stage.topology.retry_queue(2) == "unit.retry.120s"
    assert codec.decode_job(retry[0].body).attempt == 2
    dead = [o for o in out if o.routing_key == "unit.dead"]
    assert [codec.decode_job(o.body).recipients for o in dead] == [("bad@x",)]
    assert dead[0].headers is not None and dead[0].headers["x-mailpipe-code"] == 550
    events = [codec.decode_event(o.body) for o in out if o.exchange == "unit.events"]
    assert [(e.outcome, e.recipients) for e in events] == [
        ("sent", ("ok@x",)), ("deferred", ("busy@x", "busy2@x")), ("failed", ("bad@x",))]
    assert all(not o.mandatory for o in out if o.exchange == "unit.events")
    assert [o.routing_key for o in out if o.exchange == "unit.events"] == [
        "sent.acme", "deferred.acme", "failed.acme"]


def test_deferred_past_max_age_is_expired(stage: SenderStage) -> None:
    created = now_ms() - int(stage.settings.retry_max_age_s * 1000) - 1000
    outcome = JobOutcome(make_job("busy@x", created_ms=created), attempted=True, at_ms=now_ms())
    outcome.deferred = {"busy@x": classify(451, "4.7.1 later")}
    out = stage.outputs.of_outcome(outcome, BATCH)
    assert [o.routing_key for o in out if o.exchange == ""] == ["unit.dead"]
    assert [codec.decode_event(o.body).outcome for o in out if o.exchange] == ["expired"]


def test_given_back_batch_names_its_grant_and_the_refund(stage: SenderStage) -> None:
    jobs = [make_job("a@x", id="j1"), make_job("b@x", id="j2", tenant="other")]
    raws = [codec.encode_job(j) for j in jobs]
    first = codec.decode_batch(stage.outputs.give_back(BATCH, raws, jobs, "deadline", "h1", refund=1,
                                                refund_tenants={"acme": 1}).body)
    again = codec.decode_batch(stage.outputs.give_back(BATCH, raws, jobs, "deadline", "h1", refund=1,
                                                refund_tenants={"acme": 1}).body)
    other = codec.decode_batch(stage.outputs.give_back(BATCH, raws, jobs, "deadline", "h2", refund=0).body)
    assert first.id == again.id != BATCH.id and other.id != first.id  # one per holder
    assert (first.refund, first.mails, first.grant_id, first.deadline_ms) == (1, 2, None, None)
    assert first.refund_of == BATCH.id and first.refund_tenants == {"acme": 1}
    assert (other.refund, other.refund_of) == (0, None)
    assert first.tenants == {"acme": 1, "other": 1} and first.jobs == tuple(raws)


def test_group_by_reply() -> None:
    a, b = classify(451, "later"), classify(452, "full")
    assert group({"x": a, "y": b, "z": a}) == [(a, ["x", "z"]), (b, ["y"])]
    assert group({}) == []
    assert SENT_REPLY.outcome == "sent"
