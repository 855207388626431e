"""Process settings from MAILPIPE_* variables, and URLs made safe to log."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from mailpipe.errors import ConfigError
from mailpipe.settings import MIB, Settings, redact_url


def test_defaults_from_an_empty_environment() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    # The numbers of the seeds.
    assert settings.max_batch_mails == 500
    assert settings.max_batch_bytes == 80 * MIB
    assert settings.window_s == 60.0


def test_every_default_is_valid() -> None:
    Settings().validate()


def test_values_are_converted_to_the_field_type() -> None:
    settings = Settings.from_env({
        "MAILPIPE_NAMESPACE": "staging-eu_1", "MAILPIPE_PREFETCH": "50", "MAILPIPE_WINDOW_S": "30.5",
        "MAILPIPE_LINGER_MS": "0", "MAILPIPE_LOG_FORMAT": "json", "MAILPIPE_MAX_BATCH_MAILS": " 200 ",
        "MAILPIPE_AMQP_URL": "amqp://u:p@rabbit:5672/vh",
        "MAILPIPE_SERVERS_FILE": "/etc/mailpipe/servers.toml",
    })
    assert settings.namespace == "staging-eu_1"
    assert settings.prefetch == 50 and isinstance(settings.prefetch, int)
    assert settings.window_s == 30.5
    assert settings.linger_ms == 0
    assert settings.log_format == "json"
    assert settings.max_batch_mails == 200
    assert settings.servers_path == Path("/etc/mailpipe/servers.toml")


def test_every_field_has_a_variable() -> None:
    """Each field reads MAILPIPE_<FIELD>: set all of them to their defaults, as text."""
    env = {f"MAILPIPE_{f.name.upper()}": str(f.default) for f in fields(Settings)}
    assert Settings.from_env(env) == Settings()


def test_other_variables_are_ignored() -> None:
    assert Settings.from_env({"MAILPIPE_NOT_A_SETTING": "x", "PREFETCH": "1"}) == Settings()


def test_overrides_win_over_the_environment() -> None:
    settings = Settings.from_env({"MAILPIPE_PREFETCH": "50"}, prefetch=7, namespace="x")
    assert settings.prefetch == 7 and settings.namespace == "x"


def test_overrides_are_validated() -> None:
    with pytest.raises(ConfigError, match="MAILPIPE_PREFETCH must be > 0"):
        Settings.from_env({}, prefetch=0)


@pytest.mark.parametrize(("name", "value", "kind"), [
    ("MAILPIPE_PREFETCH", "many", "int"), ("MAILPIPE_PREFETCH", "1.5", "int"),
    ("MAILPIPE_PREFETCH", "", "int"), ("MAILPIPE_WINDOW_S", "1m", "float"),
    ("MAILPIPE_DELIVERY_LIMIT", "0x10", "int"),
])
def test_a_bad_value_names_the_variable(name: str, value: str, kind: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert info.value.reason == f"{name}={value!r} is not a valid {kind}"


@pytest.mark.parametrize(("name", "value", "match"), [
    ("MAILPIPE_PREFETCH", "0", "MAILPIPE_PREFETCH must be > 0, got 0"),
    ("MAILPIPE_LARGE_PREFETCH", "0", "MAILPIPE_LARGE_PREFETCH must be > 0, got 0"),
    ("MAILPIPE_LARGE_MESSAGE_BYTES", "0", "MAILPIPE_LARGE_MESSAGE_BYTES must be > 0, got 0"),
    ("MAILPIPE_DELIVERY_LIMIT", "-1", "MAILPIPE_DELIVERY_LIMIT must be > 0"),
    ("MAILPIPE_WINDOW_S", "0", "MAILPIPE_WINDOW_S must be > 0"),
    ("MAILPIPE_MAX_BATCH_MAILS", "0", "MAILPIPE_MAX_BATCH_MAILS must be > 0"),
    ("MAILPIPE_SEND_CONCURRENCY", "0", "MAILPIPE_SEND_CONCURRENCY must be > 0"),
    ("MAILPIPE_RETRY_BASE_S", "-60", "MAILPIPE_RETRY_BASE_S must be > 0"),
    ("MAILPIPE_WINDOW_S", "nan", "MAILPIPE_WINDOW_S must be a finite number"),
    ("MAILPIPE_RETRY_MAX_S", "inf", "MAILPIPE_RETRY_MAX_S must be a finite number"),
    ("MAILPIPE_RETRY_MAX_AGE_S", "-inf", "MAILPIPE_RETRY_MAX_AGE_S must be a finite number"),
    ("MAILPIPE_BURST_MAILS", "-5", "MAILPIPE_BURST_MAILS must not be negative"),
    ("MAILPIPE_LINGER_MS", "-1", "MAILPIPE_LINGER_MS must not be negative"),
    ("MAILPIPE_SENT_MARK_TTL_S", "-1", "MAILPIPE_SENT_MARK_TTL_S must not be negative"),
    ("MAILPIPE_RECONNECT_MAX_S", "-0.5", "MAILPIPE_RECONNECT_MAX_S must be > 0, got -0.5"),
    ("MAILPIPE_NAMESPACE", "", "MAILPIPE_NAMESPACE=''"),
    ("MAILPIPE_NAMESPACE", "a.b", "MAILPIPE_NAMESPACE='a.b': letters, digits, - and _ only"),
    ("MAILPIPE_NAMESPACE", "a b", "MAILPIPE_NAMESPACE='a b'"),
    ("MAILPIPE_LOG_FORMAT", "xml", "MAILPIPE_LOG_FORMAT='xml': expected text or json"),
])
def test_invalid_values_name_the_variable(name: str, value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match.replace(".", r"\.").replace("(", r"\(")):
        Settings.from_env({name: value})


def test_message_may_not_exceed_a_batch() -> None:
    with pytest.raises(ConfigError, match="MAX_MESSAGE_BYTES must not exceed MAILPIPE_MAX_BATCH_BYTES"):
        Settings.from_env({"MAILPIPE_MAX_MESSAGE_BYTES": str(81 * MIB)})
    Settings.from_env({"MAILPIPE_MAX_MESSAGE_BYTES": str(80 * MIB)})  # equal is fine


def test_burst_defaults_to_one_batch_plus_one_window_at_the_rate() -> None:
    assert Settings().burst(6000) == 600  # the seeds: 500 a batch, 100 in the minute's window
    assert Settings().burst(1200) == 520
    assert Settings(max_batch_mails=100, window_s=0).burst(1200) == 100
    assert Settings(burst_mails=40).burst(1200) == 40
    assert Settings(window_s=1).window_reserve(36_000) == 10


def test_servers_path() -> None:
    assert Settings().servers_path is None
    assert Settings(servers_file="servers.toml").servers_path == Path("servers.toml")


def test_replace_keeps_the_rest() -> None:
    settings = Settings(namespace="a").replace(prefetch=3)
    assert settings.namespace == "a" and settings.prefetch == 3


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().prefetch = 1  # type: ignore[misc]


# -- redact_url ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "safe"), [
    ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
    ("amqps://mailer:s3cr%40t@rabbit.example:5671/prod?heartbeat=30",
     "amqps://mailer:***@rabbit.example:5671/prod?heartbeat=30"),
    ("redis://:hunter2@redis.internal:6379/0", "redis://:***@redis.internal:6379/0"),
    ("redis://default:p@ss:word@redis:6379/1", "redis://default:***@redis:6379/1"),
    ("amqp://u:secret@rabbit/", "amqp://u:***@rabbit/"),
    ("amqp://u:secret@[::1]:5672/", "amqp://u:***@[::1]:5672/"),
    ("amqp://u:secret@[2001:db8::5]/", "amqp://u:***@[2001:db8::5]/"),
    ("amqp://u:secret@host:notaport/", "amqp://***"),
    # Not percent-encoded, so not parsed as a password: hidden all the same.
    ("amqp://mailer:a/b?c#d@rabbit.example:5672/vhost", "amqp://***@rabbit.example:5672/vhost"),
])
def test_redact_url_hides_the_password(url: str, safe: str) -> None:
    assert redact_url(url) == safe


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "amqp://rabbit/", "amqp://user@rabbit/",
                                 "unix:///var/run/redis.sock", "", "amqp://rabbit/vh?x=a@b"])
def test_redact_url_leaves_urls_without_password(url: str) -> None:
    assert redact_url(url) == url


@pytest.mark.parametrize("password", ["hunter2", "s3cr%40t", "p@ss:word", "a/b?c#d", "x#y", "x?y"])
def test_redacted_url_never_contains_the_password(password: str) -> None:
    url = f"amqp://mailer:{password}@rabbit.example:5672/vhost"
    assert password not in redact_url(url)
