"""Bundling (issue 24) without services: how the client and the enqueue stage cut requests and
jobs into messages (producer/bundles.py), and the packer's views of a bundle's jobs
(packer/bundles.py)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailpipe.codec import encode_bundle, encode_intake, items_of, kind_of
from mailpipe.errors import InvalidMessage
from mailpipe.model import IntakeRequest, now_ms
from mailpipe.topology import Topology
from packer.bundles import item_views
from producer.bundles import BUNDLE_ITEMS, bundled
from producer.client import intake_messages

LARGE = 256 * 1024
TOPOLOGY = Topology("ns", large_message_bytes=LARGE)


def request(i: int, text: str = "Hello.") -> IntakeRequest:
    return IntakeRequest(id=f"id{i}", tenant="acme", sender="hr@acme.example", created_ms=now_ms(),
                         to=(f"user{i}@example.com",), subject="Hi", text=text)


def unbundled(messages: list[tuple[str, bytes]], kind: str) -> list[bytes]:
    return [item for _queue, body in messages for item in items_of(body, kind)]


def test_250_requests_go_in_three_bundles_of_at_most_100() -> None:
    requests = [request(i) for i in range(250)]
    messages = intake_messages(TOPOLOGY, requests)
    assert [m.routing_key for m in messages] == ["ns.intake"] * 3
    assert [len(items_of(m.body, "intake")) for m in messages] == [100, 100, 50]
    assert all(kind_of(m.body) == "intakes" for m in messages)
    assert unbundled([(m.routing_key, m.body) for m in messages], "intake") == [encode_intake(r) for r in requests]
    assert len({m.message_id for m in messages}) == 3


def test_a_request_alone_goes_as_itself_and_a_large_one_alone_on_intake_large() -> None:
    one = request(1)
    (alone,) = intake_messages(TOPOLOGY, [one])
    assert alone.body == encode_intake(one)
    assert alone.routing_key == "ns.intake" and alone.message_id == "id1"
    large = request(2, text="x" * LARGE)
    messages = intake_messages(TOPOLOGY, [one, large, request(3)])
    by_queue = {m.routing_key: m for m in messages}
    assert set(by_queue) == {"ns.intake", "ns.intake.large"}
    assert kind_of(by_queue["ns.intake.large"].body) == "intake"
    assert by_queue["ns.intake.large"].message_id == "id2"
    assert len(items_of(by_queue["ns.intake"].body, "intake")) == 2


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.one_of(st.integers(1, 3000), st.integers(60_000, 140_000),
                                st.integers(LARGE - 40, LARGE + 40)), max_size=300))
def test_every_bundle_is_within_the_limits_and_every_item_is_carried_once_in_order(sizes: list[int]) -> None:
    encoded = [(f"id{i}", bytes([i % 251]) * size) for i, size in enumerate(sizes)]
    messages = bundled("job", encoded, TOPOLOGY.jobs_for, LARGE)
    carried = []
    for m in messages:
        if kind_of(m.body) == "jobs":
            items = items_of(m.body, "job")
            assert 2 <= len(items) <= BUNDLE_ITEMS
            assert len(m.body) <= LARGE and m.routing_key == "ns.jobs"
        else:  # alone: itself, by its size class
            items = [m.body]
            assert m.routing_key == TOPOLOGY.jobs_for(len(m.body))
            assert m.message_id == encoded[[body for _id, body in encoded].index(m.body)][0]
        carried += items
    assert sorted(carried) == sorted(body for _id, body in encoded)
    small = [body for _id, body in encoded if len(body) <= LARGE]
    assert [c for c in carried if len(c) <= LARGE] == small, "in order"


def test_the_packer_views_are_the_items_without_copies() -> None:
    items = [b"a" * 10, b"b" * 300, b"c" * 70_000, b"d"]
    bundle = encode_bundle("job", items)
    views = item_views(bundle, "job")
    assert [bytes(v) for v in views] == items
    assert all(v.obj is bundle for v in views), "views of the delivery's bytes"
    alone = msgpack.packb({"v": 1, "kind": "job"})
    assert [v.obj for v in item_views(alone, "job")] == [alone]


def test_the_packer_views_of_a_bundle_with_its_keys_in_another_order_and_wide_headers() -> None:
    """Another encoder may order the keys otherwise and use a wider bin header than needed."""
    items = [b"x" * 5, b"y" * 7]
    wide = b"".join(b"\xc6" + len(i).to_bytes(4, "big") + i for i in items)
    body = (b"\x83" + msgpack.packb("items") + b"\x92" + wide + msgpack.packb("kind") + msgpack.packb("jobs")
            + msgpack.packb("v") + msgpack.packb(1))
    assert items_of(body, "job") == items
    views = item_views(body, "job")
    assert [bytes(v) for v in views] == items and all(v.obj is body for v in views)


@pytest.mark.parametrize("body, reason", [
    (encode_bundle("job", []), r"jobs\.items: empty"),
    (msgpack.packb({"v": 1, "kind": "jobs", "items": ["text"]}), r"jobs\.items: expected an array of binaries"),
    (msgpack.packb({"v": 2, "kind": "jobs", "items": [b"x"]}), r"jobs\.v"),
    (b"\xc1 not msgpack", r"jobs: not valid msgpack"),
])
def test_a_bundle_that_does_not_decode_is_refused_as_items_of_refuses_it(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=reason):
        item_views(body, "job")
