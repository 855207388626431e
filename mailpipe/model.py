"""What travels between stages: intake requests, jobs, batches and events.

The wire form of each is in ``mailpipe/codec.py`` and documented in ``docs/wire-format.md``.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum

SCHEMA_VERSION = 1
# "high" is for transactional mail (a password reset): it overtakes "normal" mail of any volume.
PRIORITIES = ("high", "normal")


def new_id() -> str:
    return uuid.uuid4().hex


_IDEMPOTENCY = uuid.UUID("5b0f6f0e-6d61-696c-7069-706500000001")


def job_id_for(tenant: str, idempotency_key: str | None) -> str:
    """A job's id: random, or derived from the idempotency key, so a retrying upstream that
    publishes the same key twice gets the same job id back, and every stage can dedupe on it."""
    if idempotency_key is None:
        return new_id()
    return uuid.uuid5(_IDEMPOTENCY, f"{tenant}\0{idempotency_key}").hex


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class IntakeRequest:
    """What an upstream service publishes: a mail to compose, or a ready RFC 5322 message."""

    id: str
    tenant: str
    sender: str
    created_ms: int
    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    attachments: tuple[Attachment, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)
    server: str | None = None
    idempotency_key: str | None = None
    # A raw request carries its own message and envelope recipients instead of the fields above.
    message: bytes | None = field(default=None, repr=False)
    recipients: tuple[str, ...] = ()
    send_at_ms: int | None = None  # not before this time
    priority: str = "normal"
    # Bulk mail (a newsletter, a campaign): it carries a one-click unsubscribe (RFC 8058) for
    # its one recipient, and pauses with its tenant's reputation (mailpipe/reputation.py).
    bulk: bool = False

    @property
    def is_raw(self) -> bool:
        return self.message is not None


@dataclass(frozen=True)
class Job:
    """One rendered mail, ready to send: the envelope and the exact bytes to transmit."""

    id: str
    tenant: str
    server: str
    sender: str
    recipients: tuple[str, ...]
    message: bytes = field(repr=False)
    created_ms: int = 0
    enqueued_ms: int = 0
    attempt: int = 0
    idempotency_key: str | None = None
    findings: tuple[str, ...] = ()  # deliverability warnings from the intake's lint
    send_at_ms: int | None = None
    priority: str = "normal"

    @property
    def size(self) -> int:
        return len(self.message)


@dataclass(frozen=True)
class Batch:
    """Jobs for one SMTP server. ``jobs`` holds each job's encoded bytes, forwarded untouched.

    ``grant_id``, ``granted_ms`` and ``deadline_ms`` are stamped by the limiter when the batch
    is released. A give-back (mail the sender did not send) carries ``refund``: how many of its
    mails return their tokens to the grant of batch ``refund_of``, ``refund_tenants`` of them
    per tenant.
    """

    id: str
    server: str
    jobs: tuple[bytes, ...] = field(repr=False)
    mails: int
    bytes: int
    created_ms: int
    grant_id: str | None = None
    granted_ms: int | None = None
    deadline_ms: int | None = None
    refund: int = 0
    tenants: dict[str, int] = field(default_factory=dict)
    priority: str = "normal"
    refund_of: str | None = None
    refund_tenants: dict[str, int] = field(default_factory=dict)


def derived_id(batch_id: str, what: str) -> str:
    """A stable id made from another (a part of a batch, a grant, a give-back): the same on a
    redelivery, so whatever it names is made once."""
    return hashlib.sha256(f"{batch_id}:{what}".encode()).hexdigest()[:32]


class Outcome(StrEnum):
    """What happened to a recipient's mail, as events and metrics name it."""

    SENT = "sent"
    DEFERRED = "deferred"  # refused for now: retried (mailpipe/retry.py)
    FAILED = "failed"  # refused for good: a dead letter
    EXPIRED = "expired"  # deferred past its maximum age: a dead letter
    # A server's, not a mail's (mailpipe/pushback.py): it refuses us for good for now (a wrong
    # password, relaying denied) and its mail waits; and it takes mail again.
    PAUSED = "paused"
    RESUMED = "resumed"


OUTCOMES = tuple(Outcome)


class Category(StrEnum):
    """Why a stage dead-lettered a message (``x-mailpipe-category``), besides an SMTP reply's
    category (sender/replies.py) for mail a server refused for good."""

    INVALID = "invalid"  # does not decode or validate
    CONFIG = "config"  # names a server or tenant the servers file does not have
    ROUTING = "routing"  # names a server its tenant may not use
    SUPPRESSED = "suppressed"  # to a recipient that bounced before
    EXPIRED = "expired"  # deferred past retry_max_age_s
    POISON = "poison"  # crashed the stage on its last delivery


@dataclass(frozen=True)
class Event:
    """What happened to (some recipients of) a mail; published to the events exchange."""

    job_id: str
    tenant: str
    server: str
    outcome: str
    recipients: tuple[str, ...]
    attempt: int
    created_ms: int
    at_ms: int
    code: int = 0
    text: str = ""
    category: str = ""
    advice: str = ""
    batch_id: str = ""
    findings: tuple[str, ...] = ()
