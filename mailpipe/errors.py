"""mailpipe's own exceptions: one root, split by what the caller should do next.

TransientError: try again later (the broker, Redis or an SMTP server is unreachable, a 4xx).
PermanentError: trying again cannot help (bad input, a 5xx, a wrong configuration).
Library errors are translated into these where they enter our code, with ``from exc``.
"""

from __future__ import annotations


class MailpipeError(Exception):
    """Root of every error mailpipe raises on purpose."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransientError(MailpipeError):
    """The same action may succeed later."""


class PermanentError(MailpipeError):
    """The same action will fail again: do not retry, report the reason."""


class ConfigError(PermanentError, ValueError):
    """A setting or the servers file is wrong; the reason names the field."""


class InvalidMessage(PermanentError, ValueError):
    """Bytes that do not decode, or a job that does not validate; the reason names the field."""


class BrokerUnavailable(TransientError, ConnectionError):
    """RabbitMQ cannot be reached, or the connection was lost mid-operation."""


class PublishRejected(TransientError):
    """The broker nacked a publish more times than we retry it."""


class Unroutable(PermanentError):
    """The broker returned a mandatory publish: the target queue does not exist."""


class RedisUnavailable(TransientError, ConnectionError):
    """Redis cannot be reached, or would not keep a write (too few replicas acknowledged it):
    every stage fails closed: the limiter releases nothing, the sender sends nothing, the
    intake queues nothing it cannot dedupe."""


class ServerPaused(MailpipeError):
    """The server is paused (mailpipe/pushback.py): a batch for it sends nothing, it all goes back."""


class SmtpError(MailpipeError):
    """An SMTP exchange went wrong; carries the reply so the tenant learns why."""

    def __init__(self, reason: str, *, code: int = 0, text: str = "", category: str = "", phase: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.text = text
        self.category = category
        self.phase = phase  # where in the session (mailpipe/replies.py PHASES), when known


class SmtpTransient(SmtpError, TransientError):
    """A 4xx reply or a connection-level failure: retry later."""


class SmtpPermanent(SmtpError, PermanentError):
    """A 5xx reply: the mail fails with the server's reply."""


class PrometheusError(MailpipeError):
    """Prometheus did not answer, or refused a query (``mailpipe report``)."""


class ClusterError(MailpipeError):
    """The local development cluster (mailpipe.devcluster) did not come up, or a member did not
    do what was asked (start, stop, fail over) in time; the reason says which."""
