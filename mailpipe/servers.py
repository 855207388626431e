"""SMTP servers and tenants, from a TOML file (``MAILPIPE_SERVERS_FILE``).

    [servers.platform]
    address = "[smtp.example.com]:587"     # every form of the seeds: host, [host], [host]:port
    credentials_env = "PLATFORM_SMTP"      # "username password", one space between
    bulk = false                           # true: "accepts large amounts of email", 6,000/h
    platform = true                        # shared: every tenant may send through it

    [servers.acme-smtp]
    address = "smtp.acme.example:587"

    [tenants.acme]
    servers = ["acme-smtp", "platform"]    # its own servers, the first its default
    domains = ["acme.example", "*.acme.example"]   # verified sender domains
    domain_policy = "refuse"               # or "warn"
    daily_limit = 10000

A tenant sends through the servers it lists (``servers``, or the older single ``server``) and
the servers marked ``platform = true``; nothing else. With ``domains``, the envelope sender and
every address of ``From:`` (and ``Sender:``) must be at one of them: a domain matches exactly,
``*.acme.example`` matches its subdomains. Without ``domains`` the sender is not checked (the
enqueue stage warns about such tenants at start and on every reload).

Validated on load; an error names the file, the table and the field. ``ConfigWatcher``
re-reads the file when it changes, so a new rate applies without a restart.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from email_validator import EmailNotValidError, validate_email

from mailpipe.errors import ConfigError

DEFAULT_RATE_PER_HOUR = 1200
BULK_RATE_PER_HOUR = 6000
DEFAULT_DAILY_LIMIT = 10_000
TLS_MODES = ("implicit", "starttls", "opportunistic", "none")
DOMAIN_POLICIES = ("refuse", "warn")
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*\.?")


@dataclass(frozen=True)
class Address:
    """Where to connect. ``mx_lookup`` is False for ``[host]``: that host, no MX lookup."""

    host: str
    port: int
    mx_lookup: bool

    def __str__(self) -> str:
        host = f"[{self.host}]" if not self.mx_lookup or ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str, default_port: int = 25) -> Address:
    """Parse the seeds' server forms: ``host``, ``[host]``, ``host:port``, ``[host]:port``,
    ``[192.0.2.1]:587``, ``[2001:db8::1]:465`` and RFC 5321's ``[IPv6:2001:db8::1]``."""
    raw = text.strip()
    if not raw:
        raise ConfigError("address is empty")
    port = default_port
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0:
            raise ConfigError(f"address {text!r}: '[' without ']'")
        host, rest = raw[1:close], raw[close + 1:]
        mx_lookup = False
        if host.lower().startswith("ipv6:"):
            host = host[5:]
            if ":" not in host or not _is_ip(host.strip()):  # RFC 5321: the tag is for IPv6 only
                raise ConfigError(f"address {text!r}: {host!r} after 'IPv6:' is not an IPv6 address")
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"address {text!r}: unexpected {rest!r} after ']'")
            port = _parse_port(rest[1:], text)
    else:
        mx_lookup = True
        host = raw
        if raw.count(":") == 1:
            host, port_text = raw.split(":")
            port = _parse_port(port_text, text)
        elif raw.count(":") > 1:  # a bare IPv6 address: no port can follow without brackets
            mx_lookup = False
    host = host.strip()
    if _is_ip(host):
        return Address(host=host, port=port, mx_lookup=False)
    if ":" in host or not _HOSTNAME.fullmatch(host):
        raise ConfigError(f"address {text!r}: {host!r} is not a host name or IP address")
    return Address(host=host.rstrip(".").lower(), port=port, mx_lookup=mx_lookup)


def _parse_port(text: str, whole: str) -> int:
    # isascii(): str.isdigit() is also true of "²" and other digits int() refuses or misreads.
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ConfigError(f"address {whole!r}: port {text!r} is not a number from 1 to 65535")
    return int(text)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def tls_mode_for_port(port: int) -> str:
    """465 is implicit TLS (the seeds' "SSL"), 587 requires STARTTLS ("TLS"), others opportunistic."""
    return {465: "implicit", 587: "starttls"}.get(port, "opportunistic")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:  # never show the password, even in a traceback
        return f"Credentials(username={self.username!r}, password='***')"


def parse_credentials(text: str, where: str) -> Credentials:
    """The seeds' "username password" form: one space between, the password may hold spaces."""
    username, sep, password = text.strip("\r\n").partition(" ")
    if not sep or not username or not password:
        raise ConfigError(f"{where}: expected \"username password\" separated by one space")
    return Credentials(username=username, password=password)


@dataclass(frozen=True)
class ServerConfig:
    name: str
    address: Address
    tls: str
    credentials: Credentials | None = None
    bulk: bool = False
    rate_per_hour: int = DEFAULT_RATE_PER_HOUR
    per_minute: int | None = None
    unlimited: bool = False
    concurrency: int | None = None
    tls_verify: bool = True
    ca_file: str | None = None
    max_mails_per_connection: int = 1000
    platform: bool = False  # the platform's own: every tenant may send through it
    # Bounces come back here (issue 23): the envelope sender is a signed VERP address on this
    # domain, whose MX is the inbound stage. None: the platform's (MAILPIPE_RETURN_PATH_DOMAIN)
    # for a platform server, no VERP for any other.
    return_path_domain: str | None = None
    credentials_file: str | None = None  # where the credentials came from: watched for changes


@dataclass(frozen=True)
class DkimKey:
    """Signs the tenant's mail from ``domain`` (and its subdomains) with ``selector``."""

    domain: str
    selector: str
    private_key: bytes = field(repr=False)


@dataclass(frozen=True)
class TenantConfig:
    """``server`` is the default (home) server, the first of ``servers``: the daily cap is
    counted under it. ``domains`` holds the verified sender domains in ASCII (IDNA) lowercase
    form, ``*.`` for "any subdomain of"; None means the tenant's senders are not checked."""

    name: str
    server: str
    daily_limit: int = DEFAULT_DAILY_LIMIT
    timezone: str = "UTC"
    dkim: DkimKey | None = None
    servers: tuple[str, ...] = ()
    domains: tuple[str, ...] | None = None
    domain_policy: str = "refuse"
    weight: float = 1.0  # its share of a server against the other tenants with mail waiting
    # Its own return-path domain (a subdomain of one of its domains, MX to the inbound stage):
    # its mail's VERP envelope sender is there, so SPF aligns with its From (DMARC) as before.
    return_path_domain: str | None = None

    def __post_init__(self) -> None:
        if not self.servers:  # built in code with only ``server``: that one
            object.__setattr__(self, "servers", (self.server,))

    def allows_domain(self, domain: str) -> bool:
        """True when ``domain`` (ASCII, any case) is one of the tenant's: exactly, or under a
        ``*.`` entry. Always True for a tenant without ``domains``."""
        if self.domains is None:
            return True
        domain = domain.lower().rstrip(".")
        return any(domain.endswith(d[1:]) if d.startswith("*.") else domain == d for d in self.domains)


@dataclass(frozen=True)
class Config:
    servers: dict[str, ServerConfig] = field(default_factory=dict)
    tenants: dict[str, TenantConfig] = field(default_factory=dict)

    def server(self, name: str) -> ServerConfig:
        try:
            return self.servers[name]
        except KeyError:
            raise ConfigError(f"unknown server {name!r}") from None

    def tenant(self, name: str) -> TenantConfig:
        try:
            return self.tenants[name]
        except KeyError:
            raise ConfigError(f"unknown tenant {name!r}") from None

    @property
    def platform_servers(self) -> tuple[str, ...]:
        """The servers marked ``platform = true``: every tenant may send through them."""
        return tuple(name for name, server in self.servers.items() if server.platform)

    def allowed_servers(self, tenant: TenantConfig) -> tuple[str, ...]:
        """The tenant's own servers (its default first), then the platform's."""
        return tenant.servers + tuple(s for s in self.platform_servers if s not in tenant.servers)

    def route(self, tenant: TenantConfig, requested: str | None) -> ServerConfig:
        """The server a request of ``tenant`` goes through: its default, or the one it names if
        the tenant may use it. The reason of a refusal names the request's field ``server``."""
        if requested is None:
            return self.server(tenant.server)
        if requested not in self.servers:
            raise ConfigError(f"server: unknown server {requested!r}")
        allowed = self.allowed_servers(tenant)
        if requested not in allowed:
            raise ConfigError(f"server: tenant {tenant.name!r} may not send through {requested!r}; "
                              f"its servers are {', '.join(allowed)}")
        return self.servers[requested]

    def return_path_domain(self, server: ServerConfig, tenant: str, platform_domain: str) -> str | None:
        """Where the bounces of ``tenant``'s mail through ``server`` come back (a VERP envelope
        sender there), or None: no VERP. The server must be configured for it (its own
        ``return_path_domain``, or a platform server with ``platform_domain`` set); the tenant's
        own ``return_path_domain``, when it has one, is used in place of the server's."""
        domain = server.return_path_domain or (platform_domain if server.platform else "") or None
        if domain is None:
            return None
        own = self.tenants[tenant].return_path_domain if tenant in self.tenants else None
        return own or domain

    def return_path_domains(self, platform_domain: str) -> frozenset[str]:
        """Every domain bounces may come back to (the inbound stage takes mail for these only)."""
        domains = {s.return_path_domain for s in self.servers.values()}
        domains |= {t.return_path_domain for t in self.tenants.values()}
        domains.add(platform_domain.lower().rstrip(".") or None)
        return frozenset(d for d in domains if d)

    def unchecked_tenants(self) -> list[str]:
        """Tenants without ``domains``: their senders are not checked (warned about at start)."""
        return sorted(name for name, tenant in self.tenants.items() if tenant.domains is None)


# A tenant's weight: bounded so one tenant's turn is never more than 100,000 times another's.
MIN_WEIGHT, MAX_WEIGHT = 0.01, 1000

_SERVER_KEYS = {"address", "credentials_env", "credentials_file", "bulk", "rate_per_hour",
                "per_minute", "unlimited", "concurrency", "tls", "tls_verify", "ca_file",
                "max_mails_per_connection", "platform", "return_path_domain"}
_TENANT_KEYS = {"server", "servers", "daily_limit", "timezone", "dkim_domain", "dkim_selector",
                "dkim_key_file", "dkim_key_env", "domains", "domain_policy", "weight", "return_path_domain"}


def load_config(path: Path | None, environ: dict[str, str] | None = None) -> Config:
    """Read and validate the servers file; no file means no servers and no tenants."""
    if path is None:
        return Config()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: servers file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, str(path), os.environ if environ is None else environ)


def parse_config(data: dict[str, Any], source: str, environ: Any) -> Config:
    unknown = set(data) - {"servers", "tenants"}
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) {sorted(unknown)}; expected servers, tenants")
    servers = {name: _server(name, table, f"{source}: servers.{name}", environ)
               for name, table in _tables(data, "servers", source).items()}
    # A tenant that names no server sends through the platform's (the first marked platform =
    # true), or through the one called "platform", as before servers could be marked.
    default = next((name for name, server in servers.items() if server.platform), "platform")
    tenants = {name: _tenant(name, table, f"{source}: tenants.{name}", environ, default)
               for name, table in _tables(data, "tenants", source).items()}
    for tenant in tenants.values():
        table = data["tenants"][tenant.name]
        if "servers" in table:
            for i, name in enumerate(tenant.servers):
                if name not in servers:
                    raise ConfigError(f"{source}: tenants.{tenant.name}.servers[{i}]: unknown server {name!r}")
        elif tenant.server not in servers:
            raise ConfigError(f"{source}: tenants.{tenant.name}.server: unknown server {tenant.server!r}")
    return Config(servers=servers, tenants=tenants)


def _tables(data: dict[str, Any], key: str, source: str) -> dict[str, dict[str, Any]]:
    tables = data.get(key, {})
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(f"{source}: [{key}] must hold one table per name, like [{key}.NAME]")
    return tables


def _server(name: str, table: dict[str, Any], where: str, environ: Any) -> ServerConfig:
    _no_unknown_keys(table, _SERVER_KEYS, where)
    address = _typed(table, "address", str, where, required=True)
    try:
        parsed = parse_address(address)
    except ConfigError as exc:
        raise ConfigError(f"{where}.address: {exc.reason}") from None
    tls = _typed(table, "tls", str, where) or tls_mode_for_port(parsed.port)
    if tls not in TLS_MODES:
        raise ConfigError(f"{where}.tls: {tls!r} is not one of {', '.join(TLS_MODES)}")
    bulk = _typed(table, "bulk", bool, where) or False
    rate = _typed(table, "rate_per_hour", int, where)
    rate = rate if rate is not None else (BULK_RATE_PER_HOUR if bulk else DEFAULT_RATE_PER_HOUR)
    per_minute = _typed(table, "per_minute", int, where)
    concurrency = _typed(table, "concurrency", int, where)
    max_per_conn = _typed(table, "max_mails_per_connection", int, where)
    max_per_conn = 1000 if max_per_conn is None else max_per_conn  # 0 is an error below, not 1000
    for key, value in (("rate_per_hour", rate), ("per_minute", per_minute),
                       ("concurrency", concurrency), ("max_mails_per_connection", max_per_conn)):
        if value is not None and value <= 0:
            raise ConfigError(f"{where}.{key}: must be > 0, got {value}")
    ca_file = _typed(table, "ca_file", str, where)
    if ca_file is not None and not Path(ca_file).is_file():
        raise ConfigError(f"{where}.ca_file: {ca_file!r} is not a file")
    tls_verify = _typed(table, "tls_verify", bool, where)
    return ServerConfig(
        name=name, address=parsed, tls=tls, credentials=_credentials(table, where, environ),
        bulk=bulk, rate_per_hour=rate, per_minute=per_minute,
        unlimited=_typed(table, "unlimited", bool, where) or False, concurrency=concurrency,
        tls_verify=True if tls_verify is None else tls_verify, ca_file=ca_file,
        max_mails_per_connection=max_per_conn, platform=_typed(table, "platform", bool, where) or False,
        return_path_domain=_return_path_domain(table, where),
        credentials_file=_typed(table, "credentials_file", str, where),
    )


def _return_path_domain(table: dict[str, Any], where: str) -> str | None:
    """A domain name (ASCII lowercase), or None when not given."""
    text = _typed(table, "return_path_domain", str, where)
    if text is None:
        return None
    try:
        return normalize_domain(text)
    except ValueError as exc:
        raise ConfigError(f"{where}.return_path_domain: {text!r} is not a domain name: {exc}") from None


def _credentials(table: dict[str, Any], where: str, environ: Any) -> Credentials | None:
    env_name = _typed(table, "credentials_env", str, where)
    file_name = _typed(table, "credentials_file", str, where)
    if env_name and file_name:
        raise ConfigError(f"{where}: give credentials_env or credentials_file, not both")
    if env_name:
        if env_name not in environ:
            raise ConfigError(f"{where}.credentials_env: environment variable {env_name} is not set")
        return parse_credentials(environ[env_name], f"{where}.credentials_env ({env_name})")
    if file_name:
        try:
            text = Path(file_name).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"{where}.credentials_file: cannot read {file_name!r}: {exc.strerror}") from None
        return parse_credentials(text, f"{where}.credentials_file")
    return None


def _tenant(name: str, table: dict[str, Any], where: str, environ: Any,
            default_server: str = "platform") -> TenantConfig:
    _no_unknown_keys(table, _TENANT_KEYS, where)
    servers = _servers_list(table, where)
    server = servers[0] if servers else _typed(table, "server", str, where) or default_server
    daily_limit = _typed(table, "daily_limit", int, where)
    daily_limit = DEFAULT_DAILY_LIMIT if daily_limit is None else daily_limit
    if daily_limit <= 0:
        raise ConfigError(f"{where}.daily_limit: must be > 0, got {daily_limit}")
    timezone = _typed(table, "timezone", str, where) or "UTC"
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{where}.timezone: unknown time zone {timezone!r}") from None
    domains = _domains(table, where)
    policy = _typed(table, "domain_policy", str, where)
    if policy is not None and policy not in DOMAIN_POLICIES:
        raise ConfigError(f"{where}.domain_policy: {policy!r} is not one of {', '.join(DOMAIN_POLICIES)}")
    if policy is not None and domains is None:
        raise ConfigError(f"{where}.domain_policy: needs domains (the tenant's verified sender domains)")
    return_path = _return_path_domain(table, where)
    if return_path is not None and domains is not None and not any(
            return_path.endswith("." + d.removeprefix("*.")) or return_path == d for d in domains):
        raise ConfigError(f"{where}.return_path_domain: {return_path!r} is not at one of the tenant's domains "
                          f"(SPF would not align with its From)")
    return TenantConfig(name=name, server=server, daily_limit=daily_limit, timezone=timezone,
                        dkim=_dkim(table, where, environ), servers=servers or (server,), domains=domains,
                        domain_policy=policy or "refuse", weight=_weight(table, where),
                        return_path_domain=return_path)


def _weight(table: dict[str, Any], where: str) -> float:
    """A tenant's weight in the fair share of a server: a number in [0.01, 1000], default 1."""
    value = table.get("weight", 1)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}.weight: expected a number, got {type(value).__name__} {value!r}")
    if not MIN_WEIGHT <= value <= MAX_WEIGHT:
        raise ConfigError(f"{where}.weight: must be between {MIN_WEIGHT} and {MAX_WEIGHT}, got {value}")
    return float(value)


def _servers_list(table: dict[str, Any], where: str) -> tuple[str, ...]:
    """``servers = [...]``: the tenant's own servers, the first its default; () when absent."""
    if "servers" not in table:
        return ()
    if "server" in table:
        raise ConfigError(f"{where}: give server or servers, not both (servers[0] is the default)")
    servers = _string_list(table, "servers", where)
    if not servers:
        raise ConfigError(f"{where}.servers: empty; name at least the tenant's default server")
    for i, name in enumerate(servers):
        if name in servers[:i]:
            raise ConfigError(f"{where}.servers[{i}]: {name!r} is listed twice")
    return servers


def _domains(table: dict[str, Any], where: str) -> tuple[str, ...] | None:
    """``domains = [...]``: each a domain name (any case, IDN or its xn-- form, a trailing dot
    ignored), or ``*.domain`` for its subdomains; stored in ASCII lowercase. None when absent."""
    if "domains" not in table:
        return None
    out: list[str] = []
    for i, text in enumerate(_string_list(table, "domains", where)):
        wildcard = text.startswith("*.")
        try:
            domain = normalize_domain(text[2:] if wildcard else text)
        except ValueError as exc:
            raise ConfigError(f"{where}.domains[{i}]: {text!r} is not a domain name: {exc}") from None
        entry = f"*.{domain}" if wildcard else domain
        if entry not in out:
            out.append(entry)
    return tuple(out)


@functools.lru_cache(maxsize=4096)  # a tenant's sender domains recur: checked once (profiled: half the intake)
def normalize_domain(text: str) -> str:
    """A mail domain in its ASCII (IDNA) lowercase form, or ValueError saying why it is not one.
    The same library checks the senders' addresses (email-validator, no DNS), so both sides of
    a comparison are normalized alike."""
    text = text.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text or "@" in text or any(c in text for c in "\r\n\0"):
        raise ValueError("empty, or contains @, CR, LF or NUL")
    try:
        checked = validate_email(f"postmaster@{text}", check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise ValueError(str(exc).replace("after the @-sign", "domain")) from None
    return str(checked.ascii_domain).lower()


def _string_list(table: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = table[key]
    if not isinstance(value, list):
        raise ConfigError(f"{where}.{key}: expected a list of strings, got {type(value).__name__} {value!r}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{where}.{key}[{i}]: expected str, got {type(item).__name__} {item!r}")
    return tuple(value)


def _dkim(table: dict[str, Any], where: str, environ: Any) -> DkimKey | None:
    domain = _typed(table, "dkim_domain", str, where)
    selector = _typed(table, "dkim_selector", str, where)
    key_file = _typed(table, "dkim_key_file", str, where)
    key_env = _typed(table, "dkim_key_env", str, where)
    if not (domain or selector or key_file or key_env):
        return None
    if not (domain and selector and (key_file or key_env)):
        raise ConfigError(f"{where}: DKIM needs dkim_domain, dkim_selector and dkim_key_file or dkim_key_env")
    if key_file and key_env:
        raise ConfigError(f"{where}: give dkim_key_file or dkim_key_env, not both")
    if key_env:
        if key_env not in environ:
            raise ConfigError(f"{where}.dkim_key_env: environment variable {key_env} is not set")
        key = environ[key_env].encode()
    else:
        try:
            key = Path(str(key_file)).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}.dkim_key_file: cannot read {key_file!r}: {exc.strerror}") from None
    if b"PRIVATE KEY-----" not in key:
        raise ConfigError(f"{where}: the DKIM key is not a PEM private key")
    return DkimKey(domain=domain.lower().rstrip("."), selector=selector, private_key=key)


def _no_unknown_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def _typed(table: dict[str, Any], key: str, kind: type, where: str, required: bool = False) -> Any:
    if key not in table:
        if required:
            raise ConfigError(f"{where}.{key}: missing")
        return None
    value = table[key]
    # bool is an int in Python; a rate of `true` is a mistake, not 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


class ConfigWatcher:
    """Holds the current config and re-reads the file when its mtime changes.

    A file that becomes invalid is reported once and the last good config is kept,
    so a typo in production does not stop the pipeline.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.config = load_config(path)
        self._mtime = self._stat()
        self.last_error: str | None = None

    def _stat(self) -> tuple[int | None, ...]:
        """The servers file's mtime, and each credentials file's: a password changed in its own
        file (a rotated secret) is read again too, and resumes its server if it paused it."""
        files = [self.path, *(Path(s.credentials_file) for s in self.config.servers.values() if s.credentials_file)]
        return tuple(_mtime_ns(f) for f in files if f is not None)

    def current(self) -> Config:
        if self._stat() != self._mtime:
            try:
                self.config = load_config(self.path)
                self.last_error = None
            except ConfigError as exc:
                self.last_error = exc.reason
            self._mtime = self._stat()  # the files the config now names
        return self.config
