"""One-click unsubscribe (RFC 8058), behind the platform's HTTPS: ``POST <link>`` with
``List-Unsubscribe=One-Click`` unsubscribes at once (202, no confirmation page); ``GET <link>``
(a person who clicked) shows a page whose button POSTs the same. The token is the link's last
path segment (mailpipe/verp.py: tenant, job and recipient, sealed and signed).

The suppression is written before the 202 (the next publish to the address is refused from
then on); the ``unsubscribed`` and ``suppressed`` events follow through the reports queue, so
they are published, confirmed, by the stage like every other report's.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import redis

from inbound.publisher import Publisher
from inbound.resolve import one_click
from inbound.wire import HTTP, RawReport, encode_report, report_id
from mailpipe import feedback, reputation, suppression
from mailpipe.amqp import Outgoing
from mailpipe.servers import ConfigWatcher
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from mailpipe.verp import Invalid, Signer, Token

log = logging.getLogger(__name__)

MAX_BODY = 4096
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{title}</title></head>
<body style="font-family: sans-serif; max-width: 36em; margin: 3em auto">
<h1>{title}</h1>
<p>{text}</p>
{form}
</body></html>
"""


class _SharedPortServer(ThreadingHTTPServer):
    allow_reuse_port = True  # the replicas on one host share the port (SO_REUSEPORT)


class UnsubscribeServer:
    def __init__(self, settings: Settings, topology: Topology, signer: Signer | None, publisher: Publisher,
                 client: redis.Redis) -> None:
        self.settings = settings
        self.topology = topology
        self.signer = signer
        self.publisher = publisher
        self.redis = client
        self.config = ConfigWatcher(settings.servers_path)
        self.policy = suppression.Policy.from_settings(settings)
        self.thresholds = reputation.Thresholds.from_settings(settings)
        self._server: _SharedPortServer | None = None

    def start(self) -> None:
        if self._server is not None:
            return
        app = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "mailpipe-inbound"

            def do_GET(self) -> None:
                status, body = app.page(self.path)
                self._reply(status, body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self._reply(413, _page("Too large", "This request is larger than an unsubscribe."))
                    return
                form = self.rfile.read(length).decode("utf-8", "replace")
                status, body = app.unsubscribe(self.path, form)
                self._reply(status, body)

            def _reply(self, status: int, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # the token is not for the logs
                pass

        self._server = _SharedPortServer((self.settings.inbound_smtp_host, self.settings.inbound_http_port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="inbound-http", daemon=True).start()
        log.info("inbound: one-click unsubscribe on %s:%d", self.settings.inbound_smtp_host,
                 self.settings.inbound_http_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def page(self, path: str) -> tuple[int, str]:
        token = self._token(path)
        if isinstance(token, Invalid):
            return 404, _page("Link not valid", "This unsubscribe link is not valid or has expired.")
        address = html.escape(token.recipient or "")
        form = ('<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
                f'<button type="submit">Unsubscribe {address}</button></form>')
        return 200, _page("Unsubscribe", f"Stop mail from this sender to {address}?", form)

    def unsubscribe(self, path: str, form: str) -> tuple[int, str]:
        token = self._token(path)
        if isinstance(token, Invalid):
            return 404, _page("Link not valid", "This unsubscribe link is not valid or has expired.")
        link = urlsplit(path).path.rstrip("/").rpartition("/")[2]
        raw = RawReport(id=report_id(b"http\0" + link.encode()), received_ms=int(time.time() * 1000), source=HTTP,
                        link=link)
        finding = one_click(token, raw.id, raw.received_ms)
        try:
            feedback.apply(self.redis, self.settings.namespace, finding, self.policy, self.thresholds)
            self.publisher.submit(Outgoing(self.topology.reports, encode_report(raw), message_id=raw.id)).result(30)
        except Exception as exc:  # Redis or RabbitMQ away: the client may try again, nothing half-done matters
            log.warning("inbound: one-click unsubscribe not recorded: %s", exc)
            return 503, _page("Try again", "We could not record this just now; please try again in a minute.")
        return 202, _page("Unsubscribed", f"{html.escape(finding.recipient)} will get no more of this sender's mail.")

    def _token(self, path: str) -> Token | Invalid:
        if self.signer is None:
            return Invalid("no keys configured")
        link = urlsplit(path).path.rstrip("/").rpartition("/")[2]
        token = self.signer.verify_link(link)
        if not isinstance(token, Invalid) and token.tenant not in self.config.current().tenants:
            return Invalid("unknown tenant")
        return token


def _page(title: str, text: str, form: str = "") -> str:
    return PAGE.format(title=html.escape(title), text=text, form=form)
