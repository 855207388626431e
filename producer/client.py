"""The client library upstream services publish mail with.

    from producer import Producer

    with Producer(amqp_url="amqp://guest:guest@127.0.0.1:5672/") as mail:
        job_id = mail.publish(tenant="acme", sender="jobs@acme.example", to=["ann@example.com"],
                              subject="Your interview", text="See you on Monday.")

``publish`` validates first (a bad address, CR/LF in a header, a mail too large: raised at
once as ``InvalidMessage`` naming the field), then waits for RabbitMQ's confirm before it
returns: a returned job id is durably queued. A request whose encoded body is over
``large_message_bytes`` (256 KiB) goes to ``<ns>.intake.large``, the others to ``<ns>.intake``
(docs/wire-format.md, 2.1): the enqueue stage holds few large ones at a time. If the broker
cannot be reached the call raises ``BrokerUnavailable``; it never returns without the
confirm. One Producer per thread.

Many mails at once: ``publish_many(requests)`` refuses each invalid request on its own (its
``InvalidMessage`` in its place in the result, never published) and queues the others, their
job ids returned once RabbitMQ has confirmed them all; ``publish_requests(requests)`` queues
all or, if one is invalid, raises before publishing any. Both send the requests in intake
bundles of up to 100 (docs/wire-format.md, 2.1; producer/bundles.py): RabbitMQ's cost is per
message, and the enqueue stage still checks, queues or dead-letters each request on its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from types import TracebackType

from mailpipe.amqp import Broker, Outgoing
from mailpipe.codec import encode_intake
from mailpipe.errors import BrokerUnavailable, InvalidMessage, PublishRejected
from mailpipe.model import Attachment, IntakeRequest, job_id_for, now_ms
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from producer.bundles import bundled
from producer.compose import validate

_DEFAULTS = Settings()


class Producer:
    """Publishes mail jobs, each confirmed by RabbitMQ before the call returns. ``amqp_url`` is
    one URL or, for a cluster, a list of its nodes' URLs: a publish goes on through another node
    when the one connected to dies, and fails with BrokerUnavailable (after ``reconnect_s``)
    when none can confirm it (a cluster that lost its majority): never silently."""

    def __init__(self, amqp_url: str | Sequence[str] = _DEFAULTS.amqp_url, namespace: str = _DEFAULTS.namespace, *,
                 max_message_bytes: int = _DEFAULTS.max_message_bytes,
                 max_recipients: int = _DEFAULTS.max_recipients,
                 large_message_bytes: int = _DEFAULTS.large_message_bytes, reconnect_s: float = 10.0) -> None:
        self._broker = Broker(amqp_url, client_name="mailpipe-producer-client")
        self._topology = Topology(namespace, large_message_bytes=large_message_bytes)
        self._max_message_bytes = max_message_bytes
        self._max_recipients = max_recipients
        self._reconnect_s = reconnect_s
        self._lock = threading.Lock()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._broker.close()

    def publish(self, *, tenant: str, sender: str, to: Sequence[str], cc: Sequence[str] = (),
                bcc: Sequence[str] = (), subject: str | None = None, text: str | None = None,
                html: str | None = None, attachments: Iterable[tuple[str, str, bytes]] = (),
                headers: dict[str, str] | None = None, server: str | None = None,
                idempotency_key: str | None = None, send_at: datetime | float | None = None,
                priority: str = "normal", bulk: bool = False) -> str:
        """Queue one mail to compose; returns its job id once RabbitMQ has confirmed it.

        With an ``idempotency_key``, publishing again (a retry after a timeout, say) returns the
        same job id and the mail is queued once. ``send_at`` (an aware datetime or a Unix time)
        holds it until then; ``priority="high"`` is for transactional mail (a password reset),
        which overtakes "normal" mail of the same tenant however much of it is waiting.
        ``bulk=True`` (a newsletter, a campaign: one recipient per mail) adds a one-click
        unsubscribe for that recipient (List-Unsubscribe, List-Unsubscribe-Post, RFC 8058).
        """
        req = IntakeRequest(
            id=job_id_for(tenant, idempotency_key), tenant=tenant, sender=sender, created_ms=now_ms(),
            to=_strings(to, "to"),
            cc=_strings(cc, "cc"), bcc=_strings(bcc, "bcc"), subject=subject, text=text, html=html,
            attachments=tuple(Attachment(f, c, d) for f, c, d in attachments),
            headers=dict(headers or {}), server=server, idempotency_key=idempotency_key,
            send_at_ms=_epoch_ms(send_at), priority=priority, bulk=bulk,
        )
        return self.publish_requests([req])[0]

    def publish_raw(self, *, tenant: str, sender: str, recipients: Sequence[str], message: bytes,
                    server: str | None = None, idempotency_key: str | None = None,
                    send_at: datetime | float | None = None, priority: str = "normal", bulk: bool = False) -> str:
        """Queue a ready RFC 5322 message (CRLF line endings) for the given envelope; ``bulk`` as
        for ``publish`` (a List-Unsubscribe of the message's own is kept)."""
        req = IntakeRequest(
            id=job_id_for(tenant, idempotency_key), tenant=tenant, sender=sender, created_ms=now_ms(),
            message=bytes(message),
            recipients=_strings(recipients, "recipients"), server=server,
            idempotency_key=idempotency_key, send_at_ms=_epoch_ms(send_at), priority=priority, bulk=bulk,
        )
        return self.publish_requests([req])[0]

    def publish_requests(self, requests: Sequence[IntakeRequest]) -> list[str]:
        """Queue many at once, in bundles, with one confirm round trip for all; returns their job
        ids, each durably queued. All or nothing: the first invalid request raises
        ``InvalidMessage`` before anything is published."""
        for req in requests:
            validate(req, self._max_message_bytes, self._max_recipients)
        self._publish_until_confirmed(intake_messages(self._topology, requests))
        return [r.id for r in requests]

    def publish_many(self, requests: Sequence[IntakeRequest]) -> list[str | InvalidMessage]:
        """Queue many at once, each on its own: for each request, in order, its job id (durably
        queued: returned only once RabbitMQ has confirmed every request of the call) or, for an
        invalid one, the ``InvalidMessage`` naming the field (that request is not published).
        One confirm round trip for all; ``BrokerUnavailable`` if they cannot be confirmed."""
        results: list[str | InvalidMessage] = []
        valid: list[IntakeRequest] = []
        for req in requests:
            try:
                validate(req, self._max_message_bytes, self._max_recipients)
            except InvalidMessage as exc:
                results.append(exc)
                continue
            valid.append(req)
            results.append(req.id)
        self._publish_until_confirmed(intake_messages(self._topology, valid))
        return results

    def _publish_until_confirmed(self, messages: list[Outgoing]) -> None:
        with self._lock:
            self._publish_locked(messages)

    def _publish_locked(self, messages: list[Outgoing]) -> None:
        # The payloads stay in `messages` until confirmed: after a lost connection, all of them
        # are published again (the intake dedupes by idempotency key where one is given).
        give_up = time.monotonic() + self._reconnect_s
        delay_s = 0.1
        while True:
            try:
                if not self._broker.is_open:
                    self._broker.connect()
                self._broker.publish(messages, timeout_s=max(0.5, give_up - time.monotonic()))
                return
            except (BrokerUnavailable, PublishRejected):  # a node lost, its nacks: transient
                self._broker.abort()  # a graceful close waits on a cluster that cannot answer
                if time.monotonic() + delay_s > give_up:
                    raise
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)


def intake_messages(topology: Topology, requests: Sequence[IntakeRequest]) -> list[Outgoing]:
    """The messages for ``requests``: intake bundles of up to 100 requests and
    ``large_message_bytes`` on ``<ns>.intake``; a request alone as itself, on ``<ns>.intake``,
    or ``<ns>.intake.large`` when its encoded body is over the topology's ``large_message_bytes``."""
    return bundled("intake", [(r.id, encode_intake(r)) for r in requests], topology.intake_for,
                   topology.large_message_bytes)


def _epoch_ms(when: datetime | float | None) -> int | None:
    if when is None:
        return None
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise InvalidMessage("send_at: a naive datetime is ambiguous; give one with a time zone")
        return int(when.timestamp() * 1000)
    return int(when * 1000)


def _strings(values: Sequence[str] | str, field: str) -> tuple[str, ...]:
    if isinstance(values, str):  # to="a@b.c" would otherwise become one recipient per letter
        raise InvalidMessage(f"{field}: expected a list of addresses, got a string")
    return tuple(values)
