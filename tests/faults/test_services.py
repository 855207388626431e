"""RabbitMQ restarted and Redis stopped under load, each a private server of the test's own (the
shared ones are never touched): every confirmed job delivered, every stage back by itself, no
release above the rate, and no password of any of them in any log line."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pika
import pytest
import redis

from limiter.redis_limiter import server_prefix
from mailpipe.codec import decode_intake, items_of
from mailpipe.errors import BrokerUnavailable
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from producer import Producer
from tests.faults.harness import (
    LedgerPeer,
    Pipeline,
    PrivateRabbit,
    PrivateRedis,
    ledger,
    mails,
    publish,
    settle,
    wait_until,
    write_servers,
)
from tests.smtp_peer import TestCerts, make_test_ca

pytestmark = [pytest.mark.faults, pytest.mark.integration]

AMQP_PASSWORD = "amqp-S3cret-7f3a"
REDIS_PASSWORD = "redis-S3cret-91c2"
SMTP_PASSWORD = "smtp-S3cret-44d1"
SECRETS = (AMQP_PASSWORD, REDIS_PASSWORD, SMTP_PASSWORD)


def with_auth_server(settings: Settings, port: int, certs: TestCerts) -> dict[str, str]:
    """A servers file whose server needs AUTH (over STARTTLS: credentials never go in clear);
    returns the environment holding its credentials."""
    write_servers(settings, port, server=(
        f'[servers.tenant-smtp]\naddress = "[127.0.0.1]:{port}"\ntls = "starttls"\nca_file = "{certs.ca_file}"\n'
        'unlimited = true\ncredentials_env = "FAULTS_SMTP"\n\n'
        '[tenants.acme]\nserver = "tenant-smtp"\ndaily_limit = 1000000\n'))
    return {"FAULTS_SMTP": f"mailer {SMTP_PASSWORD}"}


def assert_no_secrets(log_dir: Path) -> None:
    hits = [(p.name, s) for p in log_dir.glob("*.log") for s in SECRETS
            if s in p.read_text(errors="replace")]
    assert hits == [], f"secrets in the logs: {hits}"


def test_rabbitmq_restart_under_load(settings: Settings, tmp_path: Path) -> None:
    """A private node, restarted with ``rabbitmqctl stop_app``/``start_app`` while 1,500 mails
    flow (2 replicas of each stage) and down for 5 s. The AMQP and Redis URLs carry passwords, the
    SMTP server needs AUTH, stages log at DEBUG: none of the three passwords appears in a log."""
    logs = tmp_path / "logs"
    logs.mkdir()
    certs = make_test_ca(tmp_path / "ca")
    with PrivateRabbit(tmp_path / "rabbit") as rabbit, PrivateRedis(tmp_path) as private_redis, \
            LedgerPeer(auth={"mailer": SMTP_PASSWORD}, starttls_context=certs.server_context()) as peer:
        rabbit.ctl("add_user", "mailpipe", AMQP_PASSWORD)
        rabbit.ctl("set_permissions", "-p", "/", "mailpipe", ".*", ".*", ".*")
        private_redis.require_password(REDIS_PASSWORD)
        settings = settings.replace(amqp_url=f"amqp://mailpipe:{AMQP_PASSWORD}@127.0.0.1:{rabbit.port}/",
                                    redis_url=f"redis://:{REDIS_PASSWORD}@127.0.0.1:{private_redis.port}/0",
                                    reconnect_max_s=1.0, log_level="DEBUG")
        env = with_auth_server(settings, peer.port, certs)
        with Pipeline(settings, logs, replicas=2, env=env) as pipeline:
            published = publish(settings, mails(1000))
            wait_until(lambda: len(peer.accepted) >= 200, 60, "mail flowing", pipeline)
            rabbit.stop_app()
            time.sleep(5)
            rabbit.start_app()
            published += publish(settings, mails(500))
            settle(peer, published, 120, pipeline, rabbit=rabbit)
            reconnected = [n for n in pipeline.names
                           if "reconnected to RabbitMQ" in (logs / f"{n}.log").read_text(errors="replace")]
        report = ledger(settings, peer, published)
    print(report.summary())
    assert sorted(reconnected) == sorted(pipeline.names), f"every stage reconnects by itself\n{pipeline.logs()}"
    assert not report.lost and not report.failed and not report.unexpected, report.summary()
    assert not report.unexplained, f"a broker restart must not send a mail twice\n{report.summary()}"
    assert_no_secrets(logs)


def released_per_bucket(client: redis.Redis, namespace: str, server: str) -> dict[int, int]:
    """The limiter's own record of releases: mails per 10 s bucket of Redis time."""
    found: dict[bytes, bytes] = client.hgetall(f"{server_prefix(namespace, server)}:released")  # type: ignore[assignment]
    raw = {k.decode(): int(v) for k, v in found.items()}
    return {raw[f"b{i}"]: raw.get(f"c{i}", 0) for i in range(361) if f"b{i}" in raw}


def test_redis_stopped_under_load_releases_nothing_above_the_rate(settings: Settings, tmp_path: Path) -> None:
    """A private Redis frozen (SIGSTOP: connections hang, the harder case than a refused port)
    for 8 s (the issue says 15; 8 covers every client timeout, 1 s limiter and 5 s sender) while
    300 mails flow at 10 mails/s with a burst of 20: nothing lost, every stage recovers by itself,
    and the limiter never released more than rate x time + burst in any run of 10 s buckets."""
    rate_per_s, burst = 10, 20
    with PrivateRedis(tmp_path) as private_redis, LedgerPeer() as peer:
        # A 1 s window: the limiter keeps 10 of the burst back for it (a minute's would exceed it).
        settings = settings.replace(redis_url=private_redis.url, burst_mails=burst, window_s=1.0, send_margin_s=0.2)
        write_servers(settings, peer.port, server=(
            f'[servers.tenant-smtp]\naddress = "[127.0.0.1]:{peer.port}"\ntls = "none"\n'
            f'rate_per_hour = {rate_per_s * 3600}\n'
            '[tenants.acme]\nserver = "tenant-smtp"\ndaily_limit = 1000000\n'))
        with Pipeline(settings, tmp_path, replicas=2) as pipeline:
            published = publish(settings, mails(300))
            wait_until(lambda: len(peer.accepted) >= 40, 60, "mail flowing", pipeline)
            assert private_redis.proc is not None
            private_redis.proc.send_signal(signal.SIGSTOP)
            time.sleep(8)
            private_redis.proc.send_signal(signal.SIGCONT)
            settle(peer, published, 90, pipeline)
        client = redis.Redis.from_url(private_redis.url)
        buckets = released_per_bucket(client, settings.namespace, "tenant-smtp")
        client.close()
        report = ledger(settings, peer, published)
    print(report.summary(), buckets)
    assert sum(buckets.values()) >= 300
    first, last = min(buckets), max(buckets)
    for start in range(first, last + 1):
        for end in range(start, last + 1):
            released = sum(buckets.get(b, 0) for b in range(start, end + 1))
            allowed = (end - start + 1) * 10 * rate_per_s + burst
            assert released <= allowed, f"buckets {start}..{end}: {released} released, at most {allowed}"
    report.assert_clean()
    assert_no_secrets(tmp_path)


def test_a_publish_that_returned_survives_kill_9_of_the_broker(tmp_path: Path) -> None:
    """The producer client publishing in a loop while the (private) broker is killed with kill -9:
    every call either returns (and its ids are in the intake queue after the broker restarts) or
    raises BrokerUnavailable; never a silent loss."""
    rabbit = PrivateRabbit(tmp_path / "rabbit").start()
    try:
        namespace = "faults-confirm"
        conn = pika.BlockingConnection(pika.URLParameters(rabbit.url))
        Topology(namespace).declare(conn.channel())
        conn.close()
        returned: list[str] = []
        errors: list[str] = []
        killed_at = 0.0
        with Producer(rabbit.url, namespace, reconnect_s=1.0) as producer:
            started = time.monotonic()
            while time.monotonic() - started < 20:
                if not killed_at and time.monotonic() - started > 1.5:
                    rabbit.kill()
                    killed_at = time.monotonic()
                try:
                    returned += producer.publish_requests(mails(20))
                except BrokerUnavailable as exc:
                    errors.append(exc.reason)
                    if killed_at:
                        break
        rabbit.start()
        conn = pika.BlockingConnection(pika.URLParameters(rabbit.url))
        channel = conn.channel()
        queued = set()
        while True:
            method, _props, body = channel.basic_get(Topology(namespace).intake, auto_ack=True)
            if method is None:
                break
            queued.update(decode_intake(item, 2**31).id for item in items_of(body, "intake"))  # bundles of 20
        conn.close()
    finally:
        rabbit.kill()
    assert returned, "some publishes returned before the kill"
    assert errors, "the caller got an error once the broker was gone"
    missing = set(returned) - queued
    assert not missing, f"{len(missing)} of {len(returned)} confirmed publishes were lost"
