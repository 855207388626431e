"""msgpack encoding of the model, with a schema version and strict, bounded decoding.

Decoding untrusted bytes never trusts a length: msgpack's own limits cap every string,
binary, array and map, and each field is checked for type before it is used. Anything
wrong raises ``InvalidMessage`` naming the field.

Those limits are per container, and 300 KB of small maps would still decode to about 20 MB
of Python objects. So one message as a whole is bounded too, while it decodes: at most
``MAX_OBJECTS`` objects, and the decoded objects at most ``MAX_DECODED_OVERHEAD`` bytes larger
than the message. msgpack calls a hook of ours as each array and map is complete; the hook
counts and refuses as soon as a bound is passed, so a bomb is refused after building at most
the bound's worth of objects, never the whole of it. A message too short to pass either bound
(``COUNT_FROM_BYTES``) decodes without hooks. Nesting is bounded by msgpack itself (1,024
levels, refused before anything is built), and no reason ever shows a container's repr.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgpack

from mailpipe.errors import InvalidMessage
from mailpipe.model import OUTCOMES, PRIORITIES, SCHEMA_VERSION, Attachment, Batch, Event, IntakeRequest, Job

T = TypeVar("T")

MAX_STR = 64 * 1024  # addresses, headers, ids; text and HTML parts have MAX_TEXT
MAX_TEXT = 10 * 1024 * 1024
MAX_ARRAY = 10_000
MAX_MAP = 1_000
# Bounds on one message as a whole. A real intake holds a few dozen objects (a few thousand
# with 1,000 headers), 3 levels deep (map > attachments > [filename, type, data]).
MAX_OBJECTS = 100_000
MAX_DECODED_OVERHEAD = 16 * 1024 * 1024
# What a decoded object costs beyond its own bytes, about (CPython 3.11, 64 bits: an int 28 to
# 36 bytes, a str header 49 to 80, a bytes header 33, and its slot in its container, 8).
_OBJECT_COST = 64
# No msgpack byte decodes to more than this: an empty map (0x80) is a 64-byte dict in an
# 8-byte slot; an empty array 56 + 8; everything else less per byte.
_MAX_COST_PER_BYTE = 72
# Below this many bytes a message cannot pass either bound (at most one object per byte), so
# msgpack runs without hooks: every real intake without large attachments decodes at full speed.
COUNT_FROM_BYTES = min(MAX_OBJECTS, MAX_DECODED_OVERHEAD // _MAX_COST_PER_BYTE)


class _TooLarge(Exception):
    """Raised from the hooks to stop msgpack at once; becomes InvalidMessage."""


class _Budget:
    """Counts what msgpack decodes, container by container (msgpack calls a hook as each array
    and map is complete), and stops it as soon as a bound is passed.

    Depth is msgpack's own bound: it refuses containers nested more than 1,024 deep (StackError)
    before building them; no decoder here ever looks into a container of an unknown key.
    """

    __slots__ = ("objects", "overhead")

    def __init__(self) -> None:
        self.objects = 1  # the top-level object; every other one is an item of a container
        self.overhead = 0

    def _count(self, container: Any, n: int) -> None:
        self.objects += n
        self.overhead += sys.getsizeof(container) + n * _OBJECT_COST
        if self.objects > MAX_OBJECTS:
            raise _TooLarge(f"more than {MAX_OBJECTS} objects (MAX_OBJECTS)")
        if self.overhead > MAX_DECODED_OVERHEAD:
            raise _TooLarge(f"decodes to more than {MAX_DECODED_OVERHEAD} bytes beyond its own "
                            "(MAX_DECODED_OVERHEAD)")

    def list_hook(self, items: list[Any]) -> list[Any]:
        self._count(items, len(items))
        return items

    def map_hook(self, obj: dict[Any, Any]) -> dict[Any, Any]:
        self._count(obj, 2 * len(obj))
        return obj


def _describe(value: Any) -> str:
    """A value of untrusted input for a reason: short, and never a repr of a deep container."""
    if isinstance(value, str | int | float | bool | bytes) or value is None:
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return f"a {type(value).__name__}"


def _pack(kind: str, fields: dict[str, Any]) -> bytes:
    fields = {"v": SCHEMA_VERSION, "kind": kind, **fields}
    return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: bytes, kind: str, max_bin: int) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidMessage(f"{kind}: expected bytes, got {type(data).__name__}")
    hooks: dict[str, Any] = {}
    if len(data) > COUNT_FROM_BYTES:
        budget = _Budget()
        hooks = {"list_hook": budget.list_hook, "object_hook": budget.map_hook}
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_str_len=MAX_TEXT, max_bin_len=max_bin, max_array_len=MAX_ARRAY,
            max_map_len=MAX_MAP, max_ext_len=0, **hooks,
        )
    except _TooLarge as exc:
        raise InvalidMessage(f"{kind}: too large once decoded: {exc}") from None
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        raise InvalidMessage(f"{kind}: not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise InvalidMessage(f"{kind}: expected a map at the top level, got {type(obj).__name__}")
    version = obj.get("v")
    # type() and not ==: True and 1.0 compare equal to 1 but are not a schema version.
    if type(version) is not int or version != SCHEMA_VERSION:
        raise InvalidMessage(f"{kind}.v: unsupported schema version {_describe(version)} "
                             f"(expected {SCHEMA_VERSION})")
    if obj.get("kind") != kind:
        raise InvalidMessage(f"{kind}.kind: expected {kind!r}, got {_describe(obj.get('kind'))}")
    return obj


class _Fields:
    """Typed access to a decoded map: each getter names the field it refuses."""

    def __init__(self, kind: str, obj: dict[str, Any]) -> None:
        self.kind = kind
        self.obj = obj

    def _get(self, name: str, check: Callable[[Any], bool], what: str, default: Any, required: bool) -> Any:
        if name not in self.obj or self.obj[name] is None:
            if required:
                raise InvalidMessage(f"{self.kind}.{name}: missing")
            return default
        value = self.obj[name]
        if not check(value):
            raise InvalidMessage(f"{self.kind}.{name}: expected {what}, got {type(value).__name__}")
        return value

    def text(self, name: str, *, required: bool = True, max_len: int = MAX_STR) -> Any:
        value = self._get(name, lambda v: isinstance(v, str), "a string", None, required)
        if value is not None and len(value) > max_len:
            raise InvalidMessage(f"{self.kind}.{name}: longer than {max_len} characters")
        return value

    def integer(self, name: str, *, required: bool = True, default: int | None = 0) -> Any:
        value = self._get(name, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer",
                          default, required)
        if value is not None and value < 0:
            raise InvalidMessage(f"{self.kind}.{name}: must not be negative")
        return value

    def binary(self, name: str, *, required: bool = True) -> Any:
        return self._get(name, lambda v: isinstance(v, bytes), "binary", None, required)

    def texts(self, name: str, *, required: bool = False) -> tuple[str, ...]:
        value = self._get(name, lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                          "an array of strings", [], required)
        if any(len(x) > MAX_STR for x in value):
            raise InvalidMessage(f"{self.kind}.{name}: an entry is longer than {MAX_STR} characters")
        return tuple(value)

    def binaries(self, name: str) -> tuple[bytes, ...]:
        value = self._get(name, lambda v: isinstance(v, list) and all(isinstance(x, bytes) for x in v),
                          "an array of binaries", [], True)
        return tuple(value)

    def text_map(self, name: str) -> dict[str, str]:
        # Keys too: msgpack's strict_map_key lets binary keys through, not only strings.
        value = self._get(name, lambda v: isinstance(v, dict) and all(
            isinstance(k, str) and isinstance(x, str) for k, x in v.items()),
            "a map of strings to strings", {}, False)
        if any(len(k) > MAX_STR or len(x) > MAX_STR for k, x in value.items()):
            raise InvalidMessage(f"{self.kind}.{name}: an entry is longer than {MAX_STR} characters")
        return dict(value)

    def count_map(self, name: str) -> dict[str, int]:
        value = self._get(name, lambda v: isinstance(v, dict) and all(
            isinstance(k, str) and isinstance(x, int) and not isinstance(x, bool) and x >= 0
            for k, x in v.items()),
            "a map of strings to counts", {}, False)
        return dict(value)


# -- fast paths ---------------------------------------------------------------------------------
# A well-formed message is checked field by field in a few lines of plain tests instead of
# ``_Fields``' per-field calls (issue 24: decode_job cost 11 µs against 2 for msgpack's own
# decoding). They accept only what ``_Fields`` accepts (tests/unit/test_codec_fast.py checks
# them as twins on random mutations); anything else goes the checked way, which names the field.

def _short(value: Any, max_len: int) -> bool:
    return type(value) is str and len(value) <= max_len


def _optional_short(value: Any, max_len: int) -> bool:
    return value is None or (type(value) is str and len(value) <= max_len)


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _short_strs(value: Any) -> bool:
    """None (absent) or an array of strings of at most MAX_STR characters."""
    return value is None or (type(value) is list and all(type(x) is str and len(x) <= MAX_STR for x in value))


def _priority(f: _Fields) -> str:
    value = f.text("priority", required=False) or "normal"
    if value not in PRIORITIES:
        raise InvalidMessage(f"{f.kind}.priority: {_describe(value)} is not one of {', '.join(PRIORITIES)}")
    return str(value)


# -- intake -----------------------------------------------------------------------------------

# created_ms is milliseconds since the Unix epoch, the publisher's: the Date header, and one
# half of what names a mail (with its id: sender/claims.py). Below 10^12 (2001-09-09) no time
# of today is in milliseconds: a publisher writing seconds, or 0, would date its mail in 1970.
# From 10^14 (the year 5138) it is microseconds or nanoseconds. Either is refused here, where
# the publisher hears of it, rather than guessed at: a time filled in when the request is read
# would differ between two readings of one request (a producer that died after its confirm
# reads it again), and the two copies would be two mails.
CREATED_MS_MIN = 10**12
CREATED_MS_MAX = 10**14


def _created_ms(f: _Fields) -> int:
    value: int = f.integer("created_ms")
    if CREATED_MS_MIN <= value < CREATED_MS_MAX:
        return value
    if value < CREATED_MS_MIN:
        read = f"it reads as {datetime.fromtimestamp(value / 1000, UTC):%Y-%m-%d}; seconds? multiply by 1000"
    else:
        read = "after the year 5000: microseconds? divide by 1000"
    raise InvalidMessage(f"{f.kind}.created_ms: {value} is not milliseconds since the Unix epoch ({read}); "
                         f"expected {CREATED_MS_MIN} to {CREATED_MS_MAX - 1} (2001-09-09 to 5138-11-16)")


def encode_intake(req: IntakeRequest) -> bytes:
    return _pack("intake", {
        "id": req.id, "tenant": req.tenant, "sender": req.sender, "created_ms": req.created_ms,
        "to": list(req.to), "cc": list(req.cc), "bcc": list(req.bcc), "subject": req.subject,
        "text": req.text, "html": req.html,
        "attachments": [[a.filename, a.content_type, a.data] for a in req.attachments],
        "headers": req.headers, "server": req.server, "idempotency_key": req.idempotency_key,
        "message": req.message, "recipients": list(req.recipients), "send_at_ms": req.send_at_ms,
        "priority": req.priority, "bulk": req.bulk,
    })


def _bulk(f: _Fields) -> bool:
    value = f.obj.get("bulk")
    if value is not None and not isinstance(value, bool):
        raise InvalidMessage(f"intake.bulk: expected a boolean, got {type(value).__name__}")
    return bool(value)


def decode_intake(data: bytes, max_message_bytes: int) -> IntakeRequest:
    if len(data) > max_message_bytes + 64 * 1024:
        raise InvalidMessage(f"intake: {len(data)} bytes, over the {max_message_bytes}-byte limit")
    obj = _unpack(data, "intake", max_bin=max_message_bytes)
    return _intake_fast(obj) or _intake_checked(_Fields("intake", obj))


def _intake_fast(obj: dict[str, Any]) -> IntakeRequest | None:
    g = obj.get
    created, to, cc, bcc, recipients = g("created_ms"), g("to"), g("cc"), g("bcc"), g("recipients")
    headers, message, send_at, priority, bulk = g("headers"), g("message"), g("send_at_ms"), g("priority"), g("bulk")
    if not (_short(g("id"), 64) and _short(g("tenant"), 255) and _short(g("sender"), MAX_STR)
            and type(created) is int and CREATED_MS_MIN <= created < CREATED_MS_MAX
            and _short_strs(to) and _short_strs(cc) and _short_strs(bcc) and _short_strs(recipients)
            and _optional_short(g("subject"), MAX_STR) and _optional_short(g("text"), MAX_TEXT)
            and _optional_short(g("html"), MAX_TEXT) and g("attachments") in (None, [])
            and (headers is None or (type(headers) is dict and all(
                _short(k, MAX_STR) and _short(v, MAX_STR) for k, v in headers.items())))
            and _optional_short(g("server"), 255) and _optional_short(g("idempotency_key"), 255)
            and (message is None or type(message) is bytes) and (send_at is None or _count(send_at))
            and (priority is None or (type(priority) is str and priority in PRIORITIES))
            and (bulk is None or type(bulk) is bool)):
        return None
    return IntakeRequest(
        id=obj["id"], tenant=obj["tenant"], sender=obj["sender"], created_ms=created,
        to=tuple(to or ()), cc=tuple(cc or ()), bcc=tuple(bcc or ()), subject=g("subject"), text=g("text"),
        html=g("html"), headers=dict(headers or {}), server=g("server"), idempotency_key=g("idempotency_key"),
        message=message, recipients=tuple(recipients or ()), send_at_ms=send_at, priority=priority or "normal",
        bulk=bool(bulk),
    )


def _intake_checked(f: _Fields) -> IntakeRequest:
    raw_attachments = f._get("attachments", lambda v: isinstance(v, list), "an array", [], False)
    attachments = []
    for i, item in enumerate(raw_attachments):
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                and isinstance(item[1], str) and isinstance(item[2], bytes)):
            raise InvalidMessage(f"intake.attachments[{i}]: expected [filename, content_type, binary]")
        attachments.append(Attachment(item[0], item[1], item[2]))
    return IntakeRequest(
        id=f.text("id", max_len=64), tenant=f.text("tenant", max_len=255), sender=f.text("sender"),
        created_ms=_created_ms(f), to=f.texts("to"), cc=f.texts("cc"), bcc=f.texts("bcc"),
        subject=f.text("subject", required=False), text=f.text("text", required=False, max_len=MAX_TEXT),
        html=f.text("html", required=False, max_len=MAX_TEXT), attachments=tuple(attachments),
        headers=f.text_map("headers"), server=f.text("server", required=False, max_len=255),
        idempotency_key=f.text("idempotency_key", required=False, max_len=255),
        message=f.binary("message", required=False), recipients=f.texts("recipients"),
        send_at_ms=f.integer("send_at_ms", required=False, default=None), priority=_priority(f),
        bulk=_bulk(f),
    )


# -- bundles --------------------------------------------------------------------------------------
# Many messages of one kind in one AMQP message (issue 24: RabbitMQ's cost is per message, and a
# mail cost four of them): {"v": 1, "kind": "<kind>s", "items": [<an encoded <kind>>, ...]}.
# Each item is a whole message of its own, decoded (and refused, dead-lettered) on its own.

BUNDLES = {"intake": "intakes", "job": "jobs", "event": "events"}


def encode_bundle(kind: str, items: Sequence[bytes]) -> bytes:
    """A bundle of ``items``, each an encoded ``kind`` ("intake", "job", "event")."""
    return _pack(BUNDLES[kind], {"items": list(items)})


def kind_of(data: bytes) -> str | None:
    """The ``kind`` of a message, read without decoding the rest of it (None when it has none or
    is not a msgpack map: the decoder then says what is wrong)."""
    try:
        # From a stream (read 4 KiB at a time): an 80 MB message is not copied to be peeked at.
        unpacker = msgpack.Unpacker(io.BytesIO(data), read_size=4096, raw=False, max_str_len=MAX_STR,
                                    max_bin_len=len(data), max_array_len=MAX_ARRAY, max_map_len=MAX_MAP,
                                    max_ext_len=0)
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == "kind":
                value = unpacker.unpack()
                return value if isinstance(value, str) else None
            unpacker.skip()
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, msgpack.OutOfData,
            TypeError):
        return None
    return None


def items_of(data: bytes, kind: str, max_item_bytes: int = 2**31 - 1) -> list[bytes]:
    """The ``kind`` messages ``data`` holds: itself when it is one, else the items of its bundle.
    Raises ``InvalidMessage`` when it is neither, naming what is wrong."""
    if kind_of(data) == kind:
        return [data]
    bundle = BUNDLES[kind]
    f = _Fields(bundle, _unpack(data, bundle, max_bin=max_item_bytes))
    items = f.binaries("items")
    if not items:
        raise InvalidMessage(f"{bundle}.items: empty")
    return list(items)


# Delivery events travel bundled (the sender: one message per outcome and tenant of a batch) or
# alone (a server's paused/resumed, the producer's failed). Subscribers read one record per mail
# either way: decode_events. The bound keeps a bundle under MAX_ARRAY items.
EVENTS_PER_BUNDLE = 1_000
EVENT_MAX_BIN = 1024 * 1024


def decode_events(data: bytes) -> list[Event]:
    """The delivery events of one message of the events exchange: an event (kind "event") or a
    bundle of them (kind "events"), in order. Raises ``InvalidMessage`` naming what is wrong, and
    which item (feedback events, kind "feedback", are read by mailpipe.feedback instead)."""
    items = items_of(data, "event", EVENT_MAX_BIN)
    if len(items) == 1 and items[0] is data:
        return [decode_event(data)]
    events = []
    for index, item in enumerate(items):
        try:
            events.append(decode_event(item))
        except InvalidMessage as exc:
            raise InvalidMessage(f"events.items[{index}]: {exc}") from None
    return events


# -- job --------------------------------------------------------------------------------------

def encode_job(job: Job) -> bytes:
    return _pack("job", {
        "id": job.id, "tenant": job.tenant, "server": job.server, "sender": job.sender,
        "recipients": list(job.recipients), "message": job.message, "created_ms": job.created_ms,
        "enqueued_ms": job.enqueued_ms, "attempt": job.attempt,
        "idempotency_key": job.idempotency_key, "findings": list(job.findings),
        "send_at_ms": job.send_at_ms, "priority": job.priority,
    })


def decode_job(data: bytes, max_message_bytes: int = 2**31 - 1) -> Job:
    obj = _unpack(data, "job", max_bin=max_message_bytes)
    return _job_fast(obj) or _job_checked(_Fields("job", obj))


def _job_fast(obj: dict[str, Any]) -> Job | None:
    g = obj.get
    recipients, message, created, enqueued, attempt = (g("recipients"), g("message"), g("created_ms"),
                                                       g("enqueued_ms"), g("attempt"))
    findings, send_at, priority = g("findings"), g("send_at_ms"), g("priority")
    if not (_short(g("id"), 64) and _short(g("tenant"), 255) and _short(g("server"), 255)
            and _short(g("sender"), MAX_STR) and recipients and _short_strs(recipients)
            and type(message) is bytes and _count(created) and _count(enqueued) and _count(attempt)
            and _optional_short(g("idempotency_key"), 255) and _short_strs(findings)
            and (send_at is None or _count(send_at))
            and (priority is None or (type(priority) is str and priority in PRIORITIES))):
        return None
    return Job(
        id=obj["id"], tenant=obj["tenant"], server=obj["server"], sender=obj["sender"],
        recipients=tuple(recipients), message=message, created_ms=obj["created_ms"],
        enqueued_ms=obj["enqueued_ms"], attempt=obj["attempt"], idempotency_key=g("idempotency_key"),
        findings=tuple(findings or ()), send_at_ms=send_at, priority=priority or "normal",
    )


def _job_checked(f: _Fields) -> Job:
    recipients = f.texts("recipients", required=True)
    if not recipients:
        raise InvalidMessage("job.recipients: empty")
    return Job(
        id=f.text("id", max_len=64), tenant=f.text("tenant", max_len=255),
        server=f.text("server", max_len=255), sender=f.text("sender"), recipients=recipients,
        message=f.binary("message"), created_ms=f.integer("created_ms"), enqueued_ms=f.integer("enqueued_ms"),
        attempt=f.integer("attempt"), idempotency_key=f.text("idempotency_key", required=False, max_len=255),
        findings=f.texts("findings"), send_at_ms=f.integer("send_at_ms", required=False, default=None),
        priority=_priority(f),
    )


# -- batch ------------------------------------------------------------------------------------

def encode_batch(batch: Batch) -> bytes:
    return _pack("batch", {
        "id": batch.id, "server": batch.server, "jobs": list(batch.jobs), "mails": batch.mails,
        "bytes": batch.bytes, "created_ms": batch.created_ms, "grant_id": batch.grant_id,
        "granted_ms": batch.granted_ms, "deadline_ms": batch.deadline_ms, "refund": batch.refund,
        "tenants": batch.tenants, "priority": batch.priority, "refund_of": batch.refund_of,
        "refund_tenants": batch.refund_tenants,
    })


def decode_batch(data: bytes) -> Batch:
    f = _Fields("batch", _unpack(data, "batch", max_bin=2**31 - 1))
    jobs = f.binaries("jobs")
    mails = f.integer("mails")
    if mails != len(jobs):
        raise InvalidMessage(f"batch.mails: says {mails}, holds {len(jobs)} jobs")
    return Batch(
        id=f.text("id", max_len=64), server=f.text("server", max_len=255), jobs=jobs, mails=mails,
        bytes=f.integer("bytes"), created_ms=f.integer("created_ms"),
        grant_id=f.text("grant_id", required=False, max_len=64),
        granted_ms=f.integer("granted_ms", required=False, default=None),
        deadline_ms=f.integer("deadline_ms", required=False, default=None),
        refund=f.integer("refund", required=False), tenants=f.count_map("tenants"), priority=_priority(f),
        refund_of=f.text("refund_of", required=False, max_len=64),
        refund_tenants=f.count_map("refund_tenants"),
    )


# -- event ------------------------------------------------------------------------------------

def encode_event(event: Event) -> bytes:
    return _pack("event", {
        "job_id": event.job_id, "tenant": event.tenant, "server": event.server,
        "outcome": event.outcome, "recipients": list(event.recipients), "attempt": event.attempt,
        "created_ms": event.created_ms, "at_ms": event.at_ms, "code": event.code,
        "text": event.text, "category": event.category, "advice": event.advice,
        "batch_id": event.batch_id, "findings": list(event.findings),
    })


def decode_event(data: bytes) -> Event:
    f = _Fields("event", _unpack(data, "event", max_bin=EVENT_MAX_BIN))
    event = Event(
        job_id=f.text("job_id"), tenant=f.text("tenant"), server=f.text("server"),
        outcome=f.text("outcome"), recipients=f.texts("recipients"), attempt=f.integer("attempt"),
        created_ms=f.integer("created_ms"), at_ms=f.integer("at_ms"), code=f.integer("code", required=False),
        text=f.text("text", required=False) or "", category=f.text("category", required=False) or "",
        advice=f.text("advice", required=False) or "", batch_id=f.text("batch_id", required=False) or "",
        findings=f.texts("findings"),
    )
    if event.outcome not in OUTCOMES:
        raise InvalidMessage(f"event.outcome: {_describe(event.outcome)} is not one of {', '.join(OUTCOMES)}")
    return event

