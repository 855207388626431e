"""The VERP envelope on the wire (issue 23): against a server that announces DSN, each recipient
gets a transaction of its own with a signed return path, MAIL carries RET=HDRS and ENVID=<job>,
RCPT carries NOTIFY=FAILURE,DELAY and ORCPT=rfc822;<recipient>; without DSN, none of them.
aiosmtpd refuses parameters it does not know, so the peer here is a few lines of SMTP of its own,
over a real socket, that writes down every command."""

from __future__ import annotations

import asyncio
import time

import pytest

from mailpipe.model import Job, new_id, now_ms
from mailpipe.servers import parse_config
from mailpipe.settings import Settings
from mailpipe.verp import Token
from sender.delivery import BatchDelivery, deliver
from sender.envelope import Envelopes
from sender.pool import Pools

pytestmark = pytest.mark.integration

SETTINGS = Settings(verp_keys="6:the dsn wire test's key", return_path_domain="bounces.example.net")


async def recording_server(announce_dsn: bool, commands: list[str]) -> asyncio.Server:
    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 dsn.test ESMTP\r\n")
        while line := await reader.readline():
            command = line.decode().rstrip("\r\n")
            verb = command.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                writer.write(b"250-dsn.test\r\n" + (b"250-DSN\r\n" if announce_dsn else b"") + b"250 8BITMIME\r\n")
            elif verb == "DATA":
                writer.write(b"354 go ahead\r\n")
                while (await reader.readline()) != b".\r\n":
                    pass
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == "QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                commands.append(command)
                writer.write(b"250 OK\r\n")
            await writer.drain()
        writer.close()

    return await asyncio.start_server(session, "127.0.0.1", 0)


def send(announce_dsn: bool, job: Job) -> tuple[list[str], BatchDelivery]:
    commands: list[str] = []

    async def go() -> BatchDelivery:
        server = await recording_server(announce_dsn, commands)
        port = server.sockets[0].getsockname()[1]
        config = parse_config({"servers": {"platform": {"address": f"[127.0.0.1]:{port}", "tls": "none",
                                                        "platform": True}},
                               "tenants": {"acme": {}}}, "test", {})
        srv = config.servers["platform"]
        pools = Pools(default_size=1, timeout_s=5.0, idle_timeout_s=60)
        try:
            return await deliver([job], srv, pools.get(srv), time.monotonic() + 30, hold=None, margin_s=0.2,
                                 plan=Envelopes(SETTINGS).planner(srv, config))
        finally:
            await pools.close()
            server.close()
            await server.wait_closed()
    return commands, asyncio.run(go())


def test_dsn_parameters_and_a_return_path_per_recipient() -> None:
    job = Job(id=new_id(), tenant="acme", server="platform", sender="news@acme.example",
              recipients=("ann@example.net", "bob+x@example.net"), message=b"Subject: hi\r\n\r\nHello\r\n",
              created_ms=now_ms())
    commands, result = send(True, job)
    assert result.outcomes[0].sent == ["ann@example.net", "bob+x@example.net"]
    mails = [c for c in commands if c.startswith("MAIL")]
    rcpts = [c for c in commands if c.startswith("RCPT")]
    assert len(mails) == 2 and len(rcpts) == 2, "one transaction per recipient"
    signer = Envelopes(SETTINGS).signer
    assert signer is not None
    for mail, rcpt, recipient in zip(mails, rcpts, job.recipients, strict=True):
        sender = mail.split("<", 1)[1].split(">", 1)[0]
        local, _, domain = sender.partition("@")
        token = signer.verify(local, ["acme"])
        assert domain == "bounces.example.net" and isinstance(token, Token)
        assert signer.names_recipient(token, recipient) and token.job_id == job.id
        assert mail.endswith(f" RET=HDRS ENVID={job.id}")
        xtext = recipient.replace("+", "+2B")
        assert rcpt == f"RCPT TO:<{recipient}> NOTIFY=FAILURE,DELAY ORCPT=rfc822;{xtext}"


def test_no_dsn_parameters_where_the_server_does_not_announce_dsn() -> None:
    job = Job(id=new_id(), tenant="acme", server="platform", sender="news@acme.example",
              recipients=("ann@example.net",), message=b"Subject: hi\r\n\r\nHello\r\n", created_ms=now_ms())
    commands, result = send(False, job)
    assert result.outcomes[0].sent == ["ann@example.net"]
    (mail,) = [c for c in commands if c.startswith("MAIL")]
    assert "@bounces.example.net>" in mail and "RET=" not in mail and "ENVID=" not in mail
    assert [c for c in commands if c.startswith("RCPT")] == ["RCPT TO:<ann@example.net>"]
