"""The msgpack codec: round trips, and refusal of every kind of bad input with InvalidMessage.

Decoding reads untrusted bytes (anything an upstream service publishes to intake), so each
refusal must name the field at fault, and nothing but InvalidMessage may ever escape.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailpipe import codec
from mailpipe.errors import InvalidMessage, PermanentError
from mailpipe.model import SCHEMA_VERSION, Attachment, Batch, Event, IntakeRequest, Job, new_id, now_ms

MAX_MESSAGE_BYTES = 1024 * 1024


def make_job(**changes: Any) -> Job:
    fields: dict[str, Any] = {
        "id": "0123456789abcdef0123456789abcdef", "tenant": "acme", "server": "platform",
        "sender": "news@acme.example", "recipients": ("a@example.com", "b@example.com"),
        "message": b"Subject: hi\r\n\r\nhello\r\n", "created_ms": 1_700_000_000_000,
        "enqueued_ms": 1_700_000_000_005, "attempt": 2, "idempotency_key": "order-42",
        "findings": ("missing_subject: the mail has no subject",),
        "send_at_ms": 1_700_000_600_000, "priority": "high",
    }
    fields.update(changes)
    return Job(**fields)


def make_batch(**changes: Any) -> Batch:
    jobs = (codec.encode_job(make_job(id="a" * 32)), codec.encode_job(make_job(id="b" * 32)))
    fields: dict[str, Any] = {
        "id": "c" * 32, "server": "platform", "jobs": jobs, "mails": 2,
        "bytes": sum(len(j) for j in jobs), "created_ms": 1_700_000_000_000,
        "tenants": {"acme": 2}, "priority": "high",
    }
    fields.update(changes)
    return Batch(**fields)


def make_event(**changes: Any) -> Event:
    fields: dict[str, Any] = {
        "job_id": "a" * 32, "tenant": "acme", "server": "platform", "outcome": "deferred",
        "recipients": ("a@example.com",), "attempt": 1, "created_ms": 1_700_000_000_000,
        "at_ms": 1_700_000_060_000, "code": 451, "text": "4.7.1 Try again later",
        "category": "greylisted", "advice": "retried automatically", "batch_id": "c" * 32,
        "findings": ("image_heavy: mostly images, little text",),
    }
    fields.update(changes)
    return Event(**fields)


def make_intake(**changes: Any) -> IntakeRequest:
    fields: dict[str, Any] = {
        "id": "d" * 32, "tenant": "acme", "sender": "news@acme.example",
        "created_ms": 1_700_000_000_000, "to": ("a@example.com",), "cc": ("c@example.com",),
        "bcc": ("b@example.com",), "subject": "Your order", "text": "Hello", "html": "<p>Hello</p>",
        "attachments": (Attachment("invoice.pdf", "application/pdf", b"%PDF-1.4\x00\xff"),),
        "headers": {"X-Campaign": "spring"}, "server": "platform", "idempotency_key": "order-42",
        "send_at_ms": 1_700_000_600_000, "priority": "high",
    }
    fields.update(changes)
    return IntakeRequest(**fields)


def raw_map(encoded: bytes) -> dict[str, Any]:
    """The plain map behind an encoded message, to tamper with one field."""
    return msgpack.unpackb(encoded, raw=False)  # type: ignore[no-any-return]


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def decode_intake(data: bytes) -> IntakeRequest:
    return codec.decode_intake(data, MAX_MESSAGE_BYTES)


# Each decoder with a valid encoded message of its kind.
DECODERS: dict[str, tuple[Callable[[bytes], object], bytes]] = {
    "intake": (decode_intake, codec.encode_intake(make_intake())),
    "job": (codec.decode_job, codec.encode_job(make_job())),
    "batch": (codec.decode_batch, codec.encode_batch(make_batch())),
    "event": (codec.decode_event, codec.encode_event(make_event())),
}


def refuse(kind: str, tampered: dict[str, Any], match: str) -> InvalidMessage:
    decode = DECODERS[kind][0]
    with pytest.raises(InvalidMessage, match=match) as info:
        decode(pack(tampered))
    return info.value


# -- round trips --------------------------------------------------------------------------------

def test_job_round_trip() -> None:
    job = make_job()
    assert codec.decode_job(codec.encode_job(job)) == job


def test_job_round_trip_without_optional_fields() -> None:
    job = Job(id="x", tenant="t", server="s", sender="", recipients=("r@example.com",), message=b"")
    assert codec.decode_job(codec.encode_job(job)) == job


def test_batch_round_trip_ungranted_and_granted() -> None:
    batch = make_batch()
    assert codec.decode_batch(codec.encode_batch(batch)) == batch
    granted = make_batch(grant_id="g" * 32, granted_ms=1_700_000_000_100,
                         deadline_ms=1_700_000_060_100, refund=0)
    assert codec.decode_batch(codec.encode_batch(granted)) == granted


def test_batch_refund_round_trip() -> None:
    refund = make_batch(refund=2, tenants={"acme": 1, "globex": 1})
    decoded = codec.decode_batch(codec.encode_batch(refund))
    assert decoded == refund
    assert decoded.grant_id is None and decoded.deadline_ms is None
    # The jobs inside are forwarded untouched and still decode.
    assert [codec.decode_job(j).id for j in decoded.jobs] == ["a" * 32, "b" * 32]


def test_event_round_trip() -> None:
    event = make_event()
    assert codec.decode_event(codec.encode_event(event)) == event
    bare = make_event(code=0, text="", category="", advice="", batch_id="", outcome="sent", findings=())
    assert codec.decode_event(codec.encode_event(bare)) == bare


def test_intake_compose_round_trip() -> None:
    req = make_intake()
    decoded = decode_intake(codec.encode_intake(req))
    assert decoded == req
    assert not decoded.is_raw


def test_intake_raw_round_trip() -> None:
    req = IntakeRequest(id="r1", tenant="acme", sender="a@acme.example", created_ms=1_700_000_000_000,
                        message=b"From: a@acme.example\r\n\r\nbody\r\n", recipients=("x@example.com",))
    decoded = decode_intake(codec.encode_intake(req))
    assert decoded == req
    assert decoded.is_raw


def test_intake_minimal_map_from_another_language() -> None:
    """What a Go or Node publisher sends: only the required keys, no nils for the rest."""
    decoded = decode_intake(pack({"v": 1, "kind": "intake", "id": "m1", "tenant": "acme",
                                  "sender": "a@acme.example", "created_ms": 1_700_000_000_000, "to": ["x@example.com"],
                                  "subject": "s", "text": "t"}))
    assert decoded.to == ("x@example.com",) and decoded.cc == () and decoded.headers == {}
    assert decoded.message is None and decoded.server is None
    assert decoded.priority == "normal" and decoded.send_at_ms is None


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_encoded_form_carries_version_and_kind(kind: str) -> None:
    obj = raw_map(DECODERS[kind][1])
    assert obj["v"] == SCHEMA_VERSION
    assert obj["kind"] == kind


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_decoders_accept_bytearray_and_memoryview(kind: str) -> None:
    decode, data = DECODERS[kind]
    # Typed as bytes, but a consumer may hand over a buffer: it must decode the same.
    assert decode(bytearray(data)) == decode(data)  # type: ignore[arg-type]
    assert decode(memoryview(data)) == decode(data)  # type: ignore[arg-type]


def test_invalid_message_is_permanent_and_a_value_error() -> None:
    with pytest.raises(InvalidMessage) as info:
        codec.decode_job(b"")
    assert isinstance(info.value, PermanentError) and isinstance(info.value, ValueError)
    assert info.value.reason.startswith("job")


# -- broken bytes -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_truncated_msgpack(kind: str) -> None:
    decode, data = DECODERS[kind]
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        with pytest.raises(InvalidMessage, match=rf"^{kind}: not valid msgpack"):
            decode(data[:cut])


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_trailing_bytes(kind: str) -> None:
    decode, data = DECODERS[kind]
    with pytest.raises(InvalidMessage, match="not valid msgpack"):
        decode(data + b"\xc0")


def test_reserved_byte_and_invalid_utf8() -> None:
    with pytest.raises(InvalidMessage, match="not valid msgpack"):
        codec.decode_job(b"\xc1")
    # A str (not bin) holding bytes that are not UTF-8.
    bad_str = msgpack.packb({"v": 1, "kind": "job", "id": b"\xff\xfe"}, use_bin_type=False)
    with pytest.raises(InvalidMessage, match="not valid msgpack"):
        codec.decode_job(bad_str)


def test_deep_nesting() -> None:
    with pytest.raises(InvalidMessage, match="not valid msgpack"):
        codec.decode_job(b"\x91" * 100_000 + b"\xc0")


@pytest.mark.parametrize("top", [[1, 2], 7, "job", b"job", None, 1.5, True])
def test_wrong_top_level_type(top: Any) -> None:
    with pytest.raises(InvalidMessage, match=r"^job: expected a map at the top level"):
        codec.decode_job(pack(top))


def test_non_string_map_key() -> None:
    with pytest.raises(InvalidMessage, match="not valid msgpack"):
        codec.decode_job(pack({"v": 1, "kind": "job", 7: "x"}))


# -- version and kind ---------------------------------------------------------------------------

@pytest.mark.parametrize("version", [0, 2, -1, "1", None, True, 1.0, [1]])
def test_wrong_schema_version(version: Any) -> None:
    obj = raw_map(DECODERS["job"][1]) | {"v": version}
    refuse("job", obj, r"^job\.v: unsupported schema version")


def test_missing_schema_version() -> None:
    obj = raw_map(DECODERS["job"][1])
    del obj["v"]
    refuse("job", obj, r"^job\.v: unsupported schema version None")


@pytest.mark.parametrize(("kind", "other"), [("job", "batch"), ("batch", "job"), ("event", "job"),
                                             ("intake", "job"), ("job", "intake")])
def test_wrong_kind(kind: str, other: str) -> None:
    decode = DECODERS[kind][0]
    with pytest.raises(InvalidMessage, match=rf"^{kind}\.kind: expected '{kind}', got '{other}'"):
        decode(DECODERS[other][1])


def test_missing_kind() -> None:
    obj = raw_map(DECODERS["event"][1])
    del obj["kind"]
    refuse("event", obj, r"^event\.kind: expected 'event', got None")


# -- field types --------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "field", "value"), [
    ("job", "id", 1), ("job", "tenant", b"acme"), ("job", "server", ["platform"]),
    ("job", "sender", 3.5), ("job", "recipients", "a@example.com"), ("job", "recipients", [1]),
    ("job", "recipients", [b"a@example.com"]), ("job", "message", "text, not binary"),
    ("job", "created_ms", "1"), ("job", "attempt", 1.5), ("job", "enqueued_ms", {}),
    ("job", "idempotency_key", 5), ("job", "findings", "one"), ("job", "findings", [1]),
    ("event", "findings", [b"x"]),
    ("batch", "jobs", [b"x", "y"]), ("batch", "jobs", b"x"), ("batch", "mails", "2"),
    ("batch", "bytes", 1.0), ("batch", "grant_id", 1), ("batch", "deadline_ms", "soon"),
    ("batch", "tenants", ["acme"]), ("batch", "tenants", {"acme": "2"}),
    ("event", "outcome", 1), ("event", "recipients", [None]), ("event", "code", "451"),
    ("event", "text", b"bytes"),
    ("intake", "to", ["a@example.com", 2]), ("intake", "subject", 1), ("intake", "html", b"<p>"),
    ("intake", "headers", {"X-A": 1}), ("intake", "headers", ["X-A"]), ("intake", "message", "str"),
    ("intake", "attachments", "none"), ("intake", "created_ms", -0.5), ("intake", "send_at_ms", "soon"),
    ("intake", "priority", 1), ("job", "priority", True), ("batch", "priority", b"high"),
])
def test_wrong_field_type(kind: str, field: str, value: Any) -> None:
    obj = raw_map(DECODERS[kind][1]) | {field: value}
    error = refuse(kind, obj, rf"^{kind}\.{field}: expected ")
    assert type(value).__name__ in error.reason


@pytest.mark.parametrize(("kind", "field"), [
    ("job", "attempt"), ("job", "created_ms"), ("job", "enqueued_ms"), ("job", "send_at_ms"),
    ("intake", "send_at_ms"), ("batch", "bytes"),
    ("batch", "refund"), ("batch", "granted_ms"), ("batch", "deadline_ms"), ("batch", "created_ms"),
    ("event", "attempt"), ("event", "code"), ("event", "at_ms"), ("intake", "created_ms"),
])
def test_negative_integers(kind: str, field: str) -> None:
    obj = raw_map(DECODERS[kind][1]) | {field: -1}
    refuse(kind, obj, rf"^{kind}\.{field}: must not be negative")


def test_negative_tenant_count() -> None:
    obj = raw_map(DECODERS["batch"][1]) | {"tenants": {"acme": -2}}
    refuse("batch", obj, r"^batch\.tenants: expected a map of strings to counts")


@pytest.mark.parametrize(("kind", "field"), [
    ("job", "attempt"), ("job", "created_ms"), ("batch", "refund"), ("batch", "bytes"),
    ("event", "code"), ("intake", "created_ms"),
])
def test_bool_where_int(kind: str, field: str) -> None:
    obj = raw_map(DECODERS[kind][1]) | {field: True}
    refuse(kind, obj, rf"^{kind}\.{field}: expected an integer, got bool")


def test_bool_in_counts_and_mails() -> None:
    refuse("batch", raw_map(DECODERS["batch"][1]) | {"tenants": {"acme": True}},
           r"^batch\.tenants: expected a map of strings to counts")
    one_job = raw_map(DECODERS["batch"][1]) | {"jobs": [b"x"], "mails": True}
    refuse("batch", one_job, r"^batch\.mails: expected an integer, got bool")


@pytest.mark.parametrize(("kind", "field"), [
    ("job", "id"), ("job", "tenant"), ("job", "server"), ("job", "sender"), ("job", "recipients"),
    ("job", "message"), ("job", "created_ms"), ("job", "attempt"),
    ("batch", "id"), ("batch", "server"), ("batch", "jobs"), ("batch", "mails"), ("batch", "bytes"),
    ("event", "job_id"), ("event", "outcome"), ("event", "at_ms"),
    ("intake", "id"), ("intake", "tenant"), ("intake", "sender"), ("intake", "created_ms"),
])
def test_missing_required_field(kind: str, field: str) -> None:
    obj = raw_map(DECODERS[kind][1])
    del obj[field]
    refuse(kind, obj, rf"^{kind}\.{field}: missing")
    refuse(kind, obj | {field: None}, rf"^{kind}\.{field}: missing")  # nil counts as absent


@pytest.mark.parametrize("kind", ["intake", "job", "batch"])
@pytest.mark.parametrize("priority", ["urgent", "HIGH", " high"])
def test_unknown_priority(kind: str, priority: str) -> None:
    obj = raw_map(DECODERS[kind][1]) | {"priority": priority}
    refuse(kind, obj, rf"^{kind}\.priority: '{priority}' is not one of high, normal")


@pytest.mark.parametrize("kind", ["intake", "job", "batch"])
def test_priority_defaults_to_normal(kind: str) -> None:
    obj = raw_map(DECODERS[kind][1])
    del obj["priority"]
    decoded = DECODERS[kind][0](pack(obj))
    assert isinstance(decoded, IntakeRequest | Job | Batch) and decoded.priority == "normal"


def test_job_without_recipients() -> None:
    refuse("job", raw_map(DECODERS["job"][1]) | {"recipients": []}, r"^job\.recipients: empty")


def test_batch_mails_must_match_jobs() -> None:
    refuse("batch", raw_map(DECODERS["batch"][1]) | {"mails": 3}, r"^batch\.mails: says 3, holds 2 jobs")


@pytest.mark.parametrize("item", [["a.pdf", "application/pdf"], ["a.pdf", "application/pdf", "text"],
                                  [1, "application/pdf", b"x"], {"filename": "a.pdf"}, b"x"])
def test_bad_attachment(item: Any) -> None:
    obj = raw_map(DECODERS["intake"][1])
    obj["attachments"] = [["ok.txt", "text/plain", b"ok"], item]
    refuse("intake", obj, r"^intake\.attachments\[1\]: expected \[filename, content_type, binary\]")


def test_header_names_must_be_strings() -> None:
    obj = raw_map(DECODERS["intake"][1]) | {"headers": {b"X-Raw": "v"}}
    refuse("intake", obj, r"^intake\.headers: expected a map of strings to strings")


def test_tenant_names_must_be_strings() -> None:
    obj = raw_map(DECODERS["batch"][1]) | {"tenants": {b"acme": 2}}
    refuse("batch", obj, r"^batch\.tenants: expected a map of strings to counts")


# -- sizes --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "field", "limit"), [
    ("job", "id", 64), ("job", "tenant", 255), ("job", "server", 255), ("job", "sender", codec.MAX_STR),
    ("job", "idempotency_key", 255), ("batch", "id", 64), ("batch", "grant_id", 64),
    ("event", "text", codec.MAX_STR), ("intake", "id", 64), ("intake", "tenant", 255),
    ("intake", "subject", codec.MAX_STR), ("intake", "server", 255),
])
def test_oversized_string(kind: str, field: str, limit: int) -> None:
    obj = raw_map(DECODERS[kind][1])
    assert _decodes(kind, obj | {field: "x" * limit})  # the limit itself is fine
    refuse(kind, obj | {field: "x" * (limit + 1)}, rf"^{kind}\.{field}: longer than {limit} characters")


def _decodes(kind: str, obj: dict[str, Any]) -> bool:
    DECODERS[kind][0](pack(obj))
    return True


def test_oversized_recipient_entry() -> None:
    obj = raw_map(DECODERS["job"][1]) | {"recipients": ["a@example.com", "x" * (codec.MAX_STR + 1)]}
    refuse("job", obj, r"^job\.recipients: an entry is longer than")


def test_oversized_header_value() -> None:
    obj = raw_map(DECODERS["intake"][1]) | {"headers": {"X-Big": "x" * (codec.MAX_STR + 1)}}
    refuse("intake", obj, r"^intake\.headers: ")


def test_text_over_the_msgpack_string_limit() -> None:
    obj = raw_map(DECODERS["intake"][1]) | {"text": "x" * (codec.MAX_TEXT + 1)}
    with pytest.raises(InvalidMessage, match="max_str_len"):
        codec.decode_intake(pack(obj), 64 * 1024 * 1024)


def test_intake_message_over_max_message_bytes() -> None:
    obj = raw_map(DECODERS["intake"][1]) | {"message": b"x" * 2000, "recipients": ["a@example.com"]}
    assert codec.decode_intake(pack(obj), 2000).message == b"x" * 2000
    # Refused by msgpack's own binary limit (the bytes are never copied) ...
    with pytest.raises(InvalidMessage, match="max_bin_len"):
        codec.decode_intake(pack(obj), 1999)
    # ... or, far over it, before unpacking at all.
    big = pack(obj | {"message": b"x" * 200_000})
    with pytest.raises(InvalidMessage, match=r"^intake: \d+ bytes, over the 1000-byte limit"):
        codec.decode_intake(big, 1000)


def test_job_message_over_max_message_bytes() -> None:
    data = codec.encode_job(make_job(message=b"x" * 5000))
    assert codec.decode_job(data, 5000).size == 5000
    with pytest.raises(InvalidMessage, match="max_bin_len"):
        codec.decode_job(data, 4999)


def test_too_many_array_items() -> None:
    recipients = [f"r{i}@example.com" for i in range(codec.MAX_ARRAY + 1)]
    with pytest.raises(InvalidMessage, match="max_array_len"):
        codec.decode_job(pack(raw_map(DECODERS["job"][1]) | {"recipients": recipients}))
    assert len(codec.decode_job(pack(raw_map(DECODERS["job"][1]) | {"recipients": recipients[:-1]}))
               .recipients) == codec.MAX_ARRAY


def test_too_many_map_entries() -> None:
    headers = {f"X-H{i}": "v" for i in range(codec.MAX_MAP + 1)}
    with pytest.raises(InvalidMessage, match="max_map_len"):
        decode_intake(pack(raw_map(DECODERS["intake"][1]) | {"headers": headers}))


@pytest.mark.parametrize("ext", [msgpack.ExtType(5, b"ab"), msgpack.Timestamp(1, 0)])
def test_ext_types_refused(ext: Any) -> None:
    with pytest.raises(InvalidMessage, match="max_ext_len"):
        codec.decode_job(pack(raw_map(DECODERS["job"][1]) | {"created_ms": ext}))
    with pytest.raises(InvalidMessage, match="max_ext_len"):
        codec.decode_event(pack(ext))


def test_empty_ext_type_refused_by_the_field_check() -> None:
    """A zero-length ext is within max_ext_len=0; the field's type check still refuses it."""
    empty = msgpack.ExtType(0, b"")
    refuse("job", raw_map(DECODERS["job"][1]) | {"created_ms": empty},
           r"^job\.created_ms: expected an integer, got ExtType")
    refuse("intake", raw_map(DECODERS["intake"][1]) | {"headers": {"X-A": empty}},
           r"^intake\.headers: expected a map of strings to strings")
    with pytest.raises(InvalidMessage, match="expected a map at the top level, got ExtType"):
        codec.decode_event(pack(empty))


# -- property tests: nothing but InvalidMessage escapes ----------------------------------------

ALL_DECODERS = [decoder for decoder, _ in DECODERS.values()]
FIELD_NAMES = sorted({name for _, data in DECODERS.values() for name in raw_map(data)})

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
           | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=20))
structures = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_only_raise_invalid_message(data: bytes) -> None:
    for decode in ALL_DECODERS:
        with contextlib.suppress(InvalidMessage):
            decode(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(top=structures)
def test_random_structures_only_raise_invalid_message(top: Any) -> None:
    data = pack(top)
    for decode in ALL_DECODERS:
        with contextlib.suppress(InvalidMessage):
            decode(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(DECODERS)),
       changes=st.dictionaries(st.sampled_from(FIELD_NAMES), structures, max_size=4),
       drop=st.lists(st.sampled_from(FIELD_NAMES), max_size=3))
def test_tampered_valid_messages_only_raise_invalid_message(
        kind: str, changes: dict[str, Any], drop: list[str]) -> None:
    """A valid message of each kind with a few fields replaced by random values or removed:
    this gets past the version and kind checks into every field's validation."""
    decode, data = DECODERS[kind]
    obj = raw_map(data) | changes
    for name in drop:
        obj.pop(name, None)
    try:
        decode(pack(obj))
    except InvalidMessage as exc:
        assert exc.reason.startswith(kind)


@settings(max_examples=100, deadline=None)
@given(recipients=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=5),
       message=st.binary(max_size=300), attempt=st.integers(min_value=0, max_value=2**63),
       key=st.none() | st.text(max_size=255))
def test_job_round_trip_property(
        recipients: list[str], message: bytes, attempt: int, key: str | None) -> None:
    job = make_job(recipients=tuple(recipients), message=message, attempt=attempt, idempotency_key=key)
    assert codec.decode_job(codec.encode_job(job)) == job


# -- bounds on a whole message (issue 13) ------------------------------------------------------

def _intake_with(extra: bytes) -> bytes:
    """An intake map whose last key, ``x``, holds ``extra`` (already msgpack)."""
    head = pack({"v": SCHEMA_VERSION, "kind": "intake"})
    return bytes([head[0] + 1]) + head[1:] + pack("x") + extra


def _peak_of_refusal(data: bytes) -> tuple[InvalidMessage, int]:
    import gc
    import tracemalloc
    gc.collect()
    tracemalloc.start()
    try:
        with pytest.raises(InvalidMessage) as info:
            codec.decode_intake(data, MAX_MESSAGE_BYTES)
        return info.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_bomb_of_small_maps_is_refused_without_building_it() -> None:
    """300 KB of empty maps (30 arrays of 10,000, each within the per-container limits) would
    decode to about 20 MB; it is refused once MAX_OBJECTS are built."""
    chunk = b"\xdc" + (10_000).to_bytes(2, "big") + b"\x80" * 10_000
    data = _intake_with(b"\xdc" + (30).to_bytes(2, "big") + chunk * 30)
    assert 290_000 < len(data) < 310_000
    error, peak = _peak_of_refusal(data)
    assert "MAX_OBJECTS" in error.reason and error.reason.startswith("intake:")
    assert peak < 10 * 1024 * 1024, peak


def test_a_bomb_of_one_entry_maps_is_refused_by_the_decoded_size() -> None:
    """Maps of one entry cost more per byte: the decoded-size bound or the object bound stops it."""
    one = pack({"": None})
    chunk = b"\xdc" + (10_000).to_bytes(2, "big") + one * 10_000
    data = _intake_with(b"\xdc" + (10).to_bytes(2, "big") + chunk * 10)
    error, peak = _peak_of_refusal(data)
    assert "MAX_OBJECTS" in error.reason or "MAX_DECODED_OVERHEAD" in error.reason
    assert peak < 20 * 1024 * 1024, peak


def test_the_decoded_size_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "MAX_DECODED_OVERHEAD", 1024 * 1024)
    monkeypatch.setattr(codec, "COUNT_FROM_BYTES", 0)
    chunk = b"\xdc" + (10_000).to_bytes(2, "big") + b"\x80" * 10_000
    with pytest.raises(InvalidMessage, match=r"^intake: too large once decoded: .*MAX_DECODED_OVERHEAD"):
        decode_intake(_intake_with(b"\xdc" + (3).to_bytes(2, "big") + chunk * 3))


@pytest.mark.parametrize("depth", [1025, 300_000])
def test_a_deep_nesting_bomb_is_refused_without_building_it(depth: int) -> None:
    error, peak = _peak_of_refusal(_intake_with(b"\x91" * depth + b"\xc0"))
    assert "StackError" in error.reason
    assert peak < 2 * 1024 * 1024, peak


def test_many_deep_chains_are_refused_by_the_object_bound() -> None:
    """300 chains of 1,000 nested arrays (each under msgpack's nesting limit): 300,000 lists."""
    chain = b"\x91" * 999 + b"\xc0"
    error, peak = _peak_of_refusal(_intake_with(b"\xdc" + (300).to_bytes(2, "big") + chain * 300))
    assert "MAX_OBJECTS" in error.reason
    assert peak < 20 * 1024 * 1024, peak


def test_a_deep_value_where_a_scalar_is_expected_is_named_not_printed() -> None:
    """``v`` holding 1,000 nested arrays: the reason names its type (its repr would recurse)."""
    deep = b"\x91" * 1000 + b"\x01"
    data = b"\x82" + pack("kind") + pack("intake") + pack("v") + deep
    with pytest.raises(InvalidMessage, match=r"^intake\.v: unsupported schema version a list"):
        decode_intake(data)


def test_a_large_real_intake_still_decodes() -> None:
    """Past COUNT_FROM_BYTES the hooks count; a real request (1,000 headers, 100 recipients, a
    large attachment) is far inside the bounds."""
    req = make_intake(headers={f"X-H{i}": "v" * 20 for i in range(1000)},
                      to=tuple(f"u{i}@example.com" for i in range(100)),
                      attachments=(Attachment("big.bin", "application/octet-stream", b"\0" * 200_000),))
    data = codec.encode_intake(req)
    assert len(data) > codec.COUNT_FROM_BYTES
    assert decode_intake(data) == req


# -- bundles (issue 24) ----------------------------------------------------------------------------

def test_a_bundle_holds_whole_messages_each_decoded_on_its_own() -> None:
    jobs = [Job(id=new_id(), tenant="acme", server="s", sender="a@acme.example", recipients=(f"r{i}@example.com",),
                message=b"Subject: x\r\n\r\nhi\r\n", created_ms=now_ms(), enqueued_ms=now_ms()) for i in range(3)]
    raws = [codec.encode_job(j) for j in jobs]
    bundle = codec.encode_bundle("job", raws)
    assert codec.kind_of(bundle) == "jobs" and codec.kind_of(raws[0]) == "job"
    assert codec.items_of(bundle, "job") == raws
    assert [codec.decode_job(r) for r in codec.items_of(bundle, "job")] == jobs
    assert codec.items_of(raws[1], "job") == [raws[1]]  # a single message is its own item


def test_kind_of_reads_the_kind_wherever_it_is_and_never_fails() -> None:
    last = msgpack.packb({"v": 1, "items": [b"x"], "kind": "jobs"}, use_bin_type=True)
    assert codec.kind_of(last) == "jobs"
    for junk in (b"", b"\xc1", b"\x93\x01\x02\x03", msgpack.packb({"kind": 7}), msgpack.packb({1: 2}),
                 b"\xdf\xff\xff\xff\xff", msgpack.packb({"kind": "job"})[:-2]):
        assert codec.kind_of(junk) is None


@pytest.mark.parametrize(("body", "reason"), [
    (b"\x00", "jobs: expected a map"),
    (codec.encode_bundle("intake", [b"x"]), "jobs.kind: expected 'jobs', got 'intakes'"),
    (codec.encode_bundle("job", []), "jobs.items: empty"),
    (msgpack.packb({"v": 1, "kind": "jobs", "items": ["text"]}), "jobs.items: expected an array of binaries"),
])
def test_a_bundle_that_is_not_one_is_refused_naming_what_is_wrong(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        codec.items_of(body, "job")
    assert reason in info.value.reason
