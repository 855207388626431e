"""A local SMTP sink (aiosmtpd) that accepts every mail: the demo's server when none is set."""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiosmtpd.controller import Controller

_MESSAGE_ID = re.compile(rb"^Message-ID:\s*<([^@>]+)@", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Received:
    sender: str
    recipients: tuple[str, ...]
    size: int
    job_id: str  # from the Message-ID mailpipe renders: <job_id@sender-domain>
    at: float


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def ehlo_offering_pipelining(session: Any, hostname: str, responses: list[str]) -> list[str]:
    """An aiosmtpd ``handle_EHLO`` hook's work: its EHLO reply with PIPELINING (RFC 2920)
    offered. aiosmtpd reads commands one by one, so pipelined ones work; it just never says so."""
    session.host_name = hostname  # the hook replaces aiosmtpd's own bookkeeping
    responses.insert(-1, "250-PIPELINING")
    return responses


class _Handler:
    def __init__(self, sink: LocalSink) -> None:
        self.sink = sink

    async def handle_EHLO(self, _server: Any, session: Any, _envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        return ehlo_offering_pipelining(session, hostname, responses)

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        content: bytes = envelope.original_content or envelope.content
        match = _MESSAGE_ID.search(content[:16384])
        self.sink.record(Received(
            sender=envelope.mail_from, recipients=tuple(envelope.rcpt_tos), size=len(content),
            job_id=match.group(1).decode("ascii", "replace") if match else "", at=time.time()))
        return "250 OK"


class LocalSink:
    """``with LocalSink() as sink:`` listens on 127.0.0.1:``sink.port`` until the block ends."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._controller = Controller(_Handler(self), hostname=host, port=self.port,
                                      data_size_limit=None, ident="mailpipe local sink")

    def record(self, received: Received) -> None:
        with self._lock:
            self.received.append(received)

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def __enter__(self) -> LocalSink:
        self._controller.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._controller.stop()
