"""``mailpipe dead list|show ID|replay``: look at failed mail and send it again.

A dead letter keeps the original bytes and says why it is there: our stages set
``x-mailpipe-reason``/``-stage``/``-category`` (the sender adds the server's reply, the tenant
and the job id); RabbitMQ's own dead-lettering (the delivery limit) sets
``x-first-death-queue``/``-reason``. What the headers do not say (the tenant and job id of an
intake request or a batch the producer, packer or limiter refused) is read from the bytes.

Every command reads the queue with ``basic_get`` and no ack, so listing changes nothing (closing
the channel returns the messages). Replay publishes the matching bytes back to the queue they
came from, confirmed, and only then acks those dead letters; what does not match stays.

A dead letter's ID is its job id; a dead letter that holds several jobs (a batch) or none that
decodes (garbage on the intake queue) has the first 16 hex digits of its bytes' SHA-256.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from mailpipe.amqp import Broker, Outgoing
from mailpipe.codec import decode_batch, decode_intake, decode_job
from mailpipe.errors import InvalidMessage
from mailpipe.settings import Settings
from mailpipe.topology import DEAD_REASON, DEAD_STAGE, Topology

REPLAY_CHUNK = 500  # dead letters per confirmed publish while replaying


@dataclass(frozen=True)
class Contents:
    """What the bytes of a dead letter are, as far as they decode."""

    kind: str  # "job", "intake", "batch" or "undecodable"
    job_ids: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    server: str = ""
    sender: str = ""
    recipients: tuple[str, ...] = ()
    attempt: int | None = None
    size: int = 0
    error: str = ""


def contents(body: bytes) -> Contents:
    try:
        job = decode_job(body)
        return Contents("job", (job.id,), (job.tenant,), job.server, job.sender, job.recipients,
                        job.attempt, job.size)
    except InvalidMessage as exc:
        error = exc.reason
    try:
        req = decode_intake(body, 2**31 - 1)
        return Contents("intake", (req.id,), (req.tenant,), req.server or "", req.sender,
                        (*req.to, *req.cc, *req.bcc, *req.recipients), None, len(body))
    except InvalidMessage:
        pass
    try:
        batch = decode_batch(body)
    except InvalidMessage:
        return Contents("undecodable", size=len(body), error=error)
    jobs = []
    for raw in batch.jobs:
        try:
            jobs.append(decode_job(raw))
        except InvalidMessage:
            continue
    return Contents("batch", tuple(j.id for j in jobs), tuple(sorted({j.tenant for j in jobs})),
                    batch.server, size=batch.bytes)


@dataclass(frozen=True)
class DeadLetter:
    tag: int
    body: bytes
    headers: dict[str, Any]

    def _text(self, name: str) -> str:
        value = self.headers.get(name, "")
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

    @cached_property
    def contents(self) -> Contents:
        return contents(self.body)

    @property
    def reason(self) -> str:
        return self._text(DEAD_REASON) or f"rabbitmq: {self._text('x-first-death-reason')}"

    @property
    def stage(self) -> str:
        return self._text(DEAD_STAGE)

    @property
    def category(self) -> str:
        return self._text("x-mailpipe-category") or self._text("x-first-death-reason")

    @property
    def tenant(self) -> str:
        return self._text("x-mailpipe-tenant") or ",".join(self.contents.tenants)

    @property
    def job_id(self) -> str:
        return self._text("x-mailpipe-job-id") or (
            self.contents.job_ids[0] if len(self.contents.job_ids) == 1 else "")

    @property
    def id(self) -> str:
        return self.job_id or hashlib.sha256(self.body).hexdigest()[:16]

    @property
    def at(self) -> str:
        ms = self.headers.get("x-mailpipe-at-ms")
        if isinstance(ms, int):
            return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        return ""

    def matches(self, reason: str | None = None, tenant: str | None = None, id: str | None = None) -> bool:
        """``reason``: a substring of the reason or the category; ``tenant``: one of its tenants;
        ``id``: its ID, a job id it holds, or a prefix of either (at least 6 characters)."""
        if reason and reason.lower() not in f"{self.reason}\n{self.category}".lower():
            return False
        if tenant and tenant not in {self._text("x-mailpipe-tenant"), *self.contents.tenants}:
            return False
        if id:
            ids = {self.id, *self.contents.job_ids}
            return id in ids or (len(id) >= 6 and any(i.startswith(id) for i in ids))
        return True

    def origin(self, topology: Topology) -> str:
        """The queue to replay into."""
        first = self._text("x-first-death-queue")
        if first:
            return first
        size = len(self.body)  # a request or job over large_message_bytes goes back to .large
        return {"producer": topology.intake_for(size), "packer": topology.jobs_for(size),
                "limiter": topology.batches, "sender": topology.jobs_for(size)}.get(self.stage,
                                                                                  topology.intake_for(size))


class DeadQueue:
    """The dead-letter queue of one namespace, read without consuming."""

    def __init__(self, settings: Settings) -> None:
        self.topology = Topology.from_settings(settings)
        self.broker = Broker(settings.amqp_endpoints, client_name="mailpipe-dead")

    def __enter__(self) -> DeadQueue:
        self.broker.connect()
        self.topology.declare(self.broker.channel())
        return self

    def __exit__(self, *_exc: object) -> None:
        self.broker.close()  # every dead letter not acked goes back to the queue

    def count(self) -> int:
        return int(self.broker.channel().queue_declare(self.topology.dead, passive=True).method.message_count)

    def letters(self, limit: int | None = None) -> Iterator[DeadLetter]:
        """Up to ``limit`` dead letters (default: as many as the queue held when asked)."""
        channel = self.broker.channel()
        left = self.count() if limit is None else limit
        while left > 0:
            method, properties, body = channel.basic_get(self.topology.dead, auto_ack=False)
            if method is None:
                return
            left -= 1
            yield DeadLetter(method.delivery_tag, body, dict(properties.headers or {}))


def list_dead(settings: Settings, limit: int = 50, reason: str | None = None,
              tenant: str | None = None) -> int:
    with DeadQueue(settings) as dead:
        total = dead.count()
        shown = [d for d in dead.letters() if d.matches(reason, tenant)][:limit]
        queue = dead.topology.dead
    filters = "".join(f", {k} {v!r}" for k, v in (("reason", reason), ("tenant", tenant)) if v)
    print(f"{total} dead letter(s) in {queue}{filters}" + (f", showing {len(shown)}:" if shown else ""))
    for d in shown:
        print(f"{d.at:19}  {d.stage or '-':8}  {d.category or '-':14}  {d.tenant or '-':12}  "
              f"{d.id:32}  {d.reason}")
    return 0


def show(settings: Settings, id: str) -> int:
    """Everything a dead letter says about itself: why, where from, what it holds."""
    with DeadQueue(settings) as dead:
        found = [d for d in dead.letters() if d.matches(id=id)]
        origin = [d.origin(dead.topology) for d in found]
    if not found:
        print(f"no dead letter with ID {id!r}", file=sys.stderr)
        return 1
    for d, queue in zip(found, origin, strict=True):
        c = d.contents
        print(f"ID          {d.id}")
        print(f"reason      {d.reason}")
        rows = [("category", d.category), ("stage", d.stage), ("at", d.at), ("replays to", queue),
                ("kind", c.kind), ("tenant", d.tenant), ("server", c.server), ("sender", c.sender),
                ("recipients", ", ".join(c.recipients)), ("attempt", "" if c.attempt is None else str(c.attempt)),
                ("jobs", ", ".join(c.job_ids) if len(c.job_ids) > 1 else ""), ("bytes", str(c.size)),
                ("decode", c.error if c.kind == "undecodable" else "")]
        for name, value in rows:
            if value:
                print(f"{name:11} {value}")
        for key in sorted(d.headers):
            if key.startswith("x-mailpipe-") and key not in (DEAD_REASON, DEAD_STAGE):
                print(f"{key:27} {d._text(key)}")
        deaths = d.headers.get("x-death")
        if isinstance(deaths, list):
            for death in deaths:
                if isinstance(death, dict):
                    print(f"x-death     {_plain(death.get('queue'))}: {_plain(death.get('reason'))} "
                          f"x{_plain(death.get('count'))}")
        if len(found) > 1:
            print()
    return 0


def _plain(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def replay(settings: Settings, reason: str | None = None, tenant: str | None = None,
           id: str | None = None) -> int:
    replayed = 0
    with DeadQueue(settings) as dead:
        chosen = [d for d in dead.letters() if d.matches(reason, tenant, id)]
        for i in range(0, len(chosen), REPLAY_CHUNK):
            chunk = chosen[i:i + REPLAY_CHUNK]
            dead.broker.publish([Outgoing(d.origin(dead.topology), d.body, message_id=d.job_id or None,
                                          headers={"x-mailpipe-replayed": 1}) for d in chunk])
            for d in chunk:  # only once their copies are confirmed
                dead.broker.ack(d.tag)
            replayed += len(chunk)
    print(f"replayed {replayed} dead letter(s)", file=sys.stderr)
    return 0
