"""The one AMQP layer over pika: a connection with a consuming channel and a publishing
channel in confirm mode.

Publishes are pipelined: ``publish()`` sends every message, keeps each payload until the
broker confirms it, re-sends the ones the broker nacks, and returns only when all are
confirmed. A mandatory message the broker returns (no queue bound) raises ``Unroutable`` (or
is handed back to a caller that asks for it).
A lost connection raises ``BrokerUnavailable``; the caller reconnects (``Broker.connect``
again) and, because nothing was acked, its inputs come back and are processed again.

pika's BlockingChannel waits one round trip per confirmed publish (about 1,500/s); we use
its underlying channel's confirm callbacks instead so that a batch of publishes costs one.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
import types
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from mailpipe import metrics
from mailpipe.errors import BrokerUnavailable, ConfigError, PublishRejected, Unroutable
from mailpipe.settings import redact_url

log = logging.getLogger(__name__)


class _PassiveDeclares(logging.Filter):
    """pika logs every channel the broker closes as a warning; a passive declare asking whether
    a queue exists is answered that way (404) on the scratch channels listed here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("NOT_FOUND - no queue" in record.getMessage()
                    and any(f"Channel number={n} " in record.getMessage() for n in _QUIET_CHANNELS))


_QUIET_CHANNELS: set[int] = set()
logging.getLogger("pika.channel").addFilter(_PassiveDeclares())

PERSISTENT = pika.DeliveryMode.Persistent

# pika reads 4 KB per recv(), and appends each read to its frame buffer: an 80 MB batch took
# 20,000 reads and over a GB of buffer copies. One frame (RabbitMQ's default frame_max, 128 KB)
# per read halves the time to consume it (0.28 -> 0.14 s here); larger reads are slower again.
RECV_BYTES = 128 * 1024
MAX_NACK_RETRIES = 5


@dataclass(frozen=True)
class Outgoing:
    """A message to publish. The default exchange routes by queue name."""

    routing_key: str
    body: bytes = field(repr=False)
    exchange: str = ""
    headers: dict[str, Any] | None = None
    mandatory: bool = True
    message_id: str | None = None
    expiration_ms: int | None = None  # a per-message TTL (below a delay queue's own: jitter)


@dataclass(frozen=True)
class Delivery:
    tag: int
    body: bytes = field(repr=False)
    routing_key: str
    headers: dict[str, Any]
    redelivered: bool
    message_id: str | None = None

    @property
    def delivery_count(self) -> int:
        """How many times a quorum queue delivered this before (its x-delivery-count)."""
        count = self.headers.get("x-delivery-count", 0)
        return count if isinstance(count, int) else 0


def _wake() -> None:
    pass


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """pika's exceptions become ours at this boundary."""
    try:
        yield
    # AMQPConnectorException: what BlockingConnection raises when a broker accepts the TCP
    # connection but never completes the AMQP handshake (a hung node); not an AMQPError.
    except (pika.exceptions.AMQPError, AMQPConnectorException, OSError) as exc:
        raise BrokerUnavailable(f"RabbitMQ: {what} failed: {type(exc).__name__}: {exc}") from exc


def _read_frames_whole(conn: pika.BlockingConnection) -> None:
    """This connection's socket reads one frame at a time (``RECV_BYTES``), not pika's 4 KB.
    pika offers no parameter for it: its transport reads the size from an attribute. And the
    frames of a read are taken from it by offset (``_frames_by_offset``)."""
    transport = getattr(conn._impl, "_transport", None)
    if transport is not None and hasattr(transport, "_MAX_RECV_BYTES"):
        transport._MAX_RECV_BYTES = RECV_BYTES
    impl = conn._impl
    if hasattr(impl, "_on_data_available") and hasattr(impl, "_frame_buffer"):
        impl._on_data_available = types.MethodType(_frames_by_offset, impl)


def _frames_by_offset(impl: Any, data_in: bytes) -> None:
    """pika's ``_on_data_available``, without its quadratic copy: pika cuts each frame off the
    front of its buffer (``buffer = buffer[n:]``), copying what is left after every frame, and a
    128 KB read of small deliveries holds a hundred frames (12 us a mail, measured). Here each
    frame is sliced out by its offset and the rest kept once per read. Frames are decoded by
    pika's own ``decode_frame`` and processed by pika, as before."""
    buffer = impl._frame_buffer + data_in if impl._frame_buffer else data_in
    if buffer[:4] == b"AMQP":  # the protocol header: pika's own path
        impl._frame_buffer = b""
        type(impl)._on_data_available(impl, buffer)
        return
    offset, end = 0, len(buffer)
    while offset + 7 <= end:
        frame_end = offset + 8 + struct.unpack_from(">L", buffer, offset + 3)[0]
        if frame_end > end:
            break
        consumed, frame_value = pika.frame.decode_frame(buffer[offset:frame_end])
        if not frame_value:
            break
        offset += consumed
        impl.bytes_received += consumed
        impl._process_frame(frame_value)
        if impl._frame_buffer is None:  # the connection closed while processing
            return
    impl._frame_buffer = buffer[offset:] if offset else buffer


class Broker:
    """One AMQP connection with a consuming and a confirming publishing channel. ``url`` may be
    several (a cluster's nodes): ``connect`` tries them in turn, from the one that last worked."""

    def __init__(self, url: str | Sequence[str], *, client_name: str, heartbeat_s: int = 30,
                 stage: str = "") -> None:
        self.urls = (url,) if isinstance(url, str) else tuple(url)
        if not self.urls:
            raise ConfigError("no AMQP URL given")
        self._current = 0  # the endpoint connected to, or to try first
        self.stage = stage  # counts what it publishes in mailpipe_messages_out_total, if named
        self.client_name = client_name
        self.heartbeat_s = heartbeat_s
        self._conn: pika.BlockingConnection | None = None
        self._consume_ch: BlockingChannel | None = None
        self._scratch_ch: BlockingChannel | None = None  # passive declares, which a 404 closes
        self._publish_ch: pika.channel.Channel | None = None
        self._inbox: deque[Delivery] = deque()
        self._consumer_tags: list[str] = []
        # Bytes of every delivery not yet acked or given back, by delivery tag: what the
        # prefetches let the broker push at us, which bounds a stage's memory.
        self._unacked: dict[int, int] = {}
        self.unacked_bytes = 0
        self.peak_unacked_bytes = 0
        # Publisher-confirm bookkeeping: delivery tag -> message, kept until confirmed.
        self._next_tag = 1
        self._unconfirmed: dict[int, Outgoing] = {}
        self._nacked: list[Outgoing] = []
        self._returned: list[tuple[Outgoing | None, str]] = []

    # -- connection ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The endpoint connected to (or to be tried first)."""
        return self.urls[self._current]

    def connect(self) -> Broker:
        """Connect to the first endpoint that answers, starting from the current one; when none
        does, BrokerUnavailable names each one's failure (the caller backs off and calls again)."""
        failures: list[str] = []
        for _ in self.urls:
            try:
                return self._connect(self.url)
            except BrokerUnavailable as exc:
                failures.append(exc.reason)
                self._current = (self._current + 1) % len(self.urls)
        raise BrokerUnavailable("; ".join(failures))

    def _connect(self, url: str) -> Broker:
        self.close()
        params = pika.URLParameters(url)
        params.heartbeat = self.heartbeat_s
        params.blocked_connection_timeout = 60
        params.client_properties = {"connection_name": self.client_name}
        if len(self.urls) > 1:
            # A node that accepts TCP but never answers must not hold up the next one for long.
            params.socket_timeout = min(params.socket_timeout or 10, 5)
            params.stack_timeout = min(params.stack_timeout or 15, 5)
            params.connection_attempts = 1
        with _translated(f"connecting to {redact_url(url)}"):
            self._conn = pika.BlockingConnection(params)
            _read_frames_whole(self._conn)
            self._consume_ch = self._conn.channel()
            self._publish_ch = self._conn.channel()._impl
            selected: list[bool] = []
            conn = self._conn

            def on_selected(_frame: pika.frame.Method) -> None:
                selected.append(True)
                # A callback of the underlying channel does not end process_data_events' wait,
                # which would sleep out its whole second on every connect: wake it now.
                conn.add_callback_threadsafe(_wake)

            self._publish_ch.confirm_delivery(ack_nack_callback=self._on_confirm, callback=on_selected)
            self._publish_ch.add_on_return_callback(self._on_return)
            while not selected:
                self._conn.process_data_events(time_limit=1)
        self._next_tag = 1
        self._unconfirmed.clear()
        # Nacks of the old connection too: its caller got BrokerUnavailable and redoes that work.
        self._nacked.clear()
        return self

    @property
    def is_open(self) -> bool:
        return self._conn is not None and self._conn.is_open

    def close(self) -> None:
        """Close the connection with AMQP's closing handshake."""
        conn = self._forget()
        if conn is not None and conn.is_open:
            with suppress(pika.exceptions.AMQPError, OSError):  # it may be broken already
                conn.close()

    def abort(self) -> None:
        """Drop the connection without the closing handshake, after a failure: a node that
        cannot answer (a cluster without its majority) holds a graceful close for minutes.

        The socket is closed here and now. pika's ``transport.abort()`` only schedules that on
        the connection's I/O loop, which nobody runs again: until the garbage collector got to
        it or the broker's heartbeat timed out (about 90 s at 30 s), the broker saw a live
        connection that held every unacked delivery, and whose consumer took new messages into
        a socket nobody read; no other session or replica could have them meanwhile."""
        conn = self._forget()
        transport = getattr(conn._impl, "_transport", None) if conn is not None else None
        if transport is None:
            return
        sock = getattr(transport, "_sock", None)  # None once pika closed it itself
        with suppress(Exception):  # whatever state it is in, the socket goes
            transport.abort()
        if isinstance(sock, socket.socket):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # the FIN now, whoever else holds the descriptor
            with suppress(OSError):
                sock.close()

    def _forget(self) -> pika.BlockingConnection | None:
        conn, self._conn = self._conn, None
        self._consume_ch = None
        self._scratch_ch = None
        self._publish_ch = None
        self._inbox.clear()
        self._consumer_tags.clear()
        self._unacked.clear()  # the broker gives them back to their queues
        self.unacked_bytes = 0
        return conn

    def channel(self) -> BlockingChannel:
        """The consuming channel, for declarations and the odd basic_get."""
        if self._consume_ch is None:
            raise BrokerUnavailable("RabbitMQ: not connected")
        return self._consume_ch

    def _connection(self) -> pika.BlockingConnection:
        if self._conn is None:
            raise BrokerUnavailable("RabbitMQ: not connected")
        return self._conn

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, messages: Sequence[Outgoing], timeout_s: float = 30.0, *,
                allow_returns: bool = False) -> list[Outgoing]:
        """Publish every message and return once the broker has confirmed them all. A mandatory
        message that no queue takes raises ``Unroutable``; with ``allow_returns``, such messages
        are returned instead (a lane deleted since it was declared: the caller declares it and
        publishes them again)."""
        if not messages:
            return []
        if self._publish_ch is None:
            raise BrokerUnavailable("RabbitMQ: not connected")
        self._returned.clear()
        for message in messages:
            self._send(message)
        deadline = time.monotonic() + timeout_s
        retries = 0
        with _translated("publish"):
            while self._unconfirmed or self._nacked:
                if self._nacked:
                    retries += 1
                    if retries > MAX_NACK_RETRIES:
                        raise PublishRejected(f"RabbitMQ nacked {len(self._nacked)} message(s) "
                                              f"{MAX_NACK_RETRIES} times")
                    again, self._nacked = self._nacked, []
                    for message in again:
                        self._send(message)
                    continue
                if time.monotonic() > deadline:
                    raise BrokerUnavailable(f"RabbitMQ: {len(self._unconfirmed)} publish(es) "
                                            f"not confirmed within {timeout_s:.0f} s")
                self._connection().process_data_events(time_limit=0.5)
        returns = [(m, reply) for m, reply in self._returned]
        if returns and (not allow_returns or any(m is None for m, _ in returns)):
            returned, reply = returns[0]
            target = returned.routing_key if returned else "?"
            raise Unroutable(f"RabbitMQ returned a message for {target!r} ({reply}): the queue does "
                             f"not exist; run `mailpipe topology` to declare it")
        back = [m for m, _ in returns if m is not None]
        if self.stage:
            gone = {id(m) for m in back}
            for target, count in Counter(m.exchange or m.routing_key for m in messages if id(m) not in gone).items():
                metrics.MESSAGES_OUT.labels(self.stage, target).inc(count)
        return back

    def _send(self, message: Outgoing) -> None:
        assert self._publish_ch is not None
        properties = pika.BasicProperties(
            delivery_mode=PERSISTENT, headers=message.headers, message_id=message.message_id,
            content_type="application/msgpack",
            expiration=None if message.expiration_ms is None else str(message.expiration_ms),
        )
        with _translated("publish"):
            self._publish_ch.basic_publish(exchange=message.exchange, routing_key=message.routing_key,
                                           body=message.body, properties=properties,
                                           mandatory=message.mandatory)
        self._unconfirmed[self._next_tag] = message
        self._next_tag += 1

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        tag = method.delivery_tag
        tags = [t for t in self._unconfirmed if t <= tag] if method.multiple else [tag]
        nacked = isinstance(method, pika.spec.Basic.Nack)
        for t in tags:
            unconfirmed = self._unconfirmed.pop(t, None)
            if nacked and unconfirmed is not None:
                self._nacked.append(unconfirmed)
        if (not self._unconfirmed or self._nacked) and self._conn is not None:
            # process_data_events() otherwise sleeps out its whole time limit: wake it now.
            self._conn.add_callback_threadsafe(_wake)

    def _on_return(self, _channel: Any, method: pika.spec.Basic.Return,
                   properties: pika.spec.BasicProperties, _body: bytes) -> None:
        # A Basic.Return always precedes the Basic.Ack of the same message.
        match = next((m for m in self._unconfirmed.values()
                      if m.routing_key == method.routing_key and m.message_id == properties.message_id),
                     None)
        self._returned.append((match, f"{method.reply_code} {method.reply_text}"))

    # -- consuming ----------------------------------------------------------------------------

    def consume(self, queue: str, prefetch: int) -> None:
        channel = self.channel()
        with _translated(f"consume from {queue}"):
            channel.basic_qos(prefetch_count=prefetch)
            tag = channel.basic_consume(queue, on_message_callback=self._on_delivery)
        self._consumer_tags.append(tag)

    def stop_consuming(self) -> None:
        """Ask for no more deliveries; the ones already received stay ours to ack."""
        channel = self.channel()
        with _translated("cancel consumer"):
            for tag in self._consumer_tags:
                channel.basic_cancel(tag)
        self._consumer_tags.clear()

    def _on_delivery(self, _channel: Any, method: pika.spec.Basic.Deliver,
                     properties: pika.spec.BasicProperties, body: bytes) -> None:
        self._inbox.append(Delivery(
            tag=method.delivery_tag, body=body, routing_key=method.routing_key,
            headers=dict(properties.headers or {}), redelivered=bool(method.redelivered),
            message_id=properties.message_id,
        ))
        self._unacked[method.delivery_tag] = len(body)
        self.unacked_bytes += len(body)
        self.peak_unacked_bytes = max(self.peak_unacked_bytes, self.unacked_bytes)

    def _settled(self, tag: int, multiple: bool = False) -> None:
        tags = [t for t in self._unacked if t <= tag] if multiple else [tag]
        for t in tags:
            self.unacked_bytes -= self._unacked.pop(t, 0)

    def get(self, queue: str) -> Delivery | None:
        """One message from ``queue`` (``basic.get``, unacked), or None when it is empty. The
        queue must exist: a missing one closes the channel (``message_count`` checks first)."""
        channel = self.channel()
        with _translated(f"get from {queue}"):
            method, properties, body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            return None
        delivery = Delivery(tag=method.delivery_tag, body=body, routing_key=method.routing_key,
                            headers=dict(properties.headers or {}), redelivered=bool(method.redelivered),
                            message_id=properties.message_id)
        self._unacked[method.delivery_tag] = len(body)
        self.unacked_bytes += len(body)
        self.peak_unacked_bytes = max(self.peak_unacked_bytes, self.unacked_bytes)
        return delivery

    def message_count(self, queue: str) -> int | None:
        """Messages ready in ``queue``, or None when it does not exist. A passive declare on a
        channel of its own: the broker closes a channel that asks for a missing queue (an
        answer here, not a warning in the log)."""
        conn = self._connection()
        with _translated(f"declare {queue} (passive)"):
            if self._scratch_ch is None or not self._scratch_ch.is_open:
                self._scratch_ch = conn.channel()
                _QUIET_CHANNELS.add(self._scratch_ch.channel_number)
            try:
                return int(self._scratch_ch.queue_declare(queue, passive=True).method.message_count)
            except pika.exceptions.ChannelClosedByBroker as exc:
                self._scratch_ch = None
                if exc.reply_code == 404:
                    return None
                raise

    def delete_queue(self, queue: str) -> int:
        """Delete ``queue`` (whatever it holds: the caller made sure it is empty); the number of
        messages the broker says it deleted."""
        with _translated(f"delete {queue}"):
            return int(self.channel().queue_delete(queue).method.message_count)

    def poll(self, timeout_s: float, max_messages: int = 10_000) -> list[Delivery]:
        """Wait up to ``timeout_s`` for deliveries, and return what has arrived."""
        with _translated("poll"):
            if not self._inbox:
                self._connection().process_data_events(time_limit=timeout_s)
            else:
                self._connection().process_data_events(time_limit=0)
        out: list[Delivery] = []
        while self._inbox and len(out) < max_messages:
            out.append(self._inbox.popleft())
        return out

    def ack(self, tag: int, multiple: bool = False) -> None:
        with _translated("ack"):
            self.channel().basic_ack(delivery_tag=tag, multiple=multiple)
        self._settled(tag, multiple)

    def ack_all(self, tags: Iterable[int]) -> None:
        """Ack every delivery tag given, in any order, in one write: BlockingChannel.basic_ack
        flushes the socket once per ack, which cost the packer half its time (py-spy)."""
        if self._consume_ch is None:
            raise BrokerUnavailable("RabbitMQ: not connected")
        channel = self._consume_ch._impl
        with _translated("ack"):
            for tag in tags:
                channel.basic_ack(delivery_tag=tag)
                self._settled(tag)
            self._connection().process_data_events(time_limit=0)

    def requeue(self, tag: int) -> None:
        """Give a delivery back to its queue (counts as a delivery for the delivery limit)."""
        with _translated("requeue"):
            self.channel().basic_nack(delivery_tag=tag, requeue=True)
        self._settled(tag)

    def sleep(self, seconds: float) -> None:
        """Wait while still serving heartbeats and confirms."""
        with _translated("sleep"):
            self._connection().sleep(seconds)
