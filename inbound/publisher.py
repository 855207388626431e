"""Confirmed publishes from the receivers' threads: pika's connection is not thread-safe, so the
receivers hand their messages to one thread that owns a connection of its own, publishes what
has gathered in one confirmed round, and resolves each caller's Future once RabbitMQ has
confirmed it (or with the error: the SMTP client is then told to try again, 451)."""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future

from mailpipe.amqp import Broker, Outgoing
from mailpipe.settings import Settings
from mailpipe.topology import Topology

log = logging.getLogger(__name__)

MAX_ROUND = 500  # messages published in one confirmed round, at most


class Publisher:
    def __init__(self, settings: Settings, topology: Topology) -> None:
        self.settings = settings
        self.topology = topology
        self._queue: queue.Queue[tuple[Outgoing, Future[None]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._broker = Broker(settings.amqp_endpoints, client_name="mailpipe-inbound-receiver",
                              heartbeat_s=settings.heartbeat_s, stage="inbound")

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inbound-publisher", daemon=True)
            self._thread.start()

    def submit(self, message: Outgoing) -> Future[None]:
        """Publish ``message``; the Future is done once RabbitMQ confirmed it (or failed)."""
        done: Future[None] = Future()
        if self._thread is None:
            done.set_exception(RuntimeError("the publisher is not running"))
        else:
            self._queue.put((message, done))
        return done

    def pending(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Publish what was submitted, then stop."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._thread = None

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.5)
            except queue.Empty:
                self._idle()
                continue
            stop = first is None
            batch = [] if first is None else [first]
            while not stop and len(batch) < MAX_ROUND:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            self._publish(batch)
            if stop:
                break
        self._broker.close()

    def _publish(self, batch: list[tuple[Outgoing, Future[None]]]) -> None:
        if not batch:
            return
        try:
            if not self._broker.is_open:
                self._broker.connect()
                self.topology.declare(self._broker.channel())
            self._broker.publish([message for message, _ in batch])
        except Exception as exc:  # RabbitMQ away, a nack, a bug: each caller says "try later"
            log.warning("inbound: cannot publish %d report(s): %s", len(batch), exc)
            self._broker.abort()
            for _, done in batch:
                done.set_exception(exc)
            return
        for _, done in batch:
            done.set_result(None)

    def _idle(self) -> None:
        if self._broker.is_open:
            try:
                self._broker.sleep(0)  # heartbeats
            except Exception:
                self._broker.abort()
