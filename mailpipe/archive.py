"""``mailpipe reports list|show``: the raw reports the inbound stage kept (the
``<ns>.reports.archive`` stream, ``MAILPIPE_REPORTS_KEEP_DAYS`` = 30 days), for a tenant to see
what a remote server or a feedback loop actually said.

Why a RabbitMQ stream: it is on disk and replicated like the quorum queues, deletes by age by
itself (``x-max-age``), and any number of readers can read it from any point in time without
taking anything from it; Redis here keeps nothing on disk (and 30 days of reports would be its
memory), and a stage's file system is not shared between replicas.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions

from mailpipe.errors import BrokerUnavailable
from mailpipe.settings import Settings
from mailpipe.topology import Topology

IDLE_S = 1.0  # the end of the stream: no message for this long


@dataclass(frozen=True)
class Archived:
    id: str
    tenant: str
    kind: str
    received_ms: int
    mail_from: str
    peer: str
    data: bytes = field(repr=False)


def read(settings: Settings, *, tenant: str | None = None, since_s: float = 30 * 86400, report_id: str | None = None,
         limit: int = 1000) -> list[Archived]:
    """The archived reports since ``since_s`` ago (of ``tenant``, or the one ``report_id``),
    oldest first, at most ``limit``."""
    queue = Topology.from_settings(settings).reports_archive
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=since_s)
    found: list[Archived] = []
    try:
        conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_endpoints[0]))
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerUnavailable(f"RabbitMQ: cannot read {queue}: {exc}") from exc
    try:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=500)
        seen = [0]

        def on_message(ch: Any, method: Any, props: pika.BasicProperties, body: bytes) -> None:
            seen[0] += 1
            headers = dict(props.headers or {})
            ch.basic_ack(method.delivery_tag)
            row = Archived(id=str(headers.get("x-mailpipe-report-id", "")),
                           tenant=str(headers.get("x-mailpipe-tenant", "")),
                           kind=str(headers.get("x-mailpipe-kind", "")),
                           received_ms=int(headers.get("x-mailpipe-received-ms", 0) or 0),
                           mail_from=str(headers.get("x-mailpipe-mail-from", "")),
                           peer=str(headers.get("x-mailpipe-peer", "")), data=body)
            if (tenant is None or row.tenant == tenant) and (report_id is None or row.id == report_id):
                found.append(row)

        channel.basic_consume(queue, on_message, arguments={"x-stream-offset": start})
        while len(found) < limit:
            before = seen[0]
            conn.process_data_events(time_limit=IDLE_S)
            if seen[0] == before:
                break
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:  # no inbound stage has run here yet
            return []
        raise BrokerUnavailable(f"RabbitMQ: cannot read {queue}: {exc}") from exc
    finally:
        if conn.is_open:
            conn.close()
    return found[:limit]
