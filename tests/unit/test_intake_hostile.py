"""No request, whatever its bytes, crashes the intake's pure path (issue 13).

``decode_intake`` -> ``validate`` -> ``render`` -> ``dkim_sign`` (without a key) either
succeeds or raises ``InvalidMessage``; nothing else may escape. The enqueue stage has its own
catch-all besides; these properties prove the pure path does not need it.
"""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailpipe import codec
from mailpipe.errors import InvalidMessage
from mailpipe.model import SCHEMA_VERSION, IntakeRequest
from producer.compose import dkim_sign, render, validate

MAX_MESSAGE_BYTES = 1024 * 1024
FAST = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Every code point (surrogates excluded: msgpack's UTF-8 cannot carry them), with the hostile
# ones often: line breaks, controls, format characters, separators.
HOSTILE = "\r\n\0\t\x0b\x0c\x1c\x1d\x1e\x1f\x7f\x85\x9f\u2028\u2029\u200b\u200d\u200e\ufeff\xa0\u3000"
text = st.text(st.characters(blacklist_categories=("Cs",)) | st.sampled_from(HOSTILE), max_size=40)
address_like = st.one_of(
    text, st.builds(lambda a, b, c: f"{a}@{b}.{c}", text, text, text),
    st.builds(lambda x: f"ann@example.com{x}", text), st.builds(lambda x: f"{x}ann@example.com", text))
header_name = st.one_of(text, st.from_regex(r"[!-9;-~]{1,10}", fullmatch=True),
                        st.sampled_from(["Reply-To", "Sender", "sender", "Resent-Date", "References",
                                         "In-Reply-To", "List-Unsubscribe", "Content-ID"]))
content_type = st.one_of(text, st.sampled_from(["application/pdf", "text/plain", "multipart/mixed",
                                                "message/rfc822", "image/png", "a/b"]))
ints = st.one_of(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=-(2**63), max_value=-1))


def check(data: bytes) -> None:
    try:
        req = codec.decode_intake(data, MAX_MESSAGE_BYTES)
        validate(req, MAX_MESSAGE_BYTES, 100)
        message = render(req, req.id)
        assert dkim_sign(message, req.sender, None) == message
        assert isinstance(message, bytes)
    except InvalidMessage:
        pass


@FAST
@given(st.binary(max_size=512))
def test_arbitrary_bytes(data: bytes) -> None:
    check(data)


@FAST
@given(st.binary(max_size=256))
def test_arbitrary_bytes_after_a_valid_header(tail: bytes) -> None:
    head = msgpack.packb({"v": SCHEMA_VERSION, "kind": "intake"}, use_bin_type=True)
    check(bytes([head[0] + 1]) + head[1:] + msgpack.packb("x") + tail)


@st.composite
def intake_maps(draw: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "v": SCHEMA_VERSION, "kind": "intake",
        "id": draw(st.one_of(text, st.just("d" * 32))), "tenant": draw(st.one_of(text, st.just("acme"))),
        "sender": draw(st.one_of(address_like, st.just("hr@acme.example"))),
        "created_ms": draw(st.one_of(ints, st.just(1_700_000_000_000))),
        "to": draw(st.lists(st.one_of(address_like, st.just("a@example.com")), max_size=3)),
        "cc": draw(st.lists(address_like, max_size=2)), "bcc": draw(st.lists(address_like, max_size=2)),
        "subject": draw(st.one_of(st.none(), text)),
        "text": draw(st.one_of(st.none(), text)), "html": draw(st.one_of(st.none(), text)),
        "attachments": draw(st.lists(st.tuples(text, content_type, st.binary(max_size=20)).map(list),
                                     max_size=2)),
        "headers": draw(st.dictionaries(header_name, text, max_size=3)),
        "server": draw(st.one_of(st.none(), text)), "idempotency_key": draw(st.one_of(st.none(), text)),
        "send_at_ms": draw(st.one_of(st.none(), ints)),
        "priority": draw(st.one_of(st.none(), st.sampled_from(["normal", "high"]), text)),
    }
    if draw(st.booleans()):  # raw
        fields["message"] = draw(st.binary(max_size=50))
        fields["recipients"] = draw(st.lists(address_like, max_size=3))
    return fields


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(intake_maps())
def test_structurally_valid_intake_maps_with_arbitrary_text(fields: dict[str, Any]) -> None:
    check(msgpack.packb(fields, use_bin_type=True))


@FAST
@given(st.builds(IntakeRequest, id=text, tenant=text, sender=address_like, created_ms=st.integers(0, 2**64),
                 to=st.lists(address_like, max_size=2).map(tuple), subject=st.one_of(st.none(), text),
                 text=st.one_of(st.none(), st.text(max_size=40)),
                 headers=st.dictionaries(header_name, text, max_size=2)))
def test_requests_of_the_client_library(req: IntakeRequest) -> None:
    """The client library validates Python objects directly (no msgpack in between)."""
    try:
        validate(req, MAX_MESSAGE_BYTES, 100)
        render(req, req.id)
    except InvalidMessage:
        pass
