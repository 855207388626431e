"""What the inbound stage's receivers put on ``<ns>.reports`` (kind ``report``): the raw report
as it came, with its envelope, for the stage's consumer to read. docs/wire-format.md, section 8."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from mailpipe.codec import _Fields, _pack, _unpack

SMTP, HTTP = "smtp", "http"


@dataclass(frozen=True)
class RawReport:
    id: str  # SHA-256 of what came (the bytes, or the link): the same report, the same id
    received_ms: int
    source: str  # "smtp" (a mail to a return path) or "http" (a one-click POST)
    data: bytes = field(default=b"", repr=False)  # the mail as received (smtp)
    mail_from: str = ""
    rcpts: tuple[str, ...] = ()
    peer: str = ""  # the client's address
    helo: str = ""
    link: str = ""  # http: the unsubscribe link's token


def report_id(what: bytes) -> str:
    return hashlib.sha256(what).hexdigest()[:32]


def encode_report(report: RawReport) -> bytes:
    return _pack("report", {
        "id": report.id, "received_ms": report.received_ms, "source": report.source, "data": report.data,
        "mail_from": report.mail_from, "rcpts": list(report.rcpts), "peer": report.peer, "helo": report.helo,
        "link": report.link})


def decode_report(data: bytes, max_bytes: int) -> RawReport:
    f = _Fields("report", _unpack(data, "report", max_bin=max_bytes))
    return RawReport(
        id=f.text("id", max_len=64), received_ms=f.integer("received_ms"), source=f.text("source", max_len=16),
        data=f.binary("data", required=False) or b"", mail_from=f.text("mail_from", required=False) or "",
        rcpts=f.texts("rcpts"), peer=f.text("peer", required=False, max_len=255) or "",
        helo=f.text("helo", required=False, max_len=1000) or "",
        link=f.text("link", required=False, max_len=4096) or "")
