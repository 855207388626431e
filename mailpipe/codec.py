"""msgpack encoding of the model, with a schema version and strict, bounded decoding.

Decoding untrusted bytes never trusts a length: msgpack's own limits cap every string,
binary, array and map, and each field is checked for type before it is used. Anything
wrong raises ``InvalidMessage`` naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from mailpipe.errors import InvalidMessage
from mailpipe.model import OUTCOMES, PRIORITIES, SCHEMA_VERSION, Attachment, Batch, Event, IntakeRequest, Job

T = TypeVar("T")

MAX_STR = 64 * 1024  # addresses, headers, ids; text and HTML parts have MAX_TEXT
MAX_TEXT = 10 * 1024 * 1024
MAX_ARRAY = 10_000
MAX_MAP = 1_000


def _pack(kind: str, fields: dict[str, Any]) -> bytes:
    fields = {"v": SCHEMA_VERSION, "kind": kind, **fields}
    return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: bytes, kind: str, max_bin: int) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidMessage(f"{kind}: expected bytes, got {type(data).__name__}")
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_str_len=MAX_TEXT, max_bin_len=max_bin, max_array_len=MAX_ARRAY,
            max_map_len=MAX_MAP, max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        raise InvalidMessage(f"{kind}: not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise InvalidMessage(f"{kind}: expected a map at the top level, got {type(obj).__name__}")
    version = obj.get("v")
    # type() and not ==: True and 1.0 compare equal to 1 but are not a schema version.
    if type(version) is not int or version != SCHEMA_VERSION:
        raise InvalidMessage(f"{kind}.v: unsupported schema version {version!r} (expected {SCHEMA_VERSION})")
    if obj.get("kind") != kind:
        raise InvalidMessage(f"{kind}.kind: expected {kind!r}, got {obj.get('kind')!r}")
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


def _priority(f: _Fields) -> str:
    value = f.text("priority", required=False) or "normal"
    if value not in PRIORITIES:
        raise InvalidMessage(f"{f.kind}.priority: {value!r} is not one of {', '.join(PRIORITIES)}")
    return str(value)


# -- intake -----------------------------------------------------------------------------------

def encode_intake(req: IntakeRequest) -> bytes:
    return _pack("intake", {
        "id": req.id, "tenant": req.tenant, "sender": req.sender, "created_ms": req.created_ms,
        "to": list(req.to), "cc": list(req.cc), "bcc": list(req.bcc), "subject": req.subject,
        "text": req.text, "html": req.html,
        "attachments": [[a.filename, a.content_type, a.data] for a in req.attachments],
        "headers": req.headers, "server": req.server, "idempotency_key": req.idempotency_key,
        "message": req.message, "recipients": list(req.recipients), "send_at_ms": req.send_at_ms,
        "priority": req.priority,
    })


def decode_intake(data: bytes, max_message_bytes: int) -> IntakeRequest:
    if len(data) > max_message_bytes + 64 * 1024:
        raise InvalidMessage(f"intake: {len(data)} bytes, over the {max_message_bytes}-byte limit")
    f = _Fields("intake", _unpack(data, "intake", max_bin=max_message_bytes))
    raw_attachments = f._get("attachments", lambda v: isinstance(v, list), "an array", [], False)
    attachments = []
    for i, item in enumerate(raw_attachments):
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                and isinstance(item[1], str) and isinstance(item[2], bytes)):
            raise InvalidMessage(f"intake.attachments[{i}]: expected [filename, content_type, binary]")
        attachments.append(Attachment(item[0], item[1], item[2]))
    return IntakeRequest(
        id=f.text("id", max_len=64), tenant=f.text("tenant", max_len=255), sender=f.text("sender"),
        created_ms=f.integer("created_ms"), to=f.texts("to"), cc=f.texts("cc"), bcc=f.texts("bcc"),
        subject=f.text("subject", required=False), text=f.text("text", required=False, max_len=MAX_TEXT),
        html=f.text("html", required=False, max_len=MAX_TEXT), attachments=tuple(attachments),
        headers=f.text_map("headers"), server=f.text("server", required=False, max_len=255),
        idempotency_key=f.text("idempotency_key", required=False, max_len=255),
        message=f.binary("message", required=False), recipients=f.texts("recipients"),
        send_at_ms=f.integer("send_at_ms", required=False, default=None), priority=_priority(f),
    )


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
    f = _Fields("job", _unpack(data, "job", max_bin=max_message_bytes))
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
    f = _Fields("event", _unpack(data, "event", max_bin=1024 * 1024))
    event = Event(
        job_id=f.text("job_id"), tenant=f.text("tenant"), server=f.text("server"),
        outcome=f.text("outcome"), recipients=f.texts("recipients"), attempt=f.integer("attempt"),
        created_ms=f.integer("created_ms"), at_ms=f.integer("at_ms"), code=f.integer("code", required=False),
        text=f.text("text", required=False) or "", category=f.text("category", required=False) or "",
        advice=f.text("advice", required=False) or "", batch_id=f.text("batch_id", required=False) or "",
        findings=f.texts("findings"),
    )
    if event.outcome not in OUTCOMES:
        raise InvalidMessage(f"event.outcome: {event.outcome!r} is not one of {', '.join(OUTCOMES)}")
    return event

