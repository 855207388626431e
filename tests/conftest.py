"""Real services for the tests.

RabbitMQ and Redis: the ones at MAILPIPE_AMQP_URL / MAILPIPE_REDIS_URL (default: the local
ones on their standard ports). Where one does not answer and a Docker engine does,
testcontainers starts one. Where neither, a test that needs it fails in CI (CI is set) and
is skipped elsewhere, saying why.

Every test gets its own namespace, so its queues and Redis keys are its own; they are
deleted after the test.
"""

from __future__ import annotations

import contextlib
import gc
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest
import redis

from mailpipe.lanes import known_queues
from mailpipe.services import reachable
from mailpipe.settings import Settings
from mailpipe.topology import Topology

DEFAULTS = Settings()


def _docker_engine() -> bool:
    try:
        import docker

        docker.from_env().ping()
    except Exception:  # any failure means: no engine to use
        return False
    return True


def _unavailable(what: str) -> None:
    message = f"{what} is not reachable and no Docker engine can start one"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: a test that needs it must not be skipped)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    url = os.environ.get("MAILPIPE_AMQP_URL", DEFAULTS.amqp_url)
    if reachable(url):
        yield url
        return
    if not _docker_engine():
        _unavailable(f"RabbitMQ at {url}")
    from testcontainers.rabbitmq import RabbitMqContainer

    with RabbitMqContainer("rabbitmq:3.10") as container:
        params = container.get_connection_params()
        yield f"amqp://guest:guest@{params.host}:{params.port}/"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("MAILPIPE_REDIS_URL", DEFAULTS.redis_url)
    if reachable(url):
        yield url
        return
    if not _docker_engine():
        _unavailable(f"Redis at {url}")
    from testcontainers.redis import RedisContainer

    with RedisContainer("redis:7") as container:
        host = container.get_container_host_ip()
        yield f"redis://{host}:{container.get_exposed_port(6379)}/0"


@pytest.fixture
def namespace(amqp_url: str, redis_url: str) -> Iterator[str]:
    ns = f"test-{uuid.uuid4().hex[:10]}"
    yield ns
    delete_namespace(ns, amqp_url, redis_url)


def delete_namespace(ns: str, amqp_url: str, redis_url: str) -> None:
    # Every quorum queue left behind holds file handles in the broker: enough of them and it
    # stops accepting connections. So delete every name a test's settings could have made.
    topology = Topology.from_settings(Settings(namespace=ns))
    names = {*topology.all_queues, *topology.streams}
    # Retry delays other tests' settings make, each with its .large sibling (Topology's list).
    names |= {*Topology(ns, retry_delays_s=(1, 2, 3, 4, 5, 8, 10, 16, 30, 32, 60, 64, 128, 256, 512)).all_queues}
    names |= lane_queues(ns, redis_url)
    with contextlib.suppress(pika.exceptions.AMQPError, OSError):
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        channel = conn.channel()
        for queue in names:
            channel.queue_delete(queue)
        channel.exchange_delete(topology.events)
        conn.close()
    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"*{ns}*", count=1000):
            client.delete(key)
        client.close()


def lane_queues(ns: str, redis_url: str) -> set[str]:
    """Every lane a namespace's publishers registered (mailpipe/lanes.py)."""
    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(redis_url)
        try:
            return known_queues(client, ns)
        finally:
            client.close()
    return set()


def pytest_collection_finish(session: pytest.Session) -> None:
    """What exists once the tests are collected (modules, hypothesis, test functions) lives to
    the end: frozen out of the collector's sight, so the collection after each test scans only
    what tests made (gc.collect over everything cost 30 ms a test, half of the unit tests' time)."""
    gc.freeze()


@pytest.fixture(autouse=True)
def collect_garbage() -> Iterator[None]:
    """A leaked socket or transport is reported by the GC, as an unraisable warning (an error
    here), in whichever test the GC happens to run: collect after each test, so the report
    lands in the test that leaked."""
    yield
    gc.collect()


@pytest.fixture
def settings(amqp_url: str, redis_url: str, namespace: str, tmp_path: Path) -> Settings:
    return Settings(amqp_url=amqp_url, redis_url=redis_url, namespace=namespace,
                    servers_file=str(tmp_path / "servers.toml"), linger_ms=200,
                    retry_base_s=1, retry_max_s=2, shutdown_timeout_s=10)
