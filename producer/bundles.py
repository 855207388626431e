"""Many intake requests, or jobs, in one AMQP message (issue 24): RabbitMQ's cost is per message,
61 us of its CPU for a mail alone on a quorum queue, 8 at 100 mails per message, and pika's at
both ends likewise (docs/design-notes.md, "Where the time goes").

A bundle (mailpipe/codec.py ``encode_bundle``) holds at most ``BUNDLE_ITEMS`` items and is at
most ``large_message_bytes`` encoded: it travels on the small queue and counts there as one
message of at most that size, so a consumer's bound in bytes (prefetch x
``large_message_bytes``) is what it was with one item per message. An item over
``large_message_bytes`` goes alone on the ``.large`` queue, as before; an item that would be
alone in its bundle goes as itself. Each item stays a whole message of its own: the consumer
decodes, refuses and dead-letters it on its own (docs/wire-format.md, sections 2.1 and 3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mailpipe.amqp import Outgoing
from mailpipe.codec import encode_bundle
from mailpipe.model import new_id

BUNDLE_ITEMS = 100  # RabbitMQ: 8.4 us per mail at 100 per message, 17.3 at 10, 60.7 at 1
# Upper bounds of msgpack's framing: the bundle's map ({"v": 1, "kind": "intakes", "items": [...]},
# 26 bytes with an array of up to 65,535 items) and each item's bin header (2, 3 or 5 bytes).
_BUNDLE_FRAMING = 32
_ITEM_FRAMING = 5


def bundled(kind: str, encoded: Sequence[tuple[str, bytes]], queue_for: Callable[[int], str],
            large_message_bytes: int) -> list[Outgoing]:
    """The messages that carry ``encoded`` (each ``(id, bytes of one encoded kind)``, in order):
    bundles of at most BUNDLE_ITEMS and ``large_message_bytes``, on ``queue_for(size)`` (the
    small queue); an item over ``large_message_bytes``, or alone, as itself."""
    out: list[Outgoing] = []
    group: list[tuple[str, bytes]] = []
    size = _BUNDLE_FRAMING

    def close() -> None:
        if len(group) == 1:
            message_id, body = group[0]
            out.append(Outgoing(queue_for(len(body)), body, message_id=message_id))
        elif group:
            body = encode_bundle(kind, [item for _id, item in group])
            out.append(Outgoing(queue_for(len(body)), body, message_id=new_id()))

    for message_id, body in encoded:
        if len(body) > large_message_bytes:
            out.append(Outgoing(queue_for(len(body)), body, message_id=message_id))
            continue
        if group and (len(group) == BUNDLE_ITEMS or size + _ITEM_FRAMING + len(body) > large_message_bytes):
            close()
            group, size = [], _BUNDLE_FRAMING
        group.append((message_id, body))
        size += _ITEM_FRAMING + len(body)
    close()
    return out
