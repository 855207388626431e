"""The inbound stage's SMTP receiver (aiosmtpd, a thread of its own): mail for the return-path
domains, refused at RCPT unless it carries a valid token (so we never accept and then bounce:
no backscatter), capped in size (552 past ``inbound_max_bytes``), and answered 250 only once
the raw report is confirmed by RabbitMQ (nothing accepted is lost; anything else is 4xx, and
the reporting server tries again).

At RCPT, in order: the domain must be one of ours (no relay); the local part a return-path or
mailto-unsubscribe token that verifies (tenant known, signature, within its validity) and has
not brought its final report yet (a replay), or one of the feedback-loop addresses (and
postmaster, RFC 5321), whose reports count only if the reported mail carries a token.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any

import redis
import redis.asyncio
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from prometheus_client import Counter

from inbound.publisher import Publisher
from inbound.wire import SMTP as SOURCE_SMTP
from inbound.wire import RawReport, encode_report, report_id
from mailpipe import redis_client
from mailpipe.amqp import Outgoing
from mailpipe.servers import Config, ConfigWatcher
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from mailpipe.verp import Invalid, Signer

log = logging.getLogger(__name__)

RCPT = Counter("mailpipe_inbound_rcpt_total", "RCPT commands the receiver answered, by outcome.", ["outcome"])
MAILS = Counter("mailpipe_inbound_mails_total", "Mails the receiver took (queued) or not, by outcome.", ["outcome"])
CONFIRM_TIMEOUT_S = 30.0
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# <dot-atom@dot-atom>, then nothing, or blanks and a parameter (printable ASCII, not a comment):
# RFC 5322's parser reads it as itself, and the rest without its leading blanks.
_PLAIN_ADDRESS = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?=\Z|[ \t]+(?:\Z|[\x21-\x27\x29-\x7e]))")


def spent_key(namespace: str, token_id: str) -> str:
    """Set once a return path has brought its final report (a bounce, a complaint, an unsubscribe)."""
    return f"{namespace}:token-spent:{token_id}"


class Handler:
    def __init__(self, settings: Settings, topology: Topology, signer: Signer | None, publisher: Publisher) -> None:
        self.settings = settings
        self.topology = topology
        self.signer = signer
        self.publisher = publisher
        self.config = ConfigWatcher(settings.servers_path)
        self.feedback = {a.strip().lower() for a in settings.inbound_feedback_addresses.split(",") if a.strip()}
        self._redis: redis.asyncio.Redis | None = None
        self._asking: list[tuple[str, asyncio.Future[bool]]] = []  # spent checks for the next MGET
        self._asker: asyncio.Task[None] | None = None
        self._domains_of: Config | None = None
        self._domains: frozenset[str] = frozenset()
        self._tenants: tuple[str, ...] = ()

    def refusal(self, address: str) -> tuple[str, str | None]:
        """("", token id or None) to take ``address``, or (the reply, None) to refuse it."""
        local, at, domain = address.strip().strip("<>").rpartition("@")
        domain = domain.lower().rstrip(".")
        config = self.config.current()
        if config is not self._domains_of:  # a reloaded servers file: its domains and tenants once
            self._domains_of, self._domains = config, config.return_path_domains(self.settings.return_path_domain)
            self._tenants = tuple(config.tenants)
        if not at or domain not in self._domains:
            return f"550 5.7.1 <{address}>: relay access denied (we take mail for our return paths only)", None
        if local.lower() == "postmaster" or f"{local}@{domain}".lower() in self.feedback:
            return "", None
        if self.signer is None:
            return "550 5.7.1 No return paths are configured here (MAILPIPE_VERP_KEYS)", None
        verdict = self.signer.verify(local, self._tenants)
        if isinstance(verdict, Invalid):
            return f"550 5.1.1 <{address}>: not a valid return path: {verdict.reason}", None
        return "", verdict.id

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        refusal, token_id = self.refusal(address)
        if not refusal and token_id is not None:
            try:
                if await self._spent(spent_key(self.settings.namespace, token_id)):
                    refusal = f"550 5.7.1 <{address}>: this return path has brought its report already"
            except (redis.RedisError, OSError) as exc:
                log.warning("inbound: cannot check a return path's use: %s", exc)
                RCPT.labels("unavailable").inc()
                return "451 4.3.0 Try again later"
        if refusal:
            RCPT.labels("refused").inc()
            log.info("refused RCPT %s: %s", address[:200], refusal, extra={"peer": str(session.peer)})
            return refusal
        RCPT.labels("accepted").inc()
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or envelope.content or b""
        raw = bytes(data) if isinstance(data, bytes | bytearray) else str(data).encode("utf-8", "surrogateescape")
        report = RawReport(id=report_id(raw), received_ms=int(time.time() * 1000), source=SOURCE_SMTP, data=raw,
                           mail_from=str(envelope.mail_from or ""), rcpts=tuple(envelope.rcpt_tos),
                           peer=str(session.peer[0]) if isinstance(session.peer, tuple) else str(session.peer),
                           helo=str(session.host_name or "")[:1000])
        done = self.publisher.submit(Outgoing(self.topology.reports, encode_report(report), message_id=report.id))
        try:
            await asyncio.wait_for(asyncio.wrap_future(done), CONFIRM_TIMEOUT_S)
        except Exception as exc:  # not confirmed: not ours yet, the sender keeps it and retries
            MAILS.labels("unavailable").inc()
            log.warning("inbound: report not stored (%s): answered 451", exc)
            return "451 4.3.0 Not stored, please try again later"
        MAILS.labels("queued").inc()
        return f"250 2.0.0 Ok: queued as {report.id}"

    async def _spent(self, key: str) -> bool:
        """Whether ``key`` (a return path's spent mark) is set. The RCPTs of every session that
        ask at one moment share one MGET: a call through redis.asyncio costs about 90 us of CPU
        whatever it asks, as much as the rest of a RCPT."""
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._asking.append((key, answer))
        if self._asker is None:
            self._asker = asyncio.get_running_loop().create_task(self._ask())
        return await answer

    async def _ask(self) -> None:
        try:
            while self._asking:
                asking, self._asking = self._asking, []
                try:
                    values = await self._client().mget([key for key, _ in asking])
                except Exception as exc:  # Redis away (or a bug): each RCPT answers for itself
                    for _, answer in asking:
                        if not answer.done():
                            answer.set_exception(exc)
                    continue
                for (_, answer), value in zip(asking, values, strict=True):
                    if not answer.done():  # its session may be gone
                        answer.set_result(value is not None)
        finally:
            self._asker = None

    def _client(self) -> redis.asyncio.Redis:
        if self._redis is None:
            self._redis = redis_client.connect_async(self.settings)
        return self._redis


class _SMTP(SMTP):
    """aiosmtpd's SMTP but for the address of MAIL and RCPT, a fifth of this thread's time
    (py-spy): aiosmtpd 1.4's ``_getaddr`` declares a typing.Protocol class on every call,
    then reads the address with the email package's RFC 5322 parser. Here the same parse without
    the class, and for the plain ``<local@domain>`` every report comes with (and the null
    sender), the answer that parser gives, read by a regular expression.
    tests/unit/test_inbound_receiver.py holds it to aiosmtpd's own answers."""

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        if not arg:
            return "", ""
        if arg.startswith("<>"):
            return "<>", arg[2:]
        plain = _PLAIN_ADDRESS.match(arg)
        address: str | None
        rest: str | None
        if plain is not None:
            address, rest = plain.group(1), arg[plain.end():].lstrip(" \t")
        else:
            address, rest = self._parsed(arg)
        if address is None:
            return None, None
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    @staticmethod
    def _parsed(arg: str) -> tuple[str | None, str | None]:
        try:
            if arg.lstrip().startswith("<"):
                angle, rest = get_angle_addr(arg)
                address = angle.addr_spec
            else:
                spec, rest = get_addr_spec(arg)
                address = spec.addr_spec
        except HeaderParseError:
            return None, None
        return address, rest


class _SharedPortController(Controller):
    """aiosmtpd's Controller, its port shared (SO_REUSEPORT) by the replicas on one host: the
    kernel spreads the connections between them, as between pods behind a Service."""

    def factory(self) -> SMTP:
        return _SMTP(self.handler, **self.SMTP_kwargs)

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, host=self.hostname, port=self.port,
                                       ssl=self.ssl_context, reuse_port=True)


class Receiver:
    """The SMTP server on its own thread and loop (aiosmtpd's Controller)."""

    def __init__(self, settings: Settings, topology: Topology, signer: Signer | None, publisher: Publisher) -> None:
        self.handler = Handler(settings, topology, signer, publisher)
        kwargs: dict[str, Any] = {"data_size_limit": settings.inbound_max_bytes, "ident": "mailpipe inbound"}
        if settings.return_path_domain:
            kwargs["server_hostname"] = settings.return_path_domain
        self.controller = _SharedPortController(self.handler, hostname=settings.inbound_smtp_host,
                                                 port=settings.inbound_smtp_port, **kwargs)
        self.running = False

    def start(self) -> None:
        if not self.running:
            self.controller.start()
            self.running = True
            log.info("inbound: SMTP on %s:%d", self.controller.hostname, self.controller.port)

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.controller.stop()
