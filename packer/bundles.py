"""A jobs bundle's jobs as views of the delivery's bytes, not copies (issue 24).

The packer holds each job in an open batch until the batch ships, and acks a bundle's delivery
once its last job has shipped. A copy of each job (what msgpack's decoder gives) would be held
beside the delivery's own bytes while the poll that brought them is handled: twice the unacked
window at worst. A view keeps the delivery's bytes instead, and they go when the last view of
them does, which is when the delivery is acked: what the packer holds stays the unacked bytes
the prefetch bounds (docs/design-notes.md, "Memory per stage, in bytes").
"""

from __future__ import annotations

import io

import msgpack

from mailpipe.codec import MAX_ARRAY, MAX_MAP, MAX_STR, items_of

# msgpack's bin 8, 16 and 32: the type byte, then the length in 1, 2 or 4 bytes, then the bytes.
_BIN_LENGTH_BYTES = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def item_views(data: bytes, kind: str) -> list[memoryview]:
    """``mailpipe.codec.items_of(data, kind)`` (the same checks, the same ``InvalidMessage``),
    each item a view of ``data``."""
    items = items_of(data, kind)
    view = memoryview(data)
    if len(items) == 1 and items[0] is data:  # a message alone
        return [view]
    pos = _items_start(data)
    views = []
    for item in items:
        width = _BIN_LENGTH_BYTES.get(data[pos], 0) if pos < len(data) else 0
        start = pos + 1 + width
        if not width or int.from_bytes(data[pos + 1:start], "big") != len(item):
            return [memoryview(item) for item in items]  # not laid out as read: keep the copies
        views.append(view[start:start + len(item)])
        pos = start + len(item)
    return views


def _items_start(data: bytes) -> int:
    """Where the first item of a bundle's ``items`` array starts (read from a stream: the
    bundle's bytes are not copied to find it)."""
    unpacker = msgpack.Unpacker(io.BytesIO(data), read_size=4096, raw=False, max_str_len=MAX_STR,
                                max_bin_len=len(data), max_array_len=MAX_ARRAY, max_map_len=MAX_MAP,
                                max_ext_len=0)
    for _ in range(unpacker.read_map_header()):
        if unpacker.unpack() == "items":
            unpacker.read_array_header()
            return int(unpacker.tell())
        unpacker.skip()
    return len(data)
