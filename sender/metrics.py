"""The sender's Prometheus metrics (names ``mailpipe_<noun>_<unit|total>``)."""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

MAILS = Counter("mailpipe_sender_mails_total",
                "Recipients by outcome (sent, deferred, failed, expired, skipped) and category.",
                ["server", "outcome", "category"])
REPLY_SECONDS = Histogram("mailpipe_smtp_reply_seconds", "Time to an SMTP server's reply, by command.",
                          ["server", "command"],
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
CONNECTIONS = Counter("mailpipe_smtp_connections_total",
                      "SMTP connections opened, or failed to open (by category).", ["server", "result"])
WINDOW_USED_SECONDS = Histogram("mailpipe_sender_window_used_seconds",
                                "Seconds from a batch's grant to the end of its delivery.", ["server"],
                                buckets=(1, 5, 10, 20, 30, 40, 50, 60, 75, 90, 120))
WINDOW_OVERRUNS = Counter("mailpipe_sender_window_overruns_total",
                          "Batches whose delivery ended after their deadline.", ["server"])
REFUNDS = Counter("mailpipe_sender_refunds_total",
                  "Mails handed back to the limiter unattempted (their tokens refunded).",
                  ["server", "reason"])
LATENCY_SECONDS = Histogram("mailpipe_mail_latency_seconds",
                            "From a job's creation to the server's 250.", ["server"],
                            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600))
RETRIES = Counter("mailpipe_sender_retries_total",
                  "Recipients sent to a retry queue, by the attempt they will make (10 means 10 or more).",
                  ["server", "attempt"])
MARK_ERRORS = Counter("mailpipe_sender_mark_errors_total",
                      "Redis failures claiming, marking, deferring or releasing recipients "
                      "(claim, write, defer, release).", ["operation"])
UNRELEASED = Gauge("mailpipe_sender_unreleased_claims",
                   "Claims of finished batches that Redis has not taken the release of yet (tried again "
                   "every second; meanwhile their recipients wait for the claims' lease).")
SIGNALS = Counter("mailpipe_server_signals_total",
                  "Replies that say something about a server's pace (mailpipe/pushback.py), by class "
                  "(rate, connections, server_broken) and the rule that said so (mailpipe/replies.toml).",
                  ["server", "signal", "rule"])
PACE_CHANGES = Counter("mailpipe_server_pace_changes_total",
                       "Changes of a server's pace this sender's reports caused: cut, grew, cap, paused, resumed.",
                       ["server", "kind"])


# The labelled children of the per-mail metrics, looked up once per label set: a labels() call
# costs a lock, a tuple and a dict lookup (8-12 µs of the sender's CPU per mail in all, profiled).
# Never removed: a server's series lives as long as the process, as before.
@functools.cache
def reply_seconds(server: str, command: str) -> Histogram:
    return REPLY_SECONDS.labels(server, command)


@functools.cache
def latency_seconds(server: str) -> Histogram:
    return LATENCY_SECONDS.labels(server)


@functools.cache
def mails(server: str, outcome: str, category: str) -> Counter:
    return MAILS.labels(server, outcome, category)
