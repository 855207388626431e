"""What every stage process shares: connect, consume, hand deliveries to the stage, reconnect
with a capped backoff, serve metrics and health, and stop cleanly on SIGTERM.

A stage subclasses ``Stage`` and reads top to bottom in its ``handle``: decide, publish
(confirmed), then ack. The runner never acks for it.

An error that reaches the runner drops the session: everything the stage held unacked is
redelivered, and counted towards the delivery limit. So a stage that needs Redis for a message
does not raise while Redis is away: it holds the message unacked and asks Redis again with a
backoff (``RedisOutage``, below), as the limiter does.
"""

from __future__ import annotations

import logging
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import FrameType
from typing import Any, ClassVar

from prometheus_client import Gauge

from mailpipe import metrics
from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.errors import ConfigError, MailpipeError, RedisUnavailable, TransientError
from mailpipe.model import Category
from mailpipe.settings import Settings
from mailpipe.topology import DEAD_REASON, DEAD_STAGE, Topology

log = logging.getLogger(__name__)

POLL_S = 0.05
_LOG_RECORD_KEYS = {*logging.makeLogRecord({}).__dict__, "message", "asctime"}


class Stage(ABC):
    name: ClassVar[str]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topology = Topology.from_settings(settings)

    @property
    @abstractmethod
    def input_queue(self) -> str: ...

    @property
    def prefetch(self) -> int:
        return self.settings.prefetch

    @property
    def inputs(self) -> list[tuple[str, int]]:
        """Every queue the stage consumes, each with its own prefetch (one consumer per queue:
        RabbitMQ applies a per-consumer prefetch, pika's ``global_qos=False``). A stage's memory
        is bounded by the sum of prefetch x the largest message of each queue."""
        return [(self.input_queue, self.prefetch)]

    def start(self, broker: Broker) -> None:
        """Called after every (re)connect. Whatever was unacked before is redelivered: forget it."""

    @abstractmethod
    def handle(self, broker: Broker, deliveries: list[Delivery]) -> None:
        """Process deliveries: publish outputs (confirmed), then ack the inputs."""

    def tick(self, broker: Broker) -> None:
        """Called about every 50 ms, for timers (a batch's linger, a grant's wait)."""

    def drain(self, broker: Broker, deadline: float) -> None:
        """Consuming has stopped: finish or give back in-flight work before ``deadline`` (monotonic)."""

    def busy(self) -> bool:
        """True while the stage holds unacked work (burst mode waits for it)."""
        return False

    def ready(self) -> bool:
        """Extra readiness beyond the broker connection (Redis, for example)."""
        return True

    def close(self) -> None:
        """Release what the stage opened itself (Redis, SMTP connections)."""

    def dead_letter(self, body: bytes, reason: str, category: str, **headers: Any) -> Outgoing:
        """The message for the dead-letter queue: the original bytes and why they are there."""
        metrics.DEAD_LETTERS.labels(self.name, category).inc()
        # JSON log fields as snake case: "x-mailpipe-job-id" -> "job_id", like every other line.
        fields = {k.removeprefix("x-mailpipe-").replace("-", "_"): v for k, v in headers.items()}
        fields = {(f"header_{k}" if k in _LOG_RECORD_KEYS else k): v for k, v in fields.items()}  # "msg" raises
        log.warning("dead-lettered: %s", reason, extra={"stage": self.name, "category": category, **fields})
        return Outgoing(self.topology.dead, body, headers={
            DEAD_REASON: reason, DEAD_STAGE: self.name, "x-mailpipe-category": category,
            "x-mailpipe-at-ms": int(time.time() * 1000), **headers})


# -- waiting for Redis: a stage fails closed and keeps its session ---------------------------------

FAILING_CLOSED = Gauge("mailpipe_failing_closed",
                       "1 while Redis does not answer: the stage holds the input that needs it unacked "
                       "(none of it lost or dead-lettered) and asks Redis again with a backoff.", ["stage"])
WAITING_FOR_REDIS = Gauge("mailpipe_waiting_for_redis_messages",
                          "Messages a stage holds unacked until Redis answers again.", ["stage"])
REDIS_BACKOFF_MIN_S = 0.5
REDIS_BACKOFF_MAX_S = 5.0  # back to work within seconds of Redis answering again


class RedisOutage:
    """A stage's view of Redis while it does not answer, so that the stage holds its messages
    rather than raising (which would drop the session and have the whole unacked window
    redelivered, and counted, about once a second: a few minutes of outage reach the delivery
    limit). One warning when an outage starts, one line when it ends, ``mailpipe_failing_closed``
    meanwhile.

    The stage calls ``failed`` on a RedisUnavailable, holds what needed Redis, and asks again
    once ``retry()`` says so (after a backoff doubling from REDIS_BACKOFF_MIN_S to
    REDIS_BACKOFF_MAX_S); while that try is under way ``ask()`` is True, and ``tried()`` ends the
    outage if nothing failed meanwhile: a Redis that answers PING but not the stage's calls (its
    writes paused, say) is still the same outage.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.down = False
        self.trying = False
        self.since = 0.0
        self.retry_at = 0.0
        self.backoff_s = REDIS_BACKOFF_MIN_S
        FAILING_CLOSED.labels(stage).set(0)
        WAITING_FOR_REDIS.labels(stage).set(0)

    def ask(self) -> bool:
        """Whether to call Redis now: it answered last time, or a try is under way."""
        return not self.down or self.trying

    def failed(self, exc: RedisUnavailable, holding: str) -> None:
        now = time.monotonic()
        if not self.down:
            self.down, self.since, self.backoff_s = True, now, REDIS_BACKOFF_MIN_S
            FAILING_CLOSED.labels(self.stage).set(1)
            log.warning("waiting for Redis, %s, asking again every %g s at most: %s", holding,
                        REDIS_BACKOFF_MAX_S, exc.reason, extra={"stage": self.stage})
        self.trying = False
        self.retry_at = now + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, REDIS_BACKOFF_MAX_S)

    def retry(self) -> bool:
        """Down, and its backoff is over: a try starts (``ask()`` is True until it fails)."""
        if self.down and time.monotonic() >= self.retry_at:
            self.trying = True
        return self.trying

    def tried(self, done: str) -> None:
        """The try is over: if nothing failed during it, so is the outage."""
        if not self.trying:
            return
        log.info("Redis answers again after %.0f s: %s", time.monotonic() - self.since, done,
                 extra={"stage": self.stage})
        metrics.RECONNECTS.labels(self.stage, "redis").inc()
        FAILING_CLOSED.labels(self.stage).set(0)
        self.down = self.trying = False
        self.backoff_s = REDIS_BACKOFF_MIN_S

    def holding(self, messages: int) -> None:
        WAITING_FOR_REDIS.labels(self.stage).set(messages)


class _StopFlag:
    def __init__(self) -> None:
        self.stopping = False

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: draining in-flight work, then exiting", signal.Signals(signum).name)
        self.stopping = True


def run(stage: Stage, *, burst: bool = False, metrics_port: int | None = None,
        idle_exit_s: float = 1.0, stop: Callable[[], bool] | None = None) -> int:
    """Run ``stage`` until SIGTERM/SIGINT (or, in burst mode, until its queue is drained):
    one connected session after another, with a capped backoff between them.

    Returns the process exit code: 0 after a clean stop.
    """
    settings = stage.settings
    flag = _StopFlag()
    signal.signal(signal.SIGTERM, flag)
    signal.signal(signal.SIGINT, flag)
    should_stop = stop or (lambda: flag.stopping)
    broker = Broker(settings.amqp_endpoints, client_name=f"mailpipe-{stage.name}",
                    heartbeat_s=settings.heartbeat_s, stage=stage.name)
    session = _Session(stage, broker, should_stop, burst, idle_exit_s)
    if metrics_port is not None:
        from mailpipe import queue_metrics

        queue_metrics.register(settings)  # queue depths and server limits, asked at scrape time
        metrics.serve(metrics_port, lambda: session.connected and broker.is_open and stage.ready())
    backoff_s = 0.2
    try:
        while not should_stop() and not session.drained:
            try:
                session.run()
                backoff_s = 0.2
            except ConfigError:
                raise  # a wrong setting or topology: retrying cannot help
            except Exception as exc:
                # Nothing else stops the stage, a bug of ours included: what it held unacked is
                # redelivered, and a message that fails every time is dead-lettered by _handle
                # on its last delivery.
                session.lost()
                if isinstance(exc, TransientError):
                    log.warning("%s (retrying in %.1f s)", exc.reason, backoff_s)
                else:
                    log.exception("%s failed unexpectedly (retrying in %.1f s)", stage.name, backoff_s)
                broker.abort()  # a graceful close could wait on a broker that cannot answer
                _sleep_unless(should_stop, backoff_s)
                backoff_s = min(backoff_s * 2, settings.reconnect_max_s)
    except MailpipeError as exc:
        log.error("%s stopped: %s", stage.name, exc.reason)
        return 2
    finally:
        metrics.READY.labels(stage.name).set(0)
        stage.close()
        broker.close()
    log.info("%s stopped cleanly", stage.name)
    return 0


class _Session:
    """One connection's life: connect, declare, start the stage, consume and hand deliveries
    over until asked to stop (or, in burst mode, until the input is drained), then drain."""

    def __init__(self, stage: Stage, broker: Broker, should_stop: Callable[[], bool], burst: bool,
                 idle_exit_s: float) -> None:
        self.stage = stage
        self.broker = broker
        self.should_stop = should_stop
        self.burst = burst
        self.idle_exit_s = idle_exit_s
        self.connected = False
        self.drained = False  # burst mode: the input is empty, the process exits
        self.failures = 0  # sessions lost in a row

    def run(self) -> None:
        stage, broker = self.stage, self.broker
        broker.connect()
        stage.topology.declare(broker.channel())
        stage.start(broker)
        for queue, prefetch in stage.inputs:
            broker.consume(queue, prefetch)
        self.connected = True
        metrics.READY.labels(stage.name).set(1)
        if self.failures:
            metrics.RECONNECTS.labels(stage.name, "rabbitmq").inc()
            log.info("reconnected to RabbitMQ after %d attempt(s)", self.failures)
        self.failures = 0
        log.info("%s consuming %s", stage.name,
                 ", ".join(f"{queue} (prefetch {prefetch})" for queue, prefetch in stage.inputs))
        idle_since = time.monotonic()
        while not self.should_stop():
            deliveries = broker.poll(POLL_S)
            if deliveries:
                metrics.MESSAGES_IN.labels(stage.name).inc(len(deliveries))
                with metrics.HANDLE_SECONDS.labels(stage.name).time():
                    _handle(stage, broker, deliveries)
                idle_since = time.monotonic()
            stage.tick(broker)
            if stage.busy():
                idle_since = time.monotonic()
            elif self.burst and time.monotonic() - idle_since > self.idle_exit_s:
                log.info("burst mode: %s is drained, exiting", ", ".join(queue for queue, _ in stage.inputs))
                self.drained = True
                break
        broker.stop_consuming()
        stage.drain(broker, time.monotonic() + stage.settings.shutdown_timeout_s)

    def lost(self) -> None:
        self.connected = False
        self.failures += 1
        metrics.READY.labels(self.stage.name).set(0)


def _handle(stage: Stage, broker: Broker, deliveries: list[Delivery]) -> None:
    """Hand deliveries to the stage. Redelivered ones (after a crash) go one at a time, so the
    one that crashes the stage again is known: on its last delivery before the delivery limit
    it is dead-lettered with the error, rather than by RabbitMQ without a reason, and the
    innocent messages of the same unacked window are not counted with it again."""
    fresh = [d for d in deliveries if not d.redelivered]
    if fresh:
        stage.handle(broker, fresh)
    for delivery in (d for d in deliveries if d.redelivered):
        try:
            stage.handle(broker, [delivery])
        except TransientError:
            raise
        except Exception as exc:
            if delivery.delivery_count < stage.settings.delivery_limit:
                raise
            reason = (f"{stage.name} failed on this message {delivery.delivery_count + 1} times: "
                      f"{type(exc).__name__}: {exc}")
            log.exception("poison message: %s", reason)
            broker.publish([stage.dead_letter(delivery.body, reason, Category.POISON)])
            broker.ack(delivery.tag)


def _sleep_unless(should_stop: Callable[[], bool], seconds: float) -> None:
    end = time.monotonic() + seconds
    while not should_stop() and time.monotonic() < end:
        time.sleep(min(0.05, end - time.monotonic()))


def main(stage_class: Callable[[Settings], Stage], argv: list[str] | None = None) -> int:
    """``python -m STAGE [--burst] [--metrics-port N]``: settings from the environment, then run."""
    import argparse

    from mailpipe import logs
    from mailpipe.errors import ConfigError

    parser = argparse.ArgumentParser(prog=getattr(stage_class, "name", "stage"))
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve /metrics, /healthz and /readyz on this port")
    parser.add_argument("--burst", action="store_true",
                        help="exit once the input queue is drained and nothing is in flight")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"mailpipe: {exc.reason}")
        return 2
    logs.setup(settings.log_format, settings.log_level, getattr(stage_class, "name", ""))
    try:
        stage = stage_class(settings)
    except ConfigError as exc:
        log.error("cannot start: %s", exc.reason)
        return 2
    return run(stage, burst=args.burst, metrics_port=args.metrics_port)
