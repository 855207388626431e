"""mailpipe.amqp's ``_frames_by_offset`` against pika's own ``_on_data_available``: the same
frames, processed in the same order, however the socket's reads cut the stream (a frame split
over reads, a read of many frames, a body of several frames), and the same bytes counted."""

from __future__ import annotations

import random
from typing import Any

import pika.connection
import pika.frame
import pika.spec

from mailpipe.amqp import _frames_by_offset


class _Impl:
    """What the two functions touch of a pika connection."""

    def __init__(self) -> None:
        self._frame_buffer = b""
        self.bytes_received = 0
        self.frames: list[tuple[str, int, Any]] = []

    def _process_frame(self, frame: Any) -> None:
        what = getattr(frame, "fragment", None) or getattr(frame, "method", None) or getattr(frame, "properties", None)
        self.frames.append((type(frame).__name__, frame.channel_number, repr(what)))

    _read_frame = pika.connection.Connection._read_frame
    _trim_frame_buffer = pika.connection.Connection._trim_frame_buffer
    _on_data_available = pika.connection.Connection._on_data_available


def stream(rng: random.Random, deliveries: int) -> bytes:
    out = []
    for tag in range(1, deliveries + 1):
        body = rng.randbytes(rng.choice([0, 10, 2400, 200_000]))
        out.append(pika.frame.Method(1, pika.spec.Basic.Deliver("ctag", tag, False, "", "q")).marshal())
        out.append(pika.frame.Header(1, len(body), pika.spec.BasicProperties(message_id=str(tag))).marshal())
        for i in range(0, len(body), 131_064):
            out.append(pika.frame.Body(1, body[i:i + 131_064]).marshal())
    return b"".join(out)


def test_frames_by_offset_processes_what_pika_does_however_the_reads_cut_the_stream() -> None:
    for seed in range(30):
        rng = random.Random(seed)
        data = stream(rng, rng.randrange(1, 40))
        theirs, ours = _Impl(), _Impl()
        at = 0
        while at < len(data):
            n = rng.choice([1, 7, 100, 4096, 131_072, 300_000])
            theirs._on_data_available(data[at:at + n])
            _frames_by_offset(ours, data[at:at + n])
            at += n
        assert ours.frames == theirs.frames, f"seed {seed}"
        assert (ours.bytes_received, ours._frame_buffer) == (theirs.bytes_received, theirs._frame_buffer) == (
            len(data), b"")
