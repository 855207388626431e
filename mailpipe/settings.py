"""Process settings, read from ``MAILPIPE_*`` environment variables in ``main()``, never at import.

Every field has a working local default; units are in the names.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from mailpipe.errors import ConfigError

MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    # A RabbitMQ cluster: its nodes' URLs, comma-separated, tried in turn (amqp_url when empty).
    amqp_urls: str = ""
    # Members each quorum queue starts with; 0: every node of the cluster (RabbitMQ's default).
    quorum_group_size: int = 0
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Redis through Sentinel: its addresses ("host:port,host:port") and the primary's name;
    # redis_url then gives only the database, password and TLS.
    redis_sentinels: str = ""
    redis_master: str = "mailpipe"
    # Replicas that must hold a grant or a claim before it is used (Redis WAIT): a failover
    # then cannot forget it. 0: not waited for (one Redis, or the over-release accepted).
    redis_wait_replicas: int = 0
    # A Redis call that takes longer fails (RedisUnavailable): the stage backs off and fails
    # closed. The limiter waits at most LIMITER_REDIS_TIMEOUT_S, whatever this says: its loop
    # also serves RabbitMQ.
    redis_timeout_s: float = 5.0
    namespace: str = "mailpipe"
    servers_file: str = ""

    # Broker behaviour. RabbitMQ has no prefetch in bytes: a stage holds at most prefetch x
    # the largest message of its queue. Requests and jobs over large_message_bytes go on the
    # .large queues, consumed with large_prefetch: the producer holds at most
    # 500 x 256 KiB + 4 x 25 MiB (docs/design-notes.md, "Operating limits").
    prefetch: int = 500
    large_message_bytes: int = 256 * 1024
    large_prefetch: int = 4
    delivery_limit: int = 20
    reconnect_max_s: float = 10.0
    heartbeat_s: int = 30  # the broker closes a connection silent for about twice this

    # Intake.
    max_message_bytes: int = 25 * MIB
    max_recipients: int = 100
    idempotency_ttl_s: int = 24 * 3600
    idempotency_lease_s: float = 30.0  # a claimed key whose holder died is free again after this
    suppress_days: int = 30
    # Deliverability lint rules that refuse a mail; every other finding is a warning on the job.
    lint_refuse: str = "executable_attachment,script"

    # Packing.
    max_batch_mails: int = 500
    max_batch_bytes: int = 80 * MIB
    linger_ms: int = 500

    # Release and delivery.
    # A granted batch starts its mails within window_s of its grant (Redis time).
    window_s: float = 60.0
    # A server with a per-minute ceiling: its grants start their mails within this (at most
    # window_s), so that at most per_minute mails reach it in any 60 s at a cost of only
    # minute_window_s / 60 of its rate (limiter/gcra.py says why).
    minute_window_s: float = 5.0
    # What a server may receive at once above its rate. 0: one whole batch plus one window at
    # the server's rate, which the limiter keeps back from every grant (limiter/gcra.py).
    burst_mails: int = 0
    # Limiter: batches held unacked per replica (each up to max_batch_bytes in memory); a batch
    # not due within limiter_hold_s, or held that long, goes back into its lane.
    limiter_prefetch: int = 32
    limiter_hold_s: float = 120.0
    # A lane (a server's queue for one tenant, mailpipe/lanes.py) empty and untouched this long
    # is deleted; the next batch for it declares it again.
    lane_idle_s: float = 300.0
    # A tenant's transactional mail (priority "high") goes ahead of the line up to this share
    # of its server's rate and burst; above it, it waits in line as normal mail.
    high_priority_share: float = 0.1
    # Servers that push back (mailpipe/pushback.py): a server's effective rate is cut on a
    # throttling reply at most once per cut interval, never below the floor (this share of its
    # rate, at least 1 a minute), and grows by a step (this share) after a quiet period with that
    # many mails sent; a server is paused after pause_after broken replies in a row, probed after
    # a hold that doubles while the probe fails (up to hold_max), resumed at resume_at of its rate.
    pushback_cut_interval_s: float = 60.0
    pushback_floor: float = 0.05
    pushback_quiet_s: float = 300.0
    pushback_quiet_mails: int = 20
    pushback_step: float = 0.05
    pushback_pause_after: int = 3
    pushback_hold_s: float = 900.0
    pushback_hold_max_s: float = 4 * 3600.0
    pushback_resume_at: float = 0.25
    # After a rate signal no grant for this long (doubled while refusals go on, at most the cut
    # interval): a server whose window is full refuses all until it slides.
    pushback_backoff_s: float = 5.0
    send_concurrency: int = 4
    smtp_timeout_s: float = 30.0
    sent_mark_ttl_s: int = 7 * 24 * 3600  # how long a mail's claims and "sent" marks are kept
    # Sender: batches in flight per process, no mail started this close to a batch's deadline,
    # an SMTP connection unused this long is closed.
    send_prefetch: int = 4
    send_margin_s: float = 1.0
    smtp_idle_timeout_s: float = 60.0

    # Retries of 4xx replies: delay doubles from base to max; a mail older than max_age fails.
    retry_base_s: float = 60.0
    retry_max_s: float = 3600.0
    retry_max_age_s: float = 4 * 24 * 3600.0

    # Queue depth for /metrics: RabbitMQ's management API (ready and unacked); empty, or not
    # answering: passive declares over AMQP (ready only). Credentials: the URL's, else amqp_url's.
    rabbitmq_api_url: str = "http://127.0.0.1:15672"
    queue_metrics_cache_s: float = 5.0
    # Per-tenant series (releases, grant wait): one per tenant and server, so off by default.
    metrics_tenant_label: bool = False

    # -- After the 250: bounces, complaints, one-click unsubscribe (issue 23) ----------------------
    # The platform's return-path domain, whose MX is the inbound stage: mail through a platform
    # server gets a signed VERP envelope sender on it (mailpipe/verp.py). Empty: none on the
    # platform's servers (a server's own return_path_domain in the servers file still applies).
    return_path_domain: str = ""
    # Signing keys for return paths and unsubscribe links: "id:secret,id:secret" (id 0 to 255,
    # secret at least 16 characters); the first signs, every one verifies (rotation: put the new
    # key first, drop the old one after verp_valid_days). Or a file holding the same. Never logged.
    verp_keys: str = field(default="", repr=False)
    verp_keys_file: str = ""
    verp_valid_days: int = 30  # a return path is accepted this long after its mail was sent
    unsubscribe_valid_days: int = 60  # an unsubscribe link works this long
    # The one-click endpoint as recipients reach it (behind the platform's HTTPS), e.g.
    # https://mail.example.com/unsubscribe; empty: bulk mail carries the mailto link only.
    unsubscribe_url: str = ""
    # The inbound stage: SMTP for the return-path domains, HTTP for the unsubscribe endpoint.
    inbound_smtp_host: str = "0.0.0.0"
    inbound_smtp_port: int = 2525
    inbound_http_port: int = 8025
    inbound_max_bytes: int = 10 * MIB  # a larger report is refused (552) before it is stored
    # Feedback-loop addresses registered with providers (comma-separated, at our domains): taken
    # without a token at RCPT; what they bring counts only if the reported mail carries one.
    inbound_feedback_addresses: str = ""
    # Suppression per tenant and address (mailpipe/suppression.py).
    suppress_hard_days: int = 180
    soft_bounce_limit: int = 3  # soft bounces (one a day at most) that suppress ...
    soft_bounce_window_days: int = 30  # ... within this many days, for suppress_soft_days
    suppress_soft_days: int = 30
    suppress_hard_shared: bool = False  # a hard bounce suppresses the address for every tenant
    # A tenant that hurts everyone's deliverability (mailpipe/reputation.py): over its last
    # reputation_window_sends sends on the platform's servers, warn and pause at these ratios.
    reputation_window_sends: int = 1000
    reputation_min_sends: int = 200  # judged only with at least this many sends in the window
    reputation_warn_bounce_ratio: float = 0.05
    reputation_pause_bounce_ratio: float = 0.10
    reputation_warn_complaint_ratio: float = 0.001
    reputation_pause_complaint_ratio: float = 0.005
    reports_keep_days: int = 30  # raw reports in the <ns>.reports.archive stream

    # Process.
    shutdown_timeout_s: float = 30.0
    log_format: str = "text"
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``MAILPIPE_<FIELD>`` variables; a bad value names the variable."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for setting in fields(cls):
            name = f"MAILPIPE_{setting.name.upper()}"
            if name not in env:
                continue
            raw = env[name]
            kind: type = type(setting.default)
            try:
                values[setting.name] = _parse_bool(raw) if kind is bool else kind(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
        values.update(overrides)
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse at start a value that cannot work, naming the variable and the range that does."""
        # Each of these breaks at 0: a prefetch of 0 is RabbitMQ's "unlimited" (memory grows
        # with the queue); a TTL or lease of 0 deletes its key at once (or is a Redis error);
        # a reconnect backoff of 0 spins; a hold of 0 hands every batch back each round; a lane
        # idle for 0 s would be deleted between two batches; a minute's window of 0 grants
        # nothing a sender can start.
        positive = ("prefetch", "large_message_bytes", "large_prefetch", "delivery_limit",
                    "max_message_bytes", "max_recipients", "max_batch_mails", "max_batch_bytes",
                    "window_s", "send_concurrency", "smtp_timeout_s", "retry_base_s", "retry_max_s",
                    "redis_timeout_s",
                    "shutdown_timeout_s",
                    "send_prefetch", "limiter_prefetch", "limiter_hold_s", "lane_idle_s", "minute_window_s",
                    "pushback_cut_interval_s", "pushback_quiet_s", "pushback_pause_after", "pushback_hold_s",
                    "pushback_backoff_s",
                    "idempotency_ttl_s", "idempotency_lease_s", "suppress_days", "reconnect_max_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"MAILPIPE_{name.upper()} must be > 0, got {getattr(self, name)}")
        for setting in fields(self):
            value = getattr(self, setting.name)
            # nan passes every comparison above, and inf never ends retry_delays' doubling loop.
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"MAILPIPE_{setting.name.upper()} must be a finite number, got {value}")
            if isinstance(value, int | float) and value < 0:
                raise ConfigError(f"MAILPIPE_{setting.name.upper()} must not be negative, got {value}")
        for name in ("pushback_floor", "pushback_step", "pushback_resume_at"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"MAILPIPE_{name.upper()} must be in (0, 1] (a share of the configured rate), "
                                  f"got {getattr(self, name)}")
        if self.pushback_hold_max_s < self.pushback_hold_s:
            raise ConfigError(f"MAILPIPE_PUSHBACK_HOLD_MAX_S must be >= MAILPIPE_PUSHBACK_HOLD_S "
                              f"({self.pushback_hold_s:g}), got {self.pushback_hold_max_s:g}")
        if not 0 < self.high_priority_share <= 1:
            raise ConfigError(f"MAILPIPE_HIGH_PRIORITY_SHARE must be in (0, 1], got {self.high_priority_share}")
        if self.max_message_bytes > self.max_batch_bytes:
            raise ConfigError("MAILPIPE_MAX_MESSAGE_BYTES must not exceed MAILPIPE_MAX_BATCH_BYTES")
        if not self.namespace.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"MAILPIPE_NAMESPACE={self.namespace!r}: letters, digits, - and _ only")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"MAILPIPE_LOG_FORMAT={self.log_format!r}: expected text or json")
        levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        if self.log_level.upper() not in levels:
            raise ConfigError(f"MAILPIPE_LOG_LEVEL={self.log_level!r}: expected one of {', '.join(levels)}")
        # No mail may start later than window - margin: with nothing left, every batch is late
        # and loops through refund and re-grant forever.
        if self.send_margin_s >= self.window_s:
            raise ConfigError(f"MAILPIPE_SEND_MARGIN_S must be below MAILPIPE_WINDOW_S ({self.window_s:g}), "
                              f"got {self.send_margin_s:g}")
        if min(self.minute_window_s, self.window_s) <= self.send_margin_s:
            raise ConfigError(f"MAILPIPE_MINUTE_WINDOW_S must be above MAILPIPE_SEND_MARGIN_S "
                              f"({self.send_margin_s:g}): a server with a per-minute ceiling gets that window "
                              f"(at most MAILPIPE_WINDOW_S), got {self.minute_window_s:g}")
        # A claim is leased until its batch's deadline plus the SMTP timeout: a claim hash that
        # expired sooner would let a second holder send what the first still has.
        lease_s = self.window_s + self.smtp_timeout_s
        if self.sent_mark_ttl_s <= lease_s:
            raise ConfigError(f"MAILPIPE_SENT_MARK_TTL_S must be > MAILPIPE_WINDOW_S + MAILPIPE_SMTP_TIMEOUT_S "
                              f"({lease_s:g}, a claim's longest lease), got {self.sent_mark_ttl_s}")
        if self.redis_sentinels.strip() and not self.redis_master:
            raise ConfigError("MAILPIPE_REDIS_MASTER must name the primary when MAILPIPE_REDIS_SENTINELS is set")

    def window_reserve(self, rate_per_hour: int, window_s: float | None = None) -> int:
        """Mails a server's rate sends in one delivery window (``window_s`` by default): no grant
        may use them."""
        window = self.window_s if window_s is None else window_s
        return math.ceil(rate_per_hour * window / 3600 - 1e-9)

    def burst(self, rate_per_hour: int) -> int:
        """The burst a server may receive above its rate (see ``burst_mails``)."""
        return self.burst_mails or self.max_batch_mails + self.window_reserve(rate_per_hour)

    @property
    def amqp_endpoints(self) -> tuple[str, ...]:
        """The AMQP URLs to try, in order."""
        urls = tuple(u.strip() for u in self.amqp_urls.split(",") if u.strip())
        return urls or (self.amqp_url,)

    @property
    def servers_path(self) -> Path | None:
        return Path(self.servers_file) if self.servers_file else None

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _parse_bool(raw: str) -> bool:
    """bool("0") is True: read the words people write instead."""
    word = raw.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)


def redact_url(url: str) -> str:
    """The URL without its password, for logs and status output."""
    parts = urlsplit(url)
    if parts.password is None:
        # A password holding an unencoded / ? or # ends urlsplit's netloc early: hide all of
        # "user:pass..." up to the last @ rather than log it.
        scheme, sep, rest = url.partition("://")
        userinfo, at, after = rest.rpartition("@")
        if sep and at and ":" in userinfo:
            return f"{scheme}://***@{after}"
        return url
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address keeps its brackets
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # a malformed port: show nothing rather than fail while logging
        return f"{parts.scheme}://***"
    if port:
        host = f"{host}:{port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))
