"""Events bundled (issue 24): a batch's events go one message per routing key, and
``codec.decode_events`` gives subscribers one record per event from either kind of message."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from mailpipe import codec
from mailpipe.amqp import Outgoing
from mailpipe.errors import InvalidMessage
from mailpipe.model import Batch, Event, Job, now_ms
from mailpipe.settings import Settings
from sender.delivery import BatchDelivery, JobOutcome
from sender.outputs import bundle_events
from sender.replies import classify
from sender.stage import SenderStage

EXCHANGE = "unit.events"
BATCH = Batch(id="b1", server="smtp", jobs=(), mails=0, bytes=0, created_ms=0, grant_id="g1",
              granted_ms=0, deadline_ms=60_000)


def event(job_id: str, outcome: str = "sent", tenant: str = "acme") -> Event:
    return Event(job_id=job_id, tenant=tenant, server="smtp", outcome=outcome, recipients=(f"{job_id}@x",),
                 attempt=1, created_ms=1_700_000_000_000, at_ms=1_700_000_000_500, code=250)


def job(job_id: str, *recipients: str, tenant: str = "acme") -> Job:
    return Job(id=job_id, tenant=tenant, server="smtp", sender="hr@acme.example", recipients=recipients,
               message=b"x", created_ms=now_ms(), attempt=1)


def test_a_single_event_decodes_as_a_list_of_one() -> None:
    one = event("j1")
    assert codec.decode_events(codec.encode_event(one)) == [one]


def test_a_bundle_decodes_to_its_events_in_order() -> None:
    events = [event(f"j{i}") for i in range(5)]
    body = codec.encode_bundle("event", [codec.encode_event(e) for e in events])
    assert codec.kind_of(body) == "events"
    assert codec.decode_events(body) == events


def test_a_bad_item_is_named_by_its_index() -> None:
    bad = codec.encode_event(event("j2", outcome="lost"))
    body = codec.encode_bundle("event", [codec.encode_event(event("j1")), bad])
    with pytest.raises(InvalidMessage, match=r"^events\.items\[1\]: event\.outcome: 'lost' is not one of"):
        codec.decode_events(body)


@pytest.mark.parametrize(("body", "reason"), [
    (msgpack.packb({"v": 1, "kind": "events", "items": []}), r"^events\.items: empty"),
    (msgpack.packb({"v": 1, "kind": "events", "items": ["not bin"]}), r"^events\.items: expected an array of binaries"),
    (msgpack.packb({"v": 1, "kind": "feedback", "id": "x"}), r"^events\.kind: expected 'events', got 'feedback'"),
    (b"\xc1", r"^events: not valid msgpack"),
])
def test_what_is_neither_an_event_nor_a_bundle_is_refused(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=reason):
        codec.decode_events(body)


def test_an_item_over_the_event_bin_limit_is_refused() -> None:
    body = codec.encode_bundle("event", [b"\x00" * (codec.EVENT_MAX_BIN + 1)])
    with pytest.raises(InvalidMessage, match=r"^events: not valid msgpack"):
        codec.decode_events(body)


def out(key: str, body: bytes = b"", exchange: str = EXCHANGE) -> Outgoing:
    return Outgoing(key, body, exchange=exchange, mandatory=exchange != EXCHANGE)


def test_one_message_per_routing_key_after_the_other_outputs() -> None:
    sent = [codec.encode_event(event(f"s{i}")) for i in range(3)]
    failed = codec.encode_event(event("f1", "failed"))
    other = [codec.encode_event(event("o1", tenant="other")), codec.encode_event(event("o2", tenant="other"))]
    outputs = [out("sent.acme", sent[0]), out("unit.retry.60s", b"job", ""), out("sent.other", other[0]),
               out("failed.acme", failed), out("sent.acme", sent[1]), out("unit.dead", b"dead", ""),
               out("sent.other", other[1]), out("sent.acme", sent[2])]
    bundled = bundle_events(outputs, EXCHANGE)
    assert [(o.routing_key, o.exchange) for o in bundled] == [
        ("unit.retry.60s", ""), ("unit.dead", ""), ("sent.acme", EXCHANGE), ("sent.other", EXCHANGE),
        ("failed.acme", EXCHANGE)]
    by_key = {o.routing_key: o for o in bundled if o.exchange == EXCHANGE}
    assert codec.items_of(by_key["sent.acme"].body, "event") == sent
    assert codec.items_of(by_key["sent.other"].body, "event") == other
    assert by_key["failed.acme"].body == failed  # alone under its key: a plain event, as before
    assert all(not o.mandatory for o in by_key.values())


def test_a_bundle_holds_at_most_events_per_bundle() -> None:
    count = codec.EVENTS_PER_BUNDLE * 2 + 1
    bodies = [codec.encode_event(event(f"j{i}")) for i in range(count)]
    bundled = bundle_events([out("sent.acme", b) for b in bodies], EXCHANGE)
    assert [codec.kind_of(o.body) for o in bundled] == ["events", "events", "event"]
    assert [e for o in bundled for e in codec.decode_events(o.body)] == [codec.decode_event(b) for b in bodies]


def outcome(j: Job, **fields: Any) -> JobOutcome:
    return JobOutcome(j, attempted=True, at_ms=now_ms(), **fields)


def test_a_finished_batch_publishes_its_events_bundled() -> None:
    stage = SenderStage(Settings(namespace="unit", retry_base_s=60, retry_max_s=240))
    later, unknown = classify(451, "4.7.1 later"), classify(550, "5.1.1 unknown")
    jobs = [job("j1", "a@x", "b@x"), job("j2", "c@x"), job("j3", "d@x", tenant="beta"), job("j4", "e@x", "f@x")]
    outcomes = [outcome(jobs[0], sent=["a@x"], failed={"b@x": unknown}), outcome(jobs[1], sent=["c@x"]),
                outcome(jobs[2], deferred={"d@x": later}), outcome(jobs[3], sent=["e@x", "f@x"])]
    result = BatchDelivery(outcomes=outcomes, started=0.0, ended=1.0)
    outputs, back = stage.outputs.of_delivery(BATCH, [codec.encode_job(j) for j in jobs], jobs, result, "h1")
    assert back == 0
    events = [(o.routing_key, codec.decode_events(o.body)) for o in outputs if o.exchange == EXCHANGE]
    assert [(key, [(e.job_id, e.recipients) for e in decoded]) for key, decoded in events] == [
        ("sent.acme", [("j1", ("a@x",)), ("j2", ("c@x",)), ("j4", ("e@x", "f@x"))]),
        ("failed.acme", [("j1", ("b@x",))]),
        ("deferred.beta", [("j3", ("d@x",))])]
    assert all(e.outcome == key.split(".")[0] and e.tenant == key.split(".")[1] and e.batch_id == "b1"
               for key, decoded in events for e in decoded)
    assert sorted(o.routing_key for o in outputs if not o.exchange) == ["unit.dead", "unit.retry.120s"]
