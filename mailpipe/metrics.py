"""Prometheus metrics shared by every stage, and the HTTP endpoint serving them.

``/metrics`` for Prometheus, ``/healthz`` (the process is alive) and ``/readyz`` (connected to
what the stage needs) for Kubernetes probes. Names: ``mailpipe_<noun>_<unit|total>``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

MESSAGES_IN = Counter("mailpipe_messages_in_total", "Messages a stage consumed.", ["stage"])
MESSAGES_OUT = Counter("mailpipe_messages_out_total",
                       "Messages a stage published, confirmed, by queue (or exchange), whatever they are: "
                       "counted once, in Broker.publish.", ["stage", "queue"])
DEAD_LETTERS = Counter("mailpipe_dead_letters_total", "Messages a stage sent to the dead-letter queue.",
                       ["stage", "category"])
RECONNECTS = Counter("mailpipe_reconnects_total", "Connections a stage re-opened after losing one.",
                     ["stage", "service"])
READY = Gauge("mailpipe_ready", "1 when the stage is connected to what it needs.", ["stage"])
IN_FLIGHT = Gauge("mailpipe_in_flight", "Messages a stage holds unacked.", ["stage"])
HANDLE_SECONDS = Histogram("mailpipe_handle_seconds", "Time a stage spends on a round of deliveries.",
                           ["stage"], buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10, 60))


def serve(port: int, ready: Callable[[], bool], host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz on ``port`` from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._reply(200, b"ok\n")
            elif path == "/readyz":
                ok = ready()
                self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server

