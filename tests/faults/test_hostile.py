"""A hostile tenant against the real pipeline (issue 13).

The four stages run as processes (one replica each) against three SMTP peers: the platform's
server (``platform = true``, 36,000 mails/hour, a 1 s window, burst 30 so that a grant is at
most 20 mails), tenant A's own server and tenant B's own server. Each tenant has its verified
``domains``.

Tenant A tries every trick it can think of, through the client library where the library lets
it through, and as raw msgpack published straight to ``<ns>.intake`` where the library would
refuse it first: another tenant's server, B's domain in the envelope, in ``Sender`` and in a
raw message's ``From`` (forged, folded, hidden, doubled, display-name tricks), every Unicode
separator in every header, address and identifier, deep and wide msgpack bombs, claimed
lengths of 1 GiB, non-map bodies, B's idempotency key and B's job id, and a whole campaign
marked ``priority = "high"``. Tenant B publishes ordinary mail at the same time.

Checked: every trick is a dead letter with its category and a reason naming the field (the
campaign instead is rationed: the limiter's ``mailpipe_limiter_high_priority_total``, and the
order at the peer); B's mail is all delivered within ``B_BOUND_S`` of its publish; B's keyed
job is delivered although A used the same key and B's job id first; nothing of A's reaches B's
server or goes out from B's domain; no stage exits, restarts or logs a crash; and every stage's
peak RSS, sampled all along (and its VmHWM at the end), stays under ``RSS_BOUND``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from email import message_from_bytes
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import msgpack
import pika
import pytest
import redis

from mailpipe.codec import encode_intake
from mailpipe.errors import InvalidMessage
from mailpipe.model import Attachment, IntakeRequest, job_id_for, new_id, now_ms
from mailpipe.servers import parse_config
from mailpipe.settings import MIB, Settings
from mailpipe.topology import Topology
from producer import Producer
from producer.domains import check_domains
from tests.faults.harness import (
    LedgerPeer,
    Pipeline,
    free_port,
    in_flight,
    rss_bytes,
    wait_until,
)
from tests.faults.ledger import DeadEntry, job_id_of, read_dead
from tests.smtp_peer import Received

pytestmark = [pytest.mark.faults, pytest.mark.integration]

RATE_PER_H = 36_000  # the platform server: 10 mails/s
BURST = 30  # a 1 s window keeps 10 back: a grant takes at most 20 mails
MAX_BATCH = 10
HIGH_SHARE = 0.1  # MAILPIPE_HIGH_PRIORITY_SHARE's default: A's high mail may go ahead at 1/s, burst 2
MAX_MESSAGE = 8 * MIB  # small enough that a real over-limit body is cheap to publish
B_MAILS = 50  # per phase
CAMPAIGN = 150  # A's "transactional" campaign, all marked high
# B's mail is delivered within this of its publish. The platform's queue in phase 2 is B's 50
# mails (5 s at 10/s) plus what A's share may put ahead of them (2 + 1/s); 30 s leaves room for
# a loaded 2-core machine, and is far below the 20 s + B's own 5 s that A's campaign would cost
# B if it jumped the line at the campaign's 150 mails.
B_BOUND_S = 30.0
# Each stage's peak RSS. An idle stage is 60 to 90 MB (CPython, pika, redis, prometheus_client,
# the email package). The producer may hold every trick at once, unacked (prefetch 500): about
# 26 MB of bodies (two 8 MB bombs, the 8 MB over-limit body, small ones), and decodes one at a
# time within MAX_OBJECTS / MAX_DECODED_OVERHEAD (16 MiB). 300 MB is about twice that, and far
# below what one bomb costs decoded whole: the 8 MB of empty maps alone is 8 million dicts, over
# 500 MB.
RSS_BOUND = 300 * 1024 * 1024
SEPARATORS = ("\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\x00", "\r", "\n", "\x7f")
LOG_PROBLEMS = ("failed unexpectedly", "reconnected", "poison message", "Traceback")


def servers_toml(platform: int, a_port: int, b_port: int) -> str:
    return f"""
[servers.platform]
address = "[127.0.0.1]:{platform}"
tls = "none"
platform = true
rate_per_hour = {RATE_PER_H}

[servers.a-own]
address = "[127.0.0.1]:{a_port}"
tls = "none"
unlimited = true

[servers.b-own]
address = "[127.0.0.1]:{b_port}"
tls = "none"
unlimited = true

[tenants.a]
servers = ["a-own"]
domains = ["a.example"]
daily_limit = 1000000

[tenants.b]
servers = ["b-own"]
domains = ["b.example"]
daily_limit = 1000000
"""


# -- the tricks ---------------------------------------------------------------------------------

@dataclass
class Trick:
    """One request of A's that must end as a dead letter: ``category``, and a reason that starts
    with ``reason`` (the field) and contains each of ``contains``. ``req`` is set when it goes
    through the client library (which lets it through); otherwise ``body`` is published raw."""

    name: str
    body: bytes
    category: str
    reason: str
    contains: tuple[str, ...] = ()
    req: IntakeRequest | None = None


def a_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"v": 1, "kind": "intake", "id": new_id(), "tenant": "a", "sender": "hr@a.example",
                              "created_ms": now_ms(), "to": ["ann@example.com"], "subject": "Hello",
                              "text": "Hello from A.\n"}
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


def pack(fields: dict[str, Any]) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]


def with_extra(fields: dict[str, Any], key: str, raw_value: bytes) -> bytes:
    """The map of ``fields`` plus ``key`` whose value is the given msgpack bytes, as they are."""
    assert len(fields) < 15
    body = pack(fields)
    assert body[0] == 0x80 | len(fields)
    return bytes([0x80 | (len(fields) + 1)]) + body[1:] + pack({key: None})[1:-1] + raw_value


def raw_message(from_line: str, job: str, *, extra: str = "", sender_domain: str = "a.example") -> bytes:
    return (f"{from_line}\r\n{extra}To: ann@example.com\r\nSubject: Invoice\r\n"
            f"Message-ID: <{job}@{sender_domain}>\r\n\r\nPay now.\r\n").encode()


def raw_req(job: str, message: bytes, *, sender: str = "hr@a.example", **changes: Any) -> IntakeRequest:
    return IntakeRequest(id=job, tenant="a", sender=sender, created_ms=now_ms(), recipients=("ann@example.com",),
                         message=message, **changes)


def composed_req(**changes: Any) -> IntakeRequest:
    base: dict[str, Any] = dict(id=new_id(), tenant="a", sender="hr@a.example", created_ms=now_ms(),
                                to=("ann@example.com",), subject="Hello", text="Hello from A.\n")
    base.update(changes)
    return IntakeRequest(**base)


def client_trick(name: str, req: IntakeRequest, category: str, reason: str, *contains: str) -> Trick:
    return Trick(name, encode_intake(req), category, reason, contains, req=req)


def routing_and_domain_tricks() -> list[Trick]:
    """What the client library lets through and the enqueue stage must refuse."""
    not_a = "is not at a verified domain of tenant 'a'"
    out = [
        client_trick("b's server", composed_req(server="b-own"), "routing",
                     "server: tenant 'a' may not send through 'b-own'", "its servers are a-own, platform"),
        client_trick("b's server, other case", composed_req(server="B-own"), "routing",
                     "server: unknown server 'B-own'"),
        client_trick("unknown server", composed_req(server="nowhere"), "routing", "server: unknown server"),
        client_trick("unknown tenant", composed_req(tenant="c"), "routing", "unknown tenant 'c'"),
        client_trick("b's domain as sender", composed_req(sender="billing@b.example"), "invalid",
                     f"sender: 'billing@b.example' {not_a}", "SPF", "DKIM"),
        client_trick("b's domain via the platform", composed_req(sender="billing@b.example", server="platform"),
                     "invalid", f"sender: 'billing@b.example' {not_a}"),
        client_trick("b's subdomain", composed_req(sender="hr@mail.b.example"), "invalid",
                     f"sender: 'hr@mail.b.example' {not_a}"),
        client_trick("look-alike domain", composed_req(sender="hr@a.example.b.example"), "invalid",
                     f"sender: 'hr@a.example.b.example' {not_a}"),
        client_trick("upper-case b", composed_req(sender="billing@B.EXAMPLE"), "invalid",
                     "sender: 'billing@B.EXAMPLE'"),
        client_trick("Sender header of b", composed_req(headers={"Sender": "billing@b.example"}), "invalid",
                     f"headers['Sender']: 'billing@b.example' {not_a}"),
        client_trick("executable attachment", composed_req(attachments=(Attachment("invoice.exe",
                     "application/octet-stream", b"MZ\x90\x00"),)), "invalid", "executable_attachment"),
        client_trick("script", composed_req(html="<p>Hi</p><script>steal()</script>", text=None), "invalid",
                     "", "script"),
    ]
    raws: list[tuple[str, str, str, str]] = [
        # (name, header lines, reason prefix, envelope sender)
        ("raw forged From", "From: Billing <billing@b.example>", f"message.From: 'billing@b.example' {not_a}", ""),
        ("raw display-name trick", 'From: "hr@a.example" <billing@b.example>', "message.From: 'billing@b.example'", ""),
        ("raw two Froms", "From: hr@a.example\r\nFrom: billing@b.example", "message.From: 2 From headers", ""),
        ("raw From, FROM", "From: hr@a.example\r\nFROM: billing@b.example", "message.From: 2 From headers", ""),
        ("raw From after a lone CR", "From: hr@a.example\rFrom: billing@b.example", "message.From: 2 From headers",
         ""),
        ("raw no From", "X-Mailer: evil", "message.From: 0 From headers", ""),
        ("raw Sender of b", "From: hr@a.example\r\nSender: billing@b.example", "message.Sender: 'billing@b.example'",
         ""),
        ("raw two Senders", "From: hr@a.example\r\nSender: hr@a.example\r\nSender: hr@a.example",
         "message.Sender: 2 Sender headers", ""),
        ("raw folded From list", "From: hr@a.example,\r\n billing@b.example", "message.From: 'billing@b.example'", ""),
        ("raw group", "From: Team: hr@a.example, billing@b.example;", "message.From: 'billing@b.example'", ""),
        ("raw encoded word", "From: =?utf-8?q?hr=40a=2Eexample?= <billing@b.example>",
         "message.From: 'billing@b.example'", ""),
        ("raw From hidden after a broken line", "X-A: 1\r\nnot a header\r\nFrom: billing@b.example",
         "message: line 2 of the header section", ""),
        ("raw From with a comment", "From: hr@a.example (x) <billing@b.example>", "message.From:", ""),
        ("raw From too long", "From: " + "x" * 2500 + " <hr@a.example>", "message.From: ", ""),
        ("raw nested comments", "From: " + "(" * 900 + "x" + ")" * 900 + " hr@a.example", "message.From:", ""),
        ("raw envelope of b", "From: hr@a.example", f"sender: 'billing@b.example' {not_a}", "billing@b.example"),
    ]
    for name, lines, reason, envelope in raws:
        job = new_id()
        out.append(client_trick(name, raw_req(job, raw_message(lines, job), sender=envelope or "hr@a.example"),
                                "invalid", reason))
    # Every separator in a raw message's From display name: the client does not read the message.
    for char in SEPARATORS:
        job = new_id()
        message = raw_message(f'From: "HR{char}Team" <hr@a.example>', job)
        reason = "message: line 2" if char in "\r\n" else "message.From:"
        out.append(client_trick(f"raw From display name with U+{ord(char):04X}", raw_req(job, message), "invalid",
                                reason))
    return out


def separator_tricks() -> tuple[list[Trick], list[IntakeRequest]]:
    """Every separator in every header, address and identifier, as raw msgpack (the client
    refuses each first: the requests are returned to check that)."""
    out: list[Trick] = []
    requests: list[IntakeRequest] = []
    for char in SEPARATORS:
        code = f"U+{ord(char):04X}"
        job = new_id()
        honest = raw_message("From: hr@a.example", job).decode()
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("subject", {"subject": f"Hello{char}Bcc: victim@example.com"}, "subject: contains"),
            ("header value", {"headers": {"X-Campaign": f"spring{char}X-Evil: 1"}}, "headers['X-Campaign'] value:"),
            ("header name", {"headers": {f"X-Bad{char}Name": "1"}}, "headers["),
            ("attachment filename", {"attachments": [[f"report{char}.pdf", "application/pdf", b"%PDF-1.4"]]},
             "attachments[0].filename: contains"),
            ("to", {"to": [f"ann{char}@example.com"]}, "to[0]:"),
            ("cc", {"cc": [f"carl@exam{char}ple.com"]}, "cc[0]:"),
            ("bcc", {"bcc": [f"bob@example.com{char}x"]}, "bcc[0]:"),
            ("display name in to", {"to": [f"Ann{char}Smith <ann@example.com>"]}, "to[0]:"),
            ("sender", {"sender": f"hr{char}@a.example"}, "sender:"),
            ("raw recipients", {"to": None, "subject": None, "text": None, "message": honest.encode(),
                                "recipients": [f"ann@example.com{char}"], "id": job}, "recipients[0]:"),
            ("tenant", {"tenant": f"a{char}"}, "tenant: contains"),
            ("server", {"server": f"platform{char}"}, "server: contains"),
            ("idempotency key", {"idempotency_key": f"key{char}1"}, "idempotency_key: contains"),
            ("id", {"id": f"{new_id()[:20]}{char}x"}, "id: "),
        ]
        for where, changes, reason in cases:
            fields = a_fields(**changes)
            # id: a character that is not atext is refused as such, the others name the character.
            contains = () if where == "id" else (code,)
            out.append(Trick(f"{code} in {where}", pack(fields), "invalid", reason, contains))
            requests.append(IntakeRequest(
                id=fields["id"], tenant=fields["tenant"], sender=fields["sender"], created_ms=fields["created_ms"],
                to=tuple(fields.get("to", ())), cc=tuple(fields.get("cc", ())), bcc=tuple(fields.get("bcc", ())),
                subject=fields.get("subject"), text=fields.get("text"), headers=fields.get("headers", {}),
                attachments=tuple(Attachment(*a) for a in fields.get("attachments", ())),
                server=fields.get("server"), idempotency_key=fields.get("idempotency_key"),
                message=fields.get("message"), recipients=tuple(fields.get("recipients", ()))))
    return out, requests


def claim_1gib(prefix: bytes) -> bytes:
    return prefix + (1 << 30).to_bytes(4, "big") + b"\x00" * 16


def bomb_tricks() -> list[Trick]:
    """Bombs, claimed lengths of 1 GiB, bodies that are no intake map: raw msgpack only."""
    not_msgpack = "intake: not valid msgpack"
    too_large = "intake: too large once decoded"
    wide_maps = b"\xdc" + (800).to_bytes(2, "big") + (b"\xdc" + (10_000).to_bytes(2, "big") + b"\x80" * 10_000) * 800
    wide_nils = b"\xdc" + (800).to_bytes(2, "big") + (b"\xdc" + (10_000).to_bytes(2, "big") + b"\xc0" * 10_000) * 800
    inner = b"\xde" + (1000).to_bytes(2, "big") + b"".join(pack(f"k{i:03}") + b"\xc0" for i in range(1000))
    wide_dicts = b"\xde" + (1000).to_bytes(2, "big") + b"".join(pack(f"m{i:03}") + inner for i in range(1000))
    out = [
        Trick("deep arrays, 1 MB", with_extra(a_fields(), "x", b"\x91" * 1_000_000 + b"\xc0"), "invalid",
              not_msgpack, ("StackError",)),
        Trick("deep maps", with_extra(a_fields(), "x", b"\x81\xa1k" * 5000 + b"\xc0"), "invalid", not_msgpack),
        Trick("deep at the top", b"\x91" * 5000 + b"\xc0", "invalid", not_msgpack),
        Trick("8 MB of empty maps", with_extra(a_fields(), "x", wide_maps), "invalid", too_large, ("MAX_OBJECTS",)),
        Trick("8 MB of nils", with_extra(a_fields(), "x", wide_nils), "invalid", too_large),
        Trick("a million map entries", with_extra(a_fields(), "x", wide_dicts), "invalid", too_large),
        Trick("over the size limit", with_extra(a_fields(), "x", pack(b"\x00" * (MAX_MESSAGE + 64 * 1024))),
              "invalid", "intake: ", ("over the", "byte limit")),
        Trick("str32 of 1 GiB at the top", claim_1gib(b"\xdb"), "invalid", not_msgpack),
        Trick("bin32 of 1 GiB at the top", claim_1gib(b"\xc6"), "invalid", not_msgpack),
        Trick("array32 of 1 GiB at the top", claim_1gib(b"\xdd"), "invalid", not_msgpack),
        Trick("map32 of 1 GiB at the top", claim_1gib(b"\xdf"), "invalid", not_msgpack),
        Trick("message of 1 GiB", with_extra(a_fields(to=None, subject=None, text=None, recipients=["a@example.com"]),
                                             "message", claim_1gib(b"\xc6")), "invalid", not_msgpack),
        Trick("subject of 1 GiB", with_extra(a_fields(subject=None), "subject", claim_1gib(b"\xdb")), "invalid",
              not_msgpack),
        Trick("to of 1 GiB items", with_extra(a_fields(to=None), "to", claim_1gib(b"\xdd")), "invalid", not_msgpack),
        Trick("headers of 1 GiB entries", with_extra(a_fields(), "headers", claim_1gib(b"\xdf")), "invalid",
              not_msgpack),
        Trick("attachment of 1 GiB", with_extra(a_fields(), "attachments",
                                                b"\x91\x93\xa5a.pdf\xafapplication/pdf" + claim_1gib(b"\xc6")),
              "invalid", not_msgpack),
        Trick("message claiming 4 MiB, 10 bytes", with_extra(
            a_fields(to=None, subject=None, text=None, recipients=["a@example.com"]), "message",
            b"\xc6" + (4 * MIB).to_bytes(4, "big") + b"0123456789"), "invalid", not_msgpack),
        Trick("empty body", b"", "invalid", "intake"),
        Trick("array", pack([1, "a", {"v": 1}]), "invalid", "intake: expected a map at the top level, got list"),
        Trick("int", pack(42), "invalid", "intake: expected a map at the top level, got int"),
        Trick("str", pack("intake"), "invalid", "intake: expected a map at the top level, got str"),
        Trick("nil", pack(None), "invalid", "intake: expected a map at the top level, got NoneType"),
        Trick("bin", pack(b"\x81\xa1v\x01"), "invalid", "intake: expected a map at the top level, got bytes"),
        Trick("ext timestamp", msgpack.packb(msgpack.Timestamp(0), datetime=False), "invalid", not_msgpack),
        Trick("trailing bytes", pack(a_fields()) + b"\xc0", "invalid", not_msgpack, ("ExtraData",)),
        Trick("v = 1.0", pack(a_fields(v=1.0)), "invalid", "intake.v: unsupported schema version 1.0"),
        Trick("v = true", pack(a_fields(v=True)), "invalid", "intake.v: unsupported schema version True"),
        Trick("kind = job", pack(a_fields(kind="job")), "invalid", "intake.kind: expected 'intake'"),
        Trick("101 recipients", pack(a_fields(to=[f"r{i}@example.com" for i in range(101)])), "invalid",
              "recipients: 101 given"),
        Trick("Bcc header", pack(a_fields(headers={"Bcc": "victim@example.com"})), "invalid",
              "headers['Bcc']: set by mailpipe"),
        Trick("priority urgent", pack(a_fields(priority="urgent")), "invalid",
              "intake.priority: 'urgent' is not one of"),
        Trick("negative created_ms", pack(a_fields(created_ms=-1)), "invalid",
              "intake.created_ms: must not be negative"),
        Trick("send_at in 31 days", pack(a_fields(send_at_ms=now_ms() + 31 * 86_400_000)), "invalid",
              "send_at: more than 30 days ahead"),
        Trick("id of 65 characters", pack(a_fields(id="x" * 65)), "invalid", "intake.id: longer than 64"),
    ]
    return out


# -- running it -----------------------------------------------------------------------------------

class MeteredPipeline(Pipeline):
    """The harness's pipeline, with the limiter serving ``/metrics`` on ``limiter_port``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limiter_port = free_port()

    def start(self, name: str) -> None:
        stage = name.rsplit("-", 1)[0]
        metrics = ["--metrics-port", str(self.limiter_port)] if stage == "limiter" else []
        with (self.log_dir / f"{name}.log").open("ab") as log:  # the child keeps its own copy
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "mailpipe", "run", stage, *metrics],
                                                env=self.env, stdout=log, stderr=subprocess.STDOUT)


class RssSampler(threading.Thread):
    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pipeline = pipeline
        self.peak: dict[str, int] = {}
        self.samples = 0
        self.stop_now = threading.Event()

    def run(self) -> None:
        while not self.stop_now.is_set():
            for name, proc in list(self.pipeline.procs.items()):
                if proc.poll() is None:
                    with contextlib.suppress(OSError, AssertionError):  # it may just have exited
                        self.peak[name] = max(self.peak.get(name, 0), rss_bytes(proc.pid))
            self.samples += 1
            self.stop_now.wait(0.1)


class Publisher(threading.Thread):
    """Tenant B: ``count`` ordinary mails, ``chunk`` per confirmed publish, ``pause_s`` apart;
    the time each publish returned, by job id."""

    def __init__(self, settings: Settings, count: int, *, server: str | None, chunk: int, pause_s: float,
                 tag: str) -> None:
        super().__init__(name=f"tenant-b-{tag}", daemon=True)
        self.settings, self.count, self.server, self.chunk, self.pause_s, self.tag = (
            settings, count, server, chunk, pause_s, tag)
        self.published: dict[str, float] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Producer(self.settings.amqp_url, self.settings.namespace) as producer:
                for first in range(0, self.count, self.chunk):
                    reqs = [IntakeRequest(id=new_id(), tenant="b", sender="news@b.example", created_ms=now_ms(),
                                          to=(f"b{self.tag}{i}@example.com",), subject=f"B {self.tag} {i}",
                                          text="Ordinary mail from B.\n", server=self.server)
                            for i in range(first, min(self.count, first + self.chunk))]
                    producer.publish_requests(reqs)
                    at = time.time()
                    self.published.update((r.id, at) for r in reqs)
                    time.sleep(self.pause_s)
        except BaseException as exc:  # reported by the test
            self.error = exc


def peak_rss_bytes(pid: int) -> int:
    """The process's RSS high-water mark (VmHWM): the peak a 0.1 s sampler could miss."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def accepted_at(peer: LedgerPeer) -> dict[str, float]:
    """The first acceptance of each job id at ``peer``."""
    with peer._lock:
        out: dict[str, float] = {}
        for acc in peer.accepted:
            out.setdefault(acc.job_id, acc.at)
        return out


def from_domains(message: Received) -> set[str]:
    parsed = message_from_bytes(message.content)
    return {addr.rpartition("@")[2].lower() for _name, addr in getaddresses(parsed.get_all("From", []))}


def high_priority(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("mailpipe_limiter_high_priority_total{"):
            outcome = re.search(r'outcome="(\w+)"', line)
            assert outcome is not None
            out[outcome.group(1)] = out.get(outcome.group(1), 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def drained(settings: Settings, pipeline: Pipeline, timeout_s: float) -> None:
    """Nothing in flight (every queue but the dead letters empty, no claim held), twice in a row."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    in_a_row, why = 0, ""
    deadline = time.monotonic() + timeout_s
    try:
        while in_a_row < 2:
            if time.monotonic() > deadline:
                pytest.fail(f"not drained after {timeout_s} s: {why}\n{pipeline.logs()}")
            assert not pipeline.dead(), f"{pipeline.dead()} died\n{pipeline.logs()}"
            why = in_flight(settings, client)
            in_a_row = 0 if why else in_a_row + 1
            time.sleep(0.2)
    finally:
        client.close()


def test_a_hostile_tenant_is_refused_or_rationed_and_b_is_served_on_time(settings: Settings, tmp_path: Path) -> None:
    started = time.monotonic()
    timings: dict[str, float] = {}
    settings = settings.replace(window_s=1.0, send_margin_s=0.2, burst_mails=BURST, max_batch_mails=MAX_BATCH,
                                linger_ms=100, limiter_prefetch=64, max_message_bytes=MAX_MESSAGE,
                                high_priority_share=HIGH_SHARE, reconnect_max_s=1.0)
    topology = Topology(settings.namespace)
    routing = routing_and_domain_tricks()
    separators, refused_by_client = separator_tricks()
    bombs = bomb_tricks()
    tricks = routing + separators + bombs
    by_body = {hashlib.sha256(t.body).hexdigest(): t for t in tricks}
    assert len(by_body) == len(tricks), "every trick's body is its own"

    # The client library refuses every separator trick before anything is published.
    with Producer(settings.amqp_url, settings.namespace) as offline:
        for req in refused_by_client:
            with pytest.raises(InvalidMessage):
                offline.publish_requests([req])

    # A's ordinary mail (it must still go out) and the idempotency and job-id tricks.
    key = "order-42"
    a_legit = [composed_req(subject=f"A legit {i}", server="platform" if i % 2 else None) for i in range(6)]
    honest_id = new_id()
    a_legit.append(raw_req(honest_id, raw_message("From: HR <hr@a.example>", honest_id)))
    a_keyed = composed_req(idempotency_key=key, id=job_id_for("a", key), to=("shared@example.com",), server="platform")
    # B's job id, under another key of A's: ids are per tenant, so both must go out.
    a_forged_id = composed_req(id=job_id_for("b", key), idempotency_key="forged-1", to=("shared@example.com",),
                               server="platform")
    b_keyed = IntakeRequest(id=job_id_for("b", key), tenant="b", sender="news@b.example", created_ms=now_ms(),
                            to=("shared@example.com",), subject="B keyed", text="B's order.\n",
                            idempotency_key=key, server="platform")

    with LedgerPeer() as platform, LedgerPeer() as a_peer, LedgerPeer() as b_peer:
        Path(settings.servers_file).write_text(servers_toml(platform.port, a_peer.port, b_peer.port), encoding="utf-8")
        peers = {"platform": platform, "a-own": a_peer, "b-own": b_peer}
        with MeteredPipeline(settings, tmp_path) as pipeline:
            sampler = RssSampler(pipeline)
            sampler.start()
            conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
            channel = conn.channel()
            try:
                wait_until(lambda: channel.queue_declare(topology.intake, passive=True).method.consumer_count > 0,
                           60, "the producer consuming", pipeline)
                timings["stages up"] = time.monotonic() - started
                baseline = dict(sampler.peak)

                # -- phase 1: every trick, while B publishes 50 mails to its own server --------------
                b_own = Publisher(settings, B_MAILS, server=None, chunk=5, pause_s=0.2, tag="own")
                phase1 = time.monotonic()
                b_own.start()
                channel.confirm_delivery()
                props = pika.BasicProperties(delivery_mode=2, content_type="application/msgpack")
                with Producer(settings.amqp_url, settings.namespace) as a_client:
                    a_client.publish_requests([a_keyed, a_forged_id])
                    for i, trick in enumerate(tricks):
                        if trick.req is not None:
                            a_client.publish_requests([trick.req])
                        else:
                            channel.basic_publish("", topology.intake, trick.body, props, mandatory=True)
                        if i == len(tricks) // 2:
                            a_client.publish_requests(a_legit)
                with Producer(settings.amqp_url, settings.namespace) as b_client:
                    b_client.publish_requests([b_keyed])
                b_keyed_at = time.time()
                b_own.join(60)
                assert b_own.error is None and len(b_own.published) == B_MAILS, b_own.error
                timings["phase 1 published"] = time.monotonic() - phase1

                expected_dead = tricks

                def dead_count() -> int:
                    return int(channel.queue_declare(topology.dead, passive=True).method.message_count)

                wait_until(lambda: dead_count() >= len(expected_dead), 90,
                           f"{len(expected_dead)} dead letters", pipeline)
                timings["tricks dead-lettered"] = time.monotonic() - phase1
                wait_until(lambda: set(b_own.published) <= set(accepted_at(b_peer)), 60,
                           "B's mail at its server", pipeline)
                timings["phase 1 B delivered"] = time.monotonic() - phase1
                legit_ids = {r.id for r in a_legit} | {a_keyed.id}
                wait_until(lambda: legit_ids <= set(accepted_at(platform)) | set(accepted_at(a_peer))
                           and sum(1 for m in platform.messages if job_id_of(m.content) == b_keyed.id) >= 2,
                           60, "A's own mail, and B's keyed job beside A's job of the same id", pipeline)

                # -- phase 2: B's mail queued at the platform's server, then A's "high" campaign ------
                b_platform = Publisher(settings, B_MAILS, server="platform", chunk=B_MAILS, pause_s=0, tag="platform")
                phase2 = time.monotonic()
                b_platform.run()  # in this thread: one confirmed publish
                assert b_platform.error is None, b_platform.error
                wait_until(lambda: bool(set(b_platform.published) & set(accepted_at(platform))), 30,
                           "B's first mail at the platform's server", pipeline)
                campaign = [composed_req(subject=f"Flash sale {i}", to=(f"lead{i}@example.com",), server="platform",
                                         priority="high") for i in range(CAMPAIGN)]
                campaign_at = time.time()
                with Producer(settings.amqp_url, settings.namespace) as a_client:
                    a_client.publish_requests(campaign)
                campaign_ids = {r.id for r in campaign}
                wait_until(lambda: set(b_platform.published) <= set(accepted_at(platform)), 60,
                           "B's mail at the platform's server", pipeline)
                b_done = max(accepted_at(platform)[j] for j in b_platform.published)
                timings["phase 2 B delivered"] = time.monotonic() - phase2
                wait_until(lambda: campaign_ids <= set(accepted_at(platform)), 90, "A's campaign, sent", pipeline)
                timings["phase 2 campaign delivered"] = time.monotonic() - phase2
                drained(settings, pipeline, 60)
                priority = high_priority(pipeline.limiter_port)
                alive = pipeline.dead()
                high_water = {n: peak_rss_bytes(p.pid) for n, p in pipeline.procs.items()}
            finally:
                conn.close()
                sampler.stop_now.set()
                sampler.join()
        exits = dict(pipeline.exits)
        logs = {p.stem: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}
        dead = read_dead(settings.amqp_url, settings.namespace, limit=len(tricks) + 100)

    timings["total"] = time.monotonic() - started

    # -- every trick a dead letter, with its category and a reason naming the field ------------------
    found: dict[str, DeadEntry] = {}
    strays: list[DeadEntry] = []
    for entry in dead:
        trick = by_body.get(hashlib.sha256(entry.body).hexdigest())
        if trick is None:
            strays.append(entry)
        else:
            found[trick.name] = entry
    assert not strays, f"dead letters that are no trick of A's: {[(e.job_ids, e.reason) for e in strays]}"
    wrong = []
    for trick in tricks:
        entry = found.get(trick.name)
        if entry is None:
            wrong.append(f"{trick.name}: not dead-lettered")
            continue
        ok = (entry.category == trick.category and entry.reason.startswith(trick.reason)
              and all(c in entry.reason for c in trick.contains)
              and entry.headers.get("x-mailpipe-stage") == "producer")
        if not ok:
            wrong.append(f"{trick.name}: {entry.category} {entry.reason[:300]!r}")
    assert not wrong, "tricks not refused as expected:\n" + "\n".join(wrong)

    # -- what reached each server ---------------------------------------------------------------------
    a_ids = {r.id for r in a_legit} | {a_keyed.id} | campaign_ids
    b_ids = set(b_own.published) | set(b_platform.published)
    trick_ids = {t.req.id for t in tricks if t.req is not None}
    for name, peer in peers.items():
        for message in peer.messages:
            job = job_id_of(message.content)
            tenant = message.sender.rpartition("@")[2]
            assert job not in trick_ids, f"{name} received trick {job}"
            assert from_domains(message) == {tenant}, f"{name}: From {from_domains(message)} sent as {message.sender}"
            if tenant == "b.example":
                assert name != "a-own" and (job in b_ids or job == b_keyed.id), f"{name}: B's? {job}"
            else:
                assert tenant == "a.example" and name != "b-own", f"{name}: {message.sender} {job}"
                assert job in a_ids or job == a_forged_id.id, f"{name}: A's? {job}"
    assert {job_id_of(m.content) for m in b_peer.messages} == set(b_own.published)
    assert len(b_peer.messages) == B_MAILS, "each of B's mails once"
    # The idempotency key and the job id: B's keyed job went out, from B, beside A's of the same id.
    shared = [m for m in platform.messages if "shared@example.com" in m.recipients]
    assert sorted((job_id_of(m.content), m.sender) for m in shared) == sorted(
        [(a_keyed.id, "hr@a.example"), (a_forged_id.id, "hr@a.example"), (b_keyed.id, "news@b.example")]), shared

    # -- B on time, A's campaign rationed --------------------------------------------------------------
    at_b = accepted_at(b_peer)
    at_platform = accepted_at(platform)
    b_latency = [at_b[j] - t for j, t in b_own.published.items()]
    b_latency += [at_platform[j] - t for j, t in b_platform.published.items()]
    b_latency.append(at_platform[b_keyed.id] - b_keyed_at)
    assert max(b_latency) <= B_BOUND_S, f"B waited {max(b_latency):.1f} s"
    ahead_of_b = sum(1 for j in campaign_ids if at_platform[j] <= b_done)
    # What A may put ahead of B: by its high-priority share (priority.lua), its burst (the grant
    # burst times the share) and the share of the rate for as long as B waited; the rest of its
    # campaign is normal mail, which gets A's fair half of what is left while both wait
    # (gcra.lua's fair queue, equal weights); plus one batch for the timing.
    grant_burst = BURST - settings.window_reserve(RATE_PER_H)
    waited = max(0.0, b_done - campaign_at)
    share_allowance = (max(1, math.floor(grant_burst * HIGH_SHARE))
                       + (HIGH_SHARE + (1 - HIGH_SHARE) / 2) * RATE_PER_H / 3600 * waited + MAX_BATCH)
    assert ahead_of_b <= share_allowance, f"{ahead_of_b} of A's campaign went out before B's last mail"
    high = priority.get("ahead", 0.0) + priority.get("rationed", 0.0)
    assert priority.get("rationed", 0.0) >= 0.8 * high and high >= CAMPAIGN / MAX_BATCH, priority

    # -- no stage died, restarted or crashed; RSS bounded ---------------------------------------------
    assert alive == [], alive
    assert all(codes == [0] for codes in exits.values()) and len(exits) == 4, exits
    problems = {name: [line for line in text.splitlines() if any(p in line for p in LOG_PROBLEMS)]
                for name, text in logs.items()}
    assert not any(problems.values()), problems
    assert sampler.samples > 50 and set(sampler.peak) == set(exits), sampler.peak
    peaks = {n: max(b, high_water.get(n, 0)) for n, b in sampler.peak.items()}
    over = {n: b for n, b in peaks.items() if b > RSS_BOUND}
    print("\n" + json.dumps({
        "tricks": len(tricks), "dead_letters": len(found),
        "b_latency_max_s": round(max(b_latency), 2), "campaign_before_b_last": ahead_of_b,
        "allowance": round(share_allowance, 1), "high_priority_batches": priority,
        "rss_peak_mb": {n: round(b / 2**20, 1) for n, b in peaks.items()},
        "rss_baseline_mb": {n: round(b / 2**20, 1) for n, b in baseline.items()},
        "timings_s": {k: round(v, 1) for k, v in timings.items()}}, indent=1))
    assert not over, f"RSS over {RSS_BOUND / 2**20:.0f} MB: {over}"


# -- every separator in a raw From display name, without the pipeline ------------------------------

@pytest.mark.parametrize("char", [c for c in SEPARATORS if c not in "\r\n"])  # those end the line
def test_a_separator_in_a_raw_from_display_name_is_refused(char: str) -> None:
    config = parse_config({"servers": {"platform": {"address": "[127.0.0.1]:25", "platform": True}},
                           "tenants": {"a": {"domains": ["a.example"]}}}, "test", {})
    tenant = config.tenant("a")
    job = new_id()
    request = raw_req(job, raw_message(f'From: "HR{char}Team" <hr@a.example>', job))
    with pytest.raises(InvalidMessage, match=r"^message\.From: contains U\+"):
        check_domains(request, tenant, config.route(tenant, None))
