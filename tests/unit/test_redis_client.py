"""Where the stages' Redis comes from: one URL, or Sentinels and a primary's name."""

from __future__ import annotations

import pytest
import redis.sentinel

from mailpipe import redis_client
from mailpipe.errors import ConfigError
from mailpipe.settings import Settings


def test_sentinel_addresses_are_read_and_checked() -> None:
    settings = Settings(redis_sentinels=" 10.0.0.1:26379, [::1]:26380 ,,")
    assert redis_client.sentinels(settings) == [("10.0.0.1", 26379), ("::1", 26380)]
    assert redis_client.sentinels(Settings()) == []
    with pytest.raises(ConfigError, match="'sentinel-a' is not host:port"):
        redis_client.sentinels(Settings(redis_sentinels="sentinel-a"))


def test_through_sentinel_the_url_gives_database_user_password_and_tls_only() -> None:
    settings = Settings(redis_url="rediss://app:p%40ss@ignored.example:1/3", redis_sentinels="127.0.0.1:1",
                        redis_master="mp")
    client = redis_client.connect(settings, timeout_s=0.5)
    pool = client.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
    assert pool.service_name == "mp"
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (3, "app", "p@ss")
    assert kwargs["socket_timeout"] == 0.5
    assert issubclass(pool.connection_class, redis.sentinel.SentinelManagedSSLConnection)


def test_not_replicated_names_what_and_how_many() -> None:
    assert redis_client.not_replicated(1, 1, "x") is None
    assert redis_client.not_replicated(0, 1, "a round of decisions") == (
        "Redis: a round of decisions reached 0 of the 1 replica(s) it must (WAIT)")


def test_amqp_endpoints_are_the_cluster_or_the_one_url() -> None:
    assert Settings(amqp_urls="amqp://a/, amqp://b/").amqp_endpoints == ("amqp://a/", "amqp://b/")
    assert Settings(amqp_url="amqp://one/").amqp_endpoints == ("amqp://one/",)
