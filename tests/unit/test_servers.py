"""The servers file: address forms of the seeds, TLS by port, credentials, validation, reload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailpipe.errors import ConfigError
from mailpipe.servers import (
    BULK_RATE_PER_HOUR,
    DEFAULT_DAILY_LIMIT,
    DEFAULT_RATE_PER_HOUR,
    Address,
    Config,
    ConfigWatcher,
    Credentials,
    load_config,
    parse_address,
    parse_credentials,
    tls_mode_for_port,
)

# -- addresses ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "host", "port", "mx_lookup"), [
    ("smtp.example.com", "smtp.example.com", 25, True),
    ("SMTP.Example.COM", "smtp.example.com", 25, True),
    ("smtp.example.com.", "smtp.example.com", 25, True),
    ("  smtp.example.com  ", "smtp.example.com", 25, True),
    ("[smtp.example.com]", "smtp.example.com", 25, False),
    ("smtp.example.com:587", "smtp.example.com", 587, True),
    ("[smtp.example.com]:587", "smtp.example.com", 587, False),
    ("[smtp.example.com]:465", "smtp.example.com", 465, False),
    ("mail_relay.internal", "mail_relay.internal", 25, True),
    ("localhost", "localhost", 25, True),
    ("192.0.2.1", "192.0.2.1", 25, False),
    ("192.0.2.1:2525", "192.0.2.1", 2525, False),
    ("[192.0.2.1]", "192.0.2.1", 25, False),
    ("[192.0.2.1]:587", "192.0.2.1", 587, False),
    ("[2001:db8::1]", "2001:db8::1", 25, False),
    ("[2001:db8::1]:465", "2001:db8::1", 465, False),
    ("2001:db8::1", "2001:db8::1", 25, False),
    ("[IPv6:2001:db8::1]", "2001:db8::1", 25, False),
    ("[ipv6:2001:db8::1]:587", "2001:db8::1", 587, False),
    ("[::1]:1", "::1", 1, False),
    ("host:65535", "host", 65535, True),
])
def test_address_forms(text: str, host: str, port: int, mx_lookup: bool) -> None:
    assert parse_address(text) == Address(host=host, port=port, mx_lookup=mx_lookup)


def test_default_port_applies_only_without_one() -> None:
    assert parse_address("smtp.example.com", default_port=587).port == 587
    assert parse_address("[smtp.example.com]:465", default_port=587).port == 465


@pytest.mark.parametrize(("text", "match"), [
    ("", "address is empty"),
    ("   ", "address is empty"),
    ("[smtp.example.com", r"'\[' without '\]'"),
    ("[smtp.example.com]587", "unexpected '587' after ']'"),
    ("[smtp.example.com]:", "port '' is not a number"),
    ("smtp.example.com:", "port '' is not a number"),
    ("smtp.example.com:0", "port '0' is not a number from 1 to 65535"),
    ("smtp.example.com:65536", "port '65536' is not a number"),
    ("smtp.example.com:-1", "port '-1' is not a number"),
    ("smtp.example.com:smtp", "port 'smtp' is not a number"),
    ("smtp.example.com:²", "port '²' is not a number"),
    ("smtp.example.com:٥٨٧", "port '٥٨٧' is not a number"),
    ("[]", "'' is not a host name or IP address"),
    ("[]:25", "'' is not a host name or IP address"),
    ("smtp example.com", "is not a host name or IP address"),
    ("smtp..example.com", "is not a host name or IP address"),
    ("-smtp.example.com", "is not a host name or IP address"),
    ("smtp.example.com]", "is not a host name or IP address"),
    ("user@smtp.example.com", "is not a host name or IP address"),
    ("a" * 64 + ".example.com", "is not a host name or IP address"),
    ("[2001:db8::zz]", "is not a host name or IP address"),
    ("2001:db8::1:465", None),  # a bare IPv6 address takes no port: this one is 2001:db8::1:465
    ("[IPv6:smtp.example.com]", "after 'IPv6:' is not an IPv6 address"),
    ("[IPv6:192.0.2.1]", "after 'IPv6:' is not an IPv6 address"),
])
def test_bad_addresses(text: str, match: str | None) -> None:
    if match is None:  # a valid form that only looks wrong: it must not be misread
        assert parse_address(text) == Address(host="2001:db8::1:465", port=25, mx_lookup=False)
        return
    with pytest.raises(ConfigError, match=match) as info:
        parse_address(text)
    if text.strip():
        assert repr(text) in info.value.reason  # the error quotes what was written


@pytest.mark.parametrize("text", ["smtp.example.com", "[smtp.example.com]", "smtp.example.com:587",
                                  "[smtp.example.com]:465", "[192.0.2.1]:587", "[2001:db8::1]:465",
                                  "[IPv6:2001:db8::1]", "2001:db8::1", "192.0.2.1"])
def test_address_str_parses_back(text: str) -> None:
    address = parse_address(text)
    assert parse_address(str(address)) == address


def test_address_str_forms() -> None:
    assert str(parse_address("smtp.example.com")) == "smtp.example.com:25"
    assert str(parse_address("[smtp.example.com]:587")) == "[smtp.example.com]:587"
    assert str(parse_address("[2001:db8::1]:465")) == "[2001:db8::1]:465"


@pytest.mark.parametrize(("port", "mode"), [(465, "implicit"), (587, "starttls"), (25, "opportunistic"),
                                            (2525, "opportunistic"), (1025, "opportunistic")])
def test_tls_mode_by_port(port: int, mode: str) -> None:
    assert tls_mode_for_port(port) == mode


# -- credentials --------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "username", "password"), [
    ("mailer s3cret", "mailer", "s3cret"),
    ("mailer@acme.example pass word with spaces", "mailer@acme.example", "pass word with spaces"),
    ("mailer  leading-space", "mailer", " leading-space"),  # one space separates; the rest is password
    ("mailer s3cret\n", "mailer", "s3cret"),  # a file's trailing newline is not part of it
    ("mailer s3cret\r\n", "mailer", "s3cret"),
    ("mailer trailing ", "mailer", "trailing "),
])
def test_credentials(text: str, username: str, password: str) -> None:
    assert parse_credentials(text, "here") == Credentials(username, password)


@pytest.mark.parametrize("text", ["", "mailer", "mailer ", " s3cret", "\n", "mailer\ns3cret"])
def test_bad_credentials(text: str) -> None:
    with pytest.raises(ConfigError, match=r'^servers\.x\.credentials_env: expected "username password"'):
        parse_credentials(text, "servers.x.credentials_env")


def test_credentials_repr_never_shows_the_password() -> None:
    creds = parse_credentials("mailer hunter2 and more", "here")
    assert "hunter2" not in repr(creds)
    assert "hunter2" not in str(creds)
    assert "mailer" in repr(creds)


def test_bad_credentials_error_never_shows_the_password(tmp_path: Path) -> None:
    path = write(tmp_path, '[servers.p]\naddress = "smtp.example.com"\ncredentials_env = "P_SMTP"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, {"P_SMTP": "onlyhunter2"})
    assert "hunter2" not in str(info.value)


# -- the servers file ---------------------------------------------------------------------------

FULL = """
[servers.platform]
address = "[smtp.example.com]:587"
credentials_env = "PLATFORM_SMTP"

[servers.bulk]
address = "[192.0.2.1]:465"
bulk = true
concurrency = 2
max_mails_per_connection = 50

[servers.custom]
address = "mx.acme.example"
rate_per_hour = 300
per_minute = 10
tls = "none"
tls_verify = false

[tenants.acme]
server = "platform"
daily_limit = 500
timezone = "Europe/Berlin"

[tenants.globex]
server = "bulk"

[tenants.initech]
"""


def write(tmp_path: Path, text: str, name: str = "servers.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_full_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL + '[servers.bare]\naddress = "smtp.bare.example"\n'),
                         {"PLATFORM_SMTP": "mailer pass word"})
    platform = config.server("platform")
    assert platform.address == Address("smtp.example.com", 587, mx_lookup=False)
    assert platform.tls == "starttls"
    assert platform.credentials == Credentials("mailer", "pass word")
    assert platform.rate_per_hour == DEFAULT_RATE_PER_HOUR and not platform.bulk
    assert "pass word" not in repr(platform)

    bulk = config.server("bulk")
    assert bulk.tls == "implicit" and bulk.bulk and bulk.rate_per_hour == BULK_RATE_PER_HOUR
    assert bulk.concurrency == 2 and bulk.max_mails_per_connection == 50 and bulk.credentials is None

    custom = config.server("custom")
    assert custom.tls == "none" and not custom.tls_verify
    assert custom.rate_per_hour == 300 and custom.per_minute == 10 and custom.address.mx_lookup

    bare = config.server("bare")
    assert bare.tls == "opportunistic" and bare.tls_verify and bare.max_mails_per_connection == 1000

    assert config.tenant("acme").daily_limit == 500
    assert config.tenant("acme").timezone == "Europe/Berlin"
    assert config.tenant("globex").daily_limit == DEFAULT_DAILY_LIMIT
    assert config.tenant("initech").server == "platform"  # the default server
    assert config.tenant("initech").timezone == "UTC"


def test_unknown_names_in_a_loaded_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL), {"PLATFORM_SMTP": "u p"})
    with pytest.raises(ConfigError, match="unknown server 'nope'"):
        config.server("nope")
    with pytest.raises(ConfigError, match="unknown tenant 'nope'"):
        config.tenant("nope")


def test_no_file_means_no_servers() -> None:
    assert load_config(None) == Config()


def test_credentials_file(tmp_path: Path) -> None:
    secret = write(tmp_path, "mailer file pass\n", "secret")
    config = load_config(write(tmp_path, f'[servers.p]\naddress = "h"\ncredentials_file = "{secret}"\n'), {})
    assert config.server("p").credentials == Credentials("mailer", "file pass")


def test_ca_file(tmp_path: Path) -> None:
    ca = write(tmp_path, "not checked here", "ca.pem")
    config = load_config(write(tmp_path, f'[servers.p]\naddress = "h"\nca_file = "{ca}"\n'), {})
    assert config.server("p").ca_file == str(ca)


P = '[servers.p]\naddress = "h"\n'  # a valid server, for the lines added after it
BAD_FILES = [
    (P + 'port = 25\n', r"servers\.p: unknown field\(s\) \['port'\]"),
    ('[tenants.t]\nserver = "p"\nlimit = 5\n[servers.p]\naddress = "h"\n',
     r"tenants\.t: unknown field\(s\) \['limit'\]"),
    ('[server.p]\naddress = "h"\n', r"unknown table\(s\) \['server'\]"),
    ('servers = "p"\n', r"\[servers\] must hold one table per name"),
    ('[servers]\np = "h"\n', r"\[servers\] must hold one table per name"),
    ("[servers.p]\nbulk = true\n", r"servers\.p\.address: missing"),
    ("[servers.p]\naddress = 25\n", r"servers\.p\.address: expected str, got int 25"),
    (P + 'rate_per_hour = "fast"\n', r"servers\.p\.rate_per_hour: expected int, got str"),
    (P + 'rate_per_hour = 1200.0\n', r"servers\.p\.rate_per_hour: expected int, got float"),
    (P + 'rate_per_hour = true\n', r"servers\.p\.rate_per_hour: expected int, got bool"),
    (P + 'bulk = "yes"\n', r"servers\.p\.bulk: expected bool, got str"),
    (P + 'bulk = 1\n', r"servers\.p\.bulk: expected bool, got int"),
    (P + 'rate_per_hour = 0\n', r"servers\.p\.rate_per_hour: must be > 0, got 0"),
    (P + 'per_minute = -1\n', r"servers\.p\.per_minute: must be > 0"),
    (P + 'concurrency = 0\n', r"servers\.p\.concurrency: must be > 0"),
    (P + 'max_mails_per_connection = 0\n',
     r"servers\.p\.max_mails_per_connection: must be > 0, got 0"),
    ('[servers.p]\naddress = "[h]:99999"\n', r"servers\.p\.address: address '\[h\]:99999': port"),
    (P + 'tls = "ssl"\n', r"servers\.p\.tls: 'ssl' is not one of implicit"),
    (P + 'ca_file = "/nonexistent/ca.pem"\n', r"servers\.p\.ca_file: .* is not a file"),
    (P + 'credentials_env = "NOT_SET_ANYWHERE"\n',
     r"servers\.p\.credentials_env: environment variable NOT_SET_ANYWHERE is not set"),
    (P + 'credentials_env = "A"\ncredentials_file = "/x"\n',
     r"servers\.p: give credentials_env or credentials_file, not both"),
    (P + 'credentials_file = "/nonexistent/secret"\n',
     r"servers\.p\.credentials_file: cannot read '/nonexistent/secret'"),
    (P + '[tenants.t]\nserver = "q"\n', r"tenants\.t\.server: unknown server 'q'"),
    ("[tenants.t]\n", r"tenants\.t\.server: unknown server 'platform'"),
    (P + '[tenants.t]\nserver = "p"\ntimezone = "Mars/Olympus"\n',
     r"tenants\.t\.timezone: unknown time zone 'Mars/Olympus'"),
    (P + '[tenants.t]\nserver = "p"\ntimezone = "../../etc/passwd"\n',
     r"tenants\.t\.timezone: unknown time zone"),
    (P + '[tenants.t]\nserver = "p"\ndaily_limit = 0\n',
     r"tenants\.t\.daily_limit: must be > 0, got 0"),
    (P + '[tenants.t]\nserver = "p"\ndaily_limit = "many"\n',
     r"tenants\.t\.daily_limit: expected int, got str"),
    (P + '[tenants.t]\nserver = 7\n', r"tenants\.t\.server: expected str, got int"),
    ("[servers.p\n", r"not valid TOML"),
]


@pytest.mark.parametrize(("text", "match"), BAD_FILES)
def test_validation_errors_name_the_file_and_field(tmp_path: Path, text: str, match: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path, {"A": "u p"})
    assert info.value.reason.startswith(f"{path}: ")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="servers file not found"):
        load_config(tmp_path / "nope.toml")


# -- reloading ----------------------------------------------------------------------------------

def bump_mtime(path: Path, seconds: int) -> None:
    """Some file systems keep mtime in whole seconds: move it explicitly so a change is seen."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 1_000_000_000))


def test_watcher_picks_up_a_change(tmp_path: Path) -> None:
    path = write(tmp_path, '[servers.p]\naddress = "h"\nrate_per_hour = 100\n')
    watcher = ConfigWatcher(path)
    assert watcher.current().server("p").rate_per_hour == 100
    path.write_text('[servers.p]\naddress = "h"\nrate_per_hour = 200\n', encoding="utf-8")
    bump_mtime(path, 1)
    assert watcher.current().server("p").rate_per_hour == 200
    assert watcher.last_error is None


def test_watcher_reads_a_changed_credentials_file_again(tmp_path: Path) -> None:
    """A rotated secret in its own file (the servers file untouched) is read again: its server,
    paused for a wrong password, resumes on the new fingerprint (mailpipe/pushback.py)."""
    creds = tmp_path / "relay-credentials"
    creds.write_text("mailer old-password\n", encoding="utf-8")
    path = write(tmp_path, f'[servers.p]\naddress = "h:587"\ncredentials_file = "{creds}"\n')
    watcher = ConfigWatcher(path)
    first = watcher.current()
    assert watcher.current() is first  # nothing changed: not read again
    creds.write_text("mailer new-password\n", encoding="utf-8")
    bump_mtime(creds, 1)
    credentials = watcher.current().server("p").credentials
    assert credentials is not None and credentials.password == "new-password"


def test_watcher_keeps_the_last_good_config(tmp_path: Path) -> None:
    path = write(tmp_path, '[servers.p]\naddress = "h"\nrate_per_hour = 100\n')
    watcher = ConfigWatcher(path)
    good = watcher.current()

    path.write_text('[servers.p]\naddress = "h"\nrate_per_hour = "oops"\n', encoding="utf-8")
    bump_mtime(path, 1)
    assert watcher.current() is good
    assert watcher.last_error is not None and "rate_per_hour" in watcher.last_error

    path.unlink()  # a file removed mid-deploy is broken too
    assert watcher.current() is good
    assert watcher.last_error is not None and "not found" in watcher.last_error

    path.write_text('[servers.p]\naddress = "h"\nrate_per_hour = 300\n', encoding="utf-8")
    bump_mtime(path, 2)
    assert watcher.current().server("p").rate_per_hour == 300
    assert watcher.last_error is None


def test_watcher_does_not_reread_an_unchanged_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[servers.p]\naddress = "h"\n')
    watcher = ConfigWatcher(path)
    first = watcher.current()
    assert watcher.current() is first


def test_watcher_without_a_file() -> None:
    watcher = ConfigWatcher(None)
    assert watcher.current() == Config()


def test_watcher_refuses_a_broken_file_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown field"):
        ConfigWatcher(write(tmp_path, '[servers.p]\naddress = "h"\nspeed = 1\n'))


# -- DKIM keys of tenants -----------------------------------------------------------------------

PEM = "-----BEGIN PRIVATE KEY-----\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"
DKIM_BASE = P + '[tenants.t]\nserver = "p"\n'


def test_dkim_key_from_env(tmp_path: Path) -> None:
    text = DKIM_BASE + 'dkim_domain = "Acme.Example."\ndkim_selector = "s1"\ndkim_key_env = "T_DKIM"\n'
    dkim = load_config(write(tmp_path, text), {"T_DKIM": PEM}).tenant("t").dkim
    assert dkim is not None
    assert dkim.domain == "acme.example" and dkim.selector == "s1"
    assert dkim.private_key == PEM.encode()
    assert "PRIVATE KEY" not in repr(dkim)


def test_dkim_key_from_file(tmp_path: Path) -> None:
    key = write(tmp_path, PEM, "dkim.pem")
    text = DKIM_BASE + f'dkim_domain = "acme.example"\ndkim_selector = "s1"\ndkim_key_file = "{key}"\n'
    dkim = load_config(write(tmp_path, text), {}).tenant("t").dkim
    assert dkim is not None and dkim.private_key == PEM.encode()


def test_no_dkim_by_default(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, DKIM_BASE), {}).tenant("t").dkim is None


@pytest.mark.parametrize(("lines", "match"), [
    ('dkim_domain = "acme.example"\n', "DKIM needs dkim_domain, dkim_selector and dkim_key_file or dkim_key_env"),
    ('dkim_domain = "acme.example"\ndkim_selector = "s1"\n', "DKIM needs"),
    ('dkim_selector = "s1"\ndkim_key_env = "T_DKIM"\n', "DKIM needs"),
    ('dkim_domain = "a.example"\ndkim_selector = "s1"\ndkim_key_env = "T_DKIM"\ndkim_key_file = "/x"\n',
     "give dkim_key_file or dkim_key_env, not both"),
    ('dkim_domain = "a.example"\ndkim_selector = "s1"\ndkim_key_env = "UNSET_DKIM"\n',
     r"tenants\.t\.dkim_key_env: environment variable UNSET_DKIM is not set"),
    ('dkim_domain = "a.example"\ndkim_selector = "s1"\ndkim_key_file = "/nonexistent/k.pem"\n',
     r"tenants\.t\.dkim_key_file: cannot read '/nonexistent/k.pem'"),
    ('dkim_domain = "a.example"\ndkim_selector = "s1"\ndkim_key_env = "NOT_PEM"\n',
     "the DKIM key is not a PEM private key"),
    ('dkim_domain = 5\n', r"tenants\.t\.dkim_domain: expected str, got int"),
])
def test_dkim_errors_name_the_field(tmp_path: Path, lines: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_config(write(tmp_path, DKIM_BASE + lines), {"T_DKIM": PEM, "NOT_PEM": "secret-not-a-key"})
    assert "secret-not-a-key" not in info.value.reason


# -- tenants: servers, the platform's, verified domains (issue 13) --------------------------------

TENANTS = """
[servers.platform]
address = "[smtp.example.com]:587"
platform = true

[servers.platform-bulk]
address = "[bulk.example.com]:587"
bulk = true
platform = true

[servers.a-own]
address = "[smtp.a.example]:587"

[servers.a-second]
address = "[smtp2.a.example]:587"

[servers.b-own]
address = "[smtp.b.example]:587"

[tenants.a]
servers = ["a-own", "a-second"]
domains = ["A.Example", "*.mail.a.example", "bücher.example", "xn--caf-dma.example."]
domain_policy = "warn"

[tenants.b]
server = "b-own"
domains = ["b.example"]

[tenants.c]
"""


def tenants_config(tmp_path: Path) -> Config:
    return load_config(write(tmp_path, TENANTS), {})


def test_platform_flag_and_the_tenants_servers(tmp_path: Path) -> None:
    config = tenants_config(tmp_path)
    assert config.server("platform").platform and not config.server("a-own").platform
    assert config.platform_servers == ("platform", "platform-bulk")
    a, b, c = config.tenant("a"), config.tenant("b"), config.tenant("c")
    assert a.server == "a-own" and a.servers == ("a-own", "a-second")  # the first is the default
    assert b.server == "b-own" and b.servers == ("b-own",)  # the older single `server` still works
    assert c.server == "platform" and c.servers == ("platform",)  # no server: the platform's
    assert config.allowed_servers(a) == ("a-own", "a-second", "platform", "platform-bulk")
    assert config.allowed_servers(b) == ("b-own", "platform", "platform-bulk")
    assert config.allowed_servers(c) == ("platform", "platform-bulk")


def test_route_allows_own_and_platform_servers_only(tmp_path: Path) -> None:
    config = tenants_config(tmp_path)
    a, b = config.tenant("a"), config.tenant("b")
    assert config.route(a, None).name == "a-own"
    assert config.route(a, "a-second").name == "a-second"
    assert config.route(a, "platform").name == "platform"
    assert config.route(b, "platform-bulk").name == "platform-bulk"
    with pytest.raises(ConfigError, match=r"^server: tenant 'a' may not send through 'b-own'; "
                                          r"its servers are a-own, a-second, platform, platform-bulk$"):
        config.route(a, "b-own")
    with pytest.raises(ConfigError, match=r"^server: tenant 'b' may not send through 'a-own'"):
        config.route(b, "a-own")
    with pytest.raises(ConfigError, match=r"^server: unknown server 'nowhere'$"):
        config.route(a, "nowhere")


def test_a_server_named_platform_is_not_shared_unless_marked(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[servers.platform]\naddress = "h"\n[servers.own]\naddress = "o"\n'
                                         '[tenants.t]\nserver = "own"\n[tenants.u]\n'), {})
    assert config.platform_servers == ()
    assert config.tenant("u").server == "platform"  # as before: the server called "platform"
    with pytest.raises(ConfigError, match="may not send through 'platform'"):
        config.route(config.tenant("t"), "platform")


def test_domains_are_normalized_and_matched(tmp_path: Path) -> None:
    config = tenants_config(tmp_path)
    a, b, c = config.tenant("a"), config.tenant("b"), config.tenant("c")
    assert a.domains == ("a.example", "*.mail.a.example", "xn--bcher-kva.example", "xn--caf-dma.example")
    assert a.domain_policy == "warn" and b.domain_policy == "refuse"
    assert c.domains is None and c.domain_policy == "refuse"
    assert config.unchecked_tenants() == ["c"]
    assert a.allows_domain("a.example") and a.allows_domain("A.EXAMPLE.")
    assert not a.allows_domain("sub.a.example")  # exact, unless a "*." entry says otherwise
    assert a.allows_domain("x.mail.a.example") and a.allows_domain("y.x.mail.a.example")
    assert not a.allows_domain("mail.a.example")  # "*.d" is d's subdomains, not d
    assert not a.allows_domain("evilmail.a.example") and not a.allows_domain("a.example.evil")
    assert a.allows_domain("xn--bcher-kva.example")
    assert not a.allows_domain("b.example")
    assert c.allows_domain("anything.example")  # unchecked


def test_empty_domains_verifies_nothing(tmp_path: Path) -> None:
    tenant = load_config(write(tmp_path, P + '[tenants.t]\nserver = "p"\ndomains = []\n'), {}).tenant("t")
    assert tenant.domains == () and not tenant.allows_domain("t.example")


def test_tenant_config_built_in_code_keeps_working() -> None:
    from mailpipe.servers import TenantConfig

    tenant = TenantConfig(name="t", server="s")
    assert tenant.servers == ("s",) and tenant.domains is None and tenant.allows_domain("x.example")


TENANT_ERRORS = [
    ('servers = "p"\n', r"tenants\.t\.servers: expected a list of strings, got str 'p'"),
    ("servers = [1]\n", r"tenants\.t\.servers\[0\]: expected str, got int 1"),
    ("servers = []\n", r"tenants\.t\.servers: empty"),
    ('servers = ["p", "q"]\n', r"tenants\.t\.servers\[1\]: unknown server 'q'"),
    ('servers = ["p", "p"]\n', r"tenants\.t\.servers\[1\]: 'p' is listed twice"),
    ('servers = ["p"]\nserver = "p"\n', r"tenants\.t: give server or servers, not both"),
    ('domains = "t.example"\n', r"tenants\.t\.domains: expected a list of strings, got str"),
    ("domains = [7]\n", r"tenants\.t\.domains\[0\]: expected str, got int 7"),
    ('domains = ["t.example", "not a domain"]\n', r"tenants\.t\.domains\[1\]: 'not a domain' is not a domain name"),
    ('domains = ["localhost"]\n', r"tenants\.t\.domains\[0\]: 'localhost' is not a domain name"),
    ('domains = ["t"]\n', r"tenants\.t\.domains\[0\]: 't' is not a domain name"),
    ('domains = ["ann@t.example"]\n', r"tenants\.t\.domains\[0\]: 'ann@t.example' is not a domain name"),
    ('domains = [""]\n', r"tenants\.t\.domains\[0\]: '' is not a domain name"),
    ('domains = ["*"]\n', r"tenants\.t\.domains\[0\]: '\*' is not a domain name"),
    ('domains = ["*.*.t.example"]\n', r"tenants\.t\.domains\[0\]: '\*\.\*\.t\.example' is not a domain name"),
    ('domains = ["[192.0.2.1]"]\n', r"tenants\.t\.domains\[0\]: '\[192\.0\.2\.1\]' is not a domain name"),
    ('domains = ["t..example"]\n', r"tenants\.t\.domains\[0\]: 't\.\.example' is not a domain name"),
    ('domains = ["t.example"]\ndomain_policy = "reject"\n',
     r"tenants\.t\.domain_policy: 'reject' is not one of refuse, warn"),
    ('domains = ["t.example"]\ndomain_policy = true\n', r"tenants\.t\.domain_policy: expected str, got bool"),
    ('domain_policy = "warn"\n', r"tenants\.t\.domain_policy: needs domains"),
]


@pytest.mark.parametrize(("lines", "match"), TENANT_ERRORS)
def test_tenant_errors_name_the_field(tmp_path: Path, lines: str, match: str) -> None:
    path = write(tmp_path, P + "[tenants.t]\n" + ('server = "p"\n' if "servers" not in lines else "") + lines)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path, {})
    assert info.value.reason.startswith(f"{path}: ")


def test_platform_flag_must_be_a_bool(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"servers\.p\.platform: expected bool, got str"):
        load_config(write(tmp_path, P + 'platform = "yes"\n'), {})


def test_a_tenant_without_a_server_uses_the_first_platform_server(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[servers.own]\naddress = "o"\n[servers.shared]\naddress = "h"\n'
                                         'platform = true\n[tenants.t]\n'), {})
    assert config.tenant("t").server == "shared"


def test_the_example_servers_file_loads(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "servers.example.toml"
    secret = write(tmp_path, "mailer secret\n", "secret")
    text = example.read_text(encoding="utf-8").replace("/run/secrets/platform_smtp", str(secret))
    config = load_config(write(tmp_path, text), {"ACME_SMTP": "acme secret"})
    assert config.platform_servers and all(t.domains for t in config.tenants.values())


# -- return-path domains (issue 23) -----------------------------------------------------------------

def test_return_path_domains_of_servers_and_tenants() -> None:
    from mailpipe.servers import parse_config

    config = parse_config({
        "servers": {"platform": {"address": "[smtp.example.com]:587", "platform": True},
                    "own": {"address": "[smtp.acme.example]:587", "return_path_domain": "Bounces.Acme.Example."},
                    "plain": {"address": "[smtp.globex.example]:587"}},
        "tenants": {"acme": {"servers": ["own"], "domains": ["acme.example"],
                             "return_path_domain": "rp.acme.example"},
                    "globex": {"servers": ["plain"]}}}, "test", {})
    platform, own, plain = (config.servers[n] for n in ("platform", "own", "plain"))
    assert own.return_path_domain == "bounces.acme.example"
    assert config.return_path_domain(platform, "globex", "bounces.example.net") == "bounces.example.net"
    assert config.return_path_domain(platform, "globex", "") is None, "no platform domain: no VERP"
    assert config.return_path_domain(plain, "globex", "bounces.example.net") is None
    assert config.return_path_domain(own, "acme", "") == "rp.acme.example", "the tenant's own wins"
    assert config.return_path_domains("bounces.example.net") == {
        "bounces.example.net", "bounces.acme.example", "rp.acme.example"}


@pytest.mark.parametrize(("table", "message"), [
    ({"servers": {"s": {"address": "x.example", "return_path_domain": "not a domain"}}},
     "servers.s.return_path_domain"),
    ({"servers": {"s": {"address": "x.example"}},
      "tenants": {"t": {"server": "s", "domains": ["acme.example"], "return_path_domain": "bounces.other.example"}}},
     "not at one of the tenant's domains"),
])
def test_a_bad_return_path_domain_is_named(table: dict[str, object], message: str) -> None:
    from mailpipe.servers import parse_config

    with pytest.raises(ConfigError, match=message):
        parse_config(table, "test", {})
