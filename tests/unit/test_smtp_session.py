"""The SMTP session's pure parts: the DATA payload, envelope addresses, reply parsing."""

from __future__ import annotations

import asyncio

import pytest

from sender.session import ServerReply, Session, address_arg, data_payload


@pytest.mark.parametrize(("message", "payload"), [
    (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
    (b"a\nb\rc\r\n", b"a\r\nb\r\nc\r\n.\r\n"),
    (b".top\r\n.\r\nx\r\n..two\r\n", b"..top\r\n..\r\nx\r\n...two\r\n.\r\n"),
])
def test_data_payload_ends_lines_with_crlf_and_doubles_leading_dots(message: bytes, payload: bytes) -> None:
    assert data_payload(message) == payload


def test_address_arg_refuses_what_cannot_go_on_the_wire() -> None:
    assert address_arg("a@example.com") == b"<a@example.com>"
    assert address_arg("") == b"<>"  # the null reverse-path
    for bad in ("a@example.com\r\nRCPT TO:<x@y>", "a\0@example.com", "jörg@example.com", "<a@b>"):
        with pytest.raises(ValueError):
            address_arg(bad)


class _Transport(asyncio.Transport):
    """Just enough of a transport to feed the parser bytes (no socket: pure parsing)."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def _fed(*chunks: bytes) -> Session:
    session = Session(_Transport(), {}, timeout_s=1.0)
    for chunk in chunks:
        session.data_received(chunk)
    return session


def test_replies_split_across_reads_and_several_in_one_read() -> None:
    session = _fed(b"250 2.1.0 Ok\r\n250-first\r\n250-sec", b"ond\r\n250 third\r\n35", b"4 go ahead\r\n")
    replies = asyncio.run(session.replies(3))
    assert replies == [ServerReply(250, "2.1.0 Ok"), ServerReply(250, "first\nsecond\nthird"),
                       ServerReply(354, "go ahead")]


def test_a_malformed_reply_ends_the_session() -> None:
    session = _fed(b"250 ok\r\nhello there\r\n")
    assert not session.is_connected
    assert asyncio.run(session.replies(1)) == [ServerReply(250, "ok")]
    with pytest.raises(ConnectionError, match="malformed"):
        asyncio.run(session.replies(1))


def test_a_421_that_closes_the_session_ends_a_pipelined_read_early() -> None:
    session = _fed(b"250 ok\r\n421 4.3.2 shutting down\r\n")
    session.connection_lost(None)
    assert asyncio.run(session.replies(4)) == [ServerReply(250, "ok"), ServerReply(421, "4.3.2 shutting down")]


def test_a_lost_session_without_421_raises() -> None:
    session = _fed(b"250 ok\r\n")
    session.connection_lost(None)
    with pytest.raises(ConnectionError):
        asyncio.run(session.replies(2))
