"""``mailpipe servers check [NAME]``: try each server now, in seconds, and say what works.

For each server: connect, negotiate TLS as configured, authenticate, and say so step by step;
on failure, the server's reply, the category and what to do. No mail is sent, and the
password is never printed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from mailpipe.errors import ConfigError, SmtpError
from mailpipe.servers import Config, ServerConfig
from sender.mx import MxResolver
from sender.smtp import open_connection
from sender.translate import reply_of


def check_servers(config: Config, names: Sequence[str] = (), *, timeout_s: float = 10.0,
                  out: TextIO | None = None) -> int:
    """Check the servers named (all when none are): 0 when every one works, 1 otherwise."""
    out = out or sys.stdout
    try:
        servers = [config.server(name) for name in names] if names else list(config.servers.values())
    except ConfigError as exc:
        print(f"error: {exc.reason}; known servers: {', '.join(sorted(config.servers)) or 'none'}",
              file=out)
        return 1
    if not servers:
        print("no servers configured (MAILPIPE_SERVERS_FILE)", file=out)
        return 1
    ok = True
    for server in servers:
        ok = asyncio.run(_check(server, timeout_s, out)) and ok
    return 0 if ok else 1


async def _check(server: ServerConfig, timeout_s: float, out: TextIO) -> bool:
    def say(text: str) -> None:
        print(f"{server.name}: {text}", file=out)

    verify = ("certificate verified" + (f" against {server.ca_file}" if server.ca_file else "")
              if server.tls_verify else "certificate NOT verified (tls_verify = false)")
    user = server.credentials.username if server.credentials else None
    say(f"{server.address} (TLS: {server.tls}; {'AUTH as ' + user if user else 'no AUTH'})")
    started = time.monotonic()
    try:
        conn = await open_connection(server, timeout_s=timeout_s, resolver=MxResolver())
    except SmtpError as exc:
        reply = reply_of(exc)
        say(f"FAILED after {time.monotonic() - started:.1f} s [{reply.category}]: {exc.reason}")
        if reply.advice:
            say(f"what to do: {reply.advice}")
        return False
    try:
        elapsed = time.monotonic() - started
        say(f"connected in {elapsed:.2f} s")
        if conn.tls:
            say(f"TLS ok ({conn.tls_version or 'TLS'}, {verify})")
        elif server.tls == "opportunistic":
            say("server does not offer STARTTLS: mail goes in clear (opportunistic)")
        else:
            say("no TLS (tls = none): mail goes in clear")
        if conn.authenticated:
            say(f"AUTH ok as {user}")
        size = conn.session.extensions.get("size")
        if size:
            say(f"server accepts messages up to {int(size) / 1024 / 1024:.1f} MiB")
        say("OK")
        return True
    finally:
        await conn.quit()
