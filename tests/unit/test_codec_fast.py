"""The codec's fast paths (issue 24) against the checked decoders they stand in front of.

``_job_fast`` and ``_intake_fast`` may only accept what the checked way accepts, and build the
same object from it; whatever they pass on (None) the checked way either accepts or refuses
naming the field. Checked here as twins on well-formed messages with one field changed to a
value of every kind, and on the messages the round-trip tests use.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailpipe import codec
from mailpipe.errors import InvalidMessage
from mailpipe.model import IntakeRequest, Job

JOB: dict[str, Any] = {
    "v": 1, "kind": "job", "id": "0123456789abcdef", "tenant": "acme", "server": "platform",
    "sender": "news@acme.example", "recipients": ["a@example.com", "b@example.com"],
    "message": b"Subject: hi\r\n\r\nhello\r\n", "created_ms": 1_700_000_000_000,
    "enqueued_ms": 1_700_000_000_005, "attempt": 2, "idempotency_key": "order-42",
    "findings": ["missing_subject"], "send_at_ms": None, "priority": "high",
}
INTAKE: dict[str, Any] = {
    "v": 1, "kind": "intake", "id": "req-1", "tenant": "acme", "sender": "news@acme.example",
    "created_ms": 1_700_000_000_000, "to": ["a@example.com"], "cc": [], "bcc": None, "subject": "Hi",
    "text": "hello", "html": None, "attachments": [], "headers": {"X-Campaign": "7"}, "server": None,
    "idempotency_key": None, "message": None, "recipients": [], "send_at_ms": 1_700_000_600_000,
    "priority": None, "bulk": False,
}

# Values of every kind a field may hold, the edges of each bound among them.
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2, max_value=10**15), st.floats(allow_nan=False),
    st.sampled_from(["", "high", "normal", "low", "x" * 64, "x" * 65, "x" * 255, "x" * 256,
                     "x" * codec.MAX_STR, "x" * (codec.MAX_STR + 1)]),
    st.text(max_size=8), st.binary(max_size=8),
    st.lists(st.one_of(st.text(max_size=4), st.binary(max_size=4), st.integers()), max_size=3),
    st.dictionaries(st.text(max_size=4), st.one_of(st.text(max_size=4), st.integers()), max_size=2),
    st.sampled_from([[], {}, [["a.txt", "text/plain", b"x"]], 10**12, 10**14 - 1, 10**14, 10**12 - 1]),
)


def _twins(obj: dict[str, Any], fast: Any, checked: Any, kind: str) -> None:
    quick = fast(dict(obj))
    try:
        slow = checked(codec._Fields(kind, dict(obj)))
    except InvalidMessage:
        assert quick is None, f"the fast path took what the checked way refuses: {obj!r:.300}"
        return
    assert quick is None or quick == slow


TWINS = {"job": (JOB, codec._job_fast, codec._job_checked),
         "intake": (INTAKE, codec._intake_fast, codec._intake_checked)}


@pytest.mark.parametrize("kind", list(TWINS))
@settings(max_examples=600, deadline=None)
@given(data=st.data(), value=ODD_VALUES, drop=st.booleans())
def test_the_fast_path_is_the_checked_ones_twin(kind: str, data: st.DataObject, value: Any, drop: bool) -> None:
    template, fast, checked = TWINS[kind]
    field = data.draw(st.sampled_from([*sorted(set(template) - {"v", "kind"}), "absent"]), label="field")
    obj = dict(template)
    if drop:
        obj.pop(field, None)
    else:
        obj[field] = value
    _twins(obj, fast, checked, kind)


@pytest.mark.parametrize(("fast", "template"), [(codec._job_fast, JOB), (codec._intake_fast, INTAKE)])
def test_well_formed_messages_take_the_fast_path(fast: Any, template: dict[str, Any]) -> None:
    built = fast(dict(template))
    assert isinstance(built, Job | IntakeRequest)
    assert built.id == template["id"]


def test_a_refused_field_is_still_named() -> None:
    data = msgpack.packb({**JOB, "attempt": -1}, use_bin_type=True)
    with pytest.raises(InvalidMessage, match=r"job\.attempt: must not be negative"):
        codec.decode_job(data)
