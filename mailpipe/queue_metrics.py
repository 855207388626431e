"""What the broker and the servers file say, asked at scrape time, for every stage's /metrics.

``mailpipe_queue_messages{queue, state}``: messages in each queue of the namespace, ``ready``
and ``unacked``. RabbitMQ's management API gives both; where it does not answer (the plugin is
off, as on a bare install), passive ``queue_declare`` over AMQP gives the ready count only,
and ``mailpipe_queue_metrics_source{source="api"|"amqp"}`` says which one the numbers come
from. The answer is cached for ``queue_metrics_cache_s`` so that scrapes stay cheap, and an API
that failed is not asked again for a minute (a firewalled port would cost its timeout at
every scrape).

``mailpipe_server_limit_mails_per_hour{server}``: each server's configured rate, from the
servers file, so a dashboard can draw the send rate next to its limit; and its pace, from Redis
(``mailpipe/pushback.py``): ``mailpipe_server_effective_rate_mails_per_hour``,
``mailpipe_server_connection_cap``, ``mailpipe_server_paused``.

Every stage that serves /metrics registers these collectors (see ``stage.run``), so the
numbers survive whichever stage is down; queries aggregate with ``max by (queue, state)``,
which removes the duplicates of N replicas.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pika
import pika.exceptions
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from mailpipe.servers import ConfigWatcher
from mailpipe.settings import Settings, redact_url
from mailpipe.topology import Topology

log = logging.getLogger(__name__)

API_TIMEOUT_S = 2.0
API_RETRY_S = 60.0


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    ready: int
    unacked: int | None  # None: the source cannot tell (passive declare)


def api_request(api_url: str, amqp_url: str) -> urllib.request.Request:
    """``GET /api/queues/<vhost>`` for the AMQP URL's vhost, authenticated with the API URL's
    credentials, else the AMQP URL's (one RabbitMQ user usually serves both)."""
    api, amqp = urlsplit(api_url), urlsplit(amqp_url)
    user = unquote(api.username or amqp.username or "guest")
    password = unquote(api.password or amqp.password or "guest")
    vhost = unquote(amqp.path[1:]) if len(amqp.path) > 1 else "/"
    host = api.hostname or "127.0.0.1"
    netloc = f"[{host}]" if ":" in host else host
    if api.port:
        netloc += f":{api.port}"
    path = f"{api.path.rstrip('/')}/api/queues/{quote(vhost, safe='')}"
    url = urlunsplit((api.scheme or "http", netloc, path,
                      "columns=name,messages_ready,messages_unacknowledged", ""))
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})


def parse_api_queues(payload: Any, namespace: str) -> list[QueueDepth]:
    """The namespace's queues out of ``/api/queues``: every queue named ``<namespace>.*``, so the
    limiter's park queues and retry queues of other delays are counted too."""
    if not isinstance(payload, list):
        raise ValueError(f"expected a JSON list of queues, got {type(payload).__name__}")
    prefix = f"{namespace}."
    depths = []
    for item in payload:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name.startswith(prefix):
            continue
        # A queue that has just been declared has no message stats yet: 0, not missing.
        depths.append(QueueDepth(name, int(item.get("messages_ready") or 0),
                                 int(item.get("messages_unacknowledged") or 0)))
    return sorted(depths, key=lambda d: d.queue)


def families(depths: Iterable[QueueDepth], source: str) -> list[GaugeMetricFamily]:
    messages = GaugeMetricFamily("mailpipe_queue_messages",
                                 "Messages in a queue of the namespace, by state (ready, unacked).",
                                 labels=["queue", "state"])
    for depth in depths:
        messages.add_metric([depth.queue, "ready"], depth.ready)
        if depth.unacked is not None:
            messages.add_metric([depth.queue, "unacked"], depth.unacked)
    sources = GaugeMetricFamily("mailpipe_queue_metrics_source",
                                "1 for where queue depths come from: api (ready and unacked), "
                                "amqp (ready only), none (the broker did not answer).",
                                labels=["source"])
    sources.add_metric([source], 1)
    return [messages, sources]


class QueueDepthCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topology = Topology.from_settings(settings)
        self._lock = threading.Lock()  # one refresh at a time, however many scrapes arrive
        self._cached: list[GaugeMetricFamily] = []
        self._cached_at = -float("inf")
        self._api_retry_at = 0.0 if settings.rabbitmq_api_url else float("inf")

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Registering must not ask the broker (the default describe() would call collect()).
        yield from families([], "none")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            now = time.monotonic()
            if now - self._cached_at >= self.settings.queue_metrics_cache_s:
                self._cached = families(*self.read())
                self._cached_at = now
            yield from self._cached

    def read(self) -> tuple[list[QueueDepth], str]:
        if time.monotonic() >= self._api_retry_at:
            try:
                return self.read_api(), "api"
            except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
                self._api_retry_at = time.monotonic() + API_RETRY_S
                log.info("RabbitMQ management API at %s unusable (%s): queue depth from AMQP, "
                         "ready messages only", redact_url(self.settings.rabbitmq_api_url), exc)
        try:
            return self.read_amqp(), "amqp"
        except (pika.exceptions.AMQPError, OSError) as exc:
            log.warning("queue depth unavailable: %s", type(exc).__name__)
            return [], "none"

    def read_api(self) -> list[QueueDepth]:
        request = api_request(self.settings.rabbitmq_api_url, self.settings.amqp_url)
        with urllib.request.urlopen(request, timeout=API_TIMEOUT_S) as response:
            return parse_api_queues(json.load(response), self.settings.namespace)

    def read_amqp(self) -> list[QueueDepth]:
        """Passive declares on a connection of our own: the stage's connection belongs to its
        thread, and a scrape comes on the HTTP server's."""
        connection = self._connect()
        try:
            depths = []
            for queue in self.topology.all_queues:
                channel = connection.channel()
                try:
                    ok = channel.queue_declare(queue, passive=True)
                except pika.exceptions.ChannelClosedByBroker:  # 404: not declared yet
                    continue
                depths.append(QueueDepth(queue, ok.method.message_count, None))
                channel.close()
            return depths
        finally:
            connection.close()


    def _connect(self) -> pika.BlockingConnection:
        """The first node of the cluster that answers (MAILPIPE_AMQP_URLS), as the stages do."""
        error: Exception | None = None
        for url in self.settings.amqp_endpoints:
            params = pika.URLParameters(url)
            params.socket_timeout = params.blocked_connection_timeout = API_TIMEOUT_S
            params.client_properties = {"connection_name": "mailpipe-queue-metrics"}
            try:
                return pika.BlockingConnection(params)
            except (pika.exceptions.AMQPError, OSError) as exc:
                error = exc
        assert error is not None  # amqp_endpoints is never empty
        raise error


class ServerLimitsCollector(Collector):
    """Each server's configured rate, re-read when the servers file changes."""

    def __init__(self, settings: Settings) -> None:
        self.watcher = ConfigWatcher(settings.servers_path)
        self._lock = threading.Lock()

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        with self._lock:
            config = self.watcher.current()
        for server in config.servers.values():
            # An unlimited server has no limit to draw: no series, rather than infinity.
            if not server.unlimited:
                family.add_metric([server.name], server.rate_per_hour)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("mailpipe_server_limit_mails_per_hour",
                                 "The rate a server is configured for, from the servers file.",
                                 labels=["server"])


class ServerPaceCollector(Collector):
    """Each server's pace as every replica sees it (mailpipe/pushback.py, from Redis, cached like
    the queue depths): its effective rate, its connection cap, whether it is paused."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.watcher = ConfigWatcher(settings.servers_path)
        self._lock = threading.Lock()
        self._client: Any = None
        self._cached: tuple[float, dict[str, dict[str, str]]] = (0.0, {})

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        effective, cap, paused = self._families()
        with self._lock:
            config = self.watcher.current()
            paces = self._read(sorted(config.servers))
        for name, server in config.servers.items():
            pace = paces.get(name)
            if pace is None:
                continue
            if not server.unlimited:
                effective.add_metric([name], min(float(pace.get("eff") or server.rate_per_hour),
                                                 float(server.rate_per_hour)))
            cap.add_metric([name], float(pace.get("cap") or server.concurrency or self.settings.send_concurrency))
            paused.add_metric([name], 1.0 if pace.get("state") in ("paused", "probing") else 0.0)
        yield from (effective, cap, paused)

    def _read(self, servers: list[str]) -> dict[str, dict[str, str]]:
        at, cached = self._cached
        if time.monotonic() - at < self.settings.queue_metrics_cache_s:
            return cached
        from mailpipe import redis_client
        from mailpipe.errors import RedisUnavailable
        from mailpipe.pushback import Pushback

        try:
            if self._client is None:
                self._client = redis_client.connect(self.settings, API_TIMEOUT_S)
            paces = Pushback(self._client, self.settings.namespace).state(servers)
        except RedisUnavailable as exc:
            log.debug("server pace not read: %s", exc.reason)
            paces = {}
        self._cached = (time.monotonic(), paces)
        return paces

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("mailpipe_server_effective_rate_mails_per_hour",
                                  "The rate a server is sent at now: its configured one, or less after it "
                                  "pushed back (mailpipe/pushback.py).", labels=["server"]),
                GaugeMetricFamily("mailpipe_server_connection_cap",
                                  "Connections every sender together may keep open to a server.", labels=["server"]),
                GaugeMetricFamily("mailpipe_server_paused",
                                  "1 while a server is paused (broken: a wrong password, relaying denied; "
                                  "or by hand): its mail waits.", labels=["server"]))


_registered: list[tuple[CollectorRegistry, Collector]] = []


def register(settings: Settings, registry: CollectorRegistry = REGISTRY) -> None:
    """Add the collectors to ``registry`` (the one /metrics serves), replacing those of an
    earlier ``stage.run`` in this process."""
    while _registered:
        old_registry, collector = _registered.pop()
        old_registry.unregister(collector)
    for collector in (QueueDepthCollector(settings), ServerLimitsCollector(settings), ServerPaceCollector(settings)):
        registry.register(collector)
        _registered.append((registry, collector))
