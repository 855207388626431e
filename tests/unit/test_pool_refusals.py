"""sender/pool.py ``refused_alone``: relaying denied for one recipient is that recipient's
failure when the server takes other mail around it, and the server's (a signal, towards a pause)
when it does not."""

from __future__ import annotations

import asyncio

from mailpipe.servers import ServerConfig, parse_address
from sender.pool import ServerPool


def pool() -> ServerPool:
    async def make() -> ServerPool:  # the pool's events belong to a loop
        server = ServerConfig(name="s", address=parse_address("[127.0.0.1]:2525"), tls="none")
        return ServerPool(server, size=2, timeout_s=5, idle_timeout_s=60)
    return asyncio.run(make())


def test_a_recipient_refused_again_after_the_server_took_a_mail_is_refused_alone() -> None:
    p = pool()
    assert not p.refused_alone("j1", "a@example.com")  # first: not judged
    assert not p.refused_alone("j1", "a@example.com")  # again, nothing taken since, never proven
    p.proven()
    assert p.refused_alone("j1", "a@example.com")


def test_a_lone_refusal_on_a_proven_server_is_the_recipient_s_unless_others_were_refused_meanwhile() -> None:
    p = pool()
    p.proven()
    assert not p.refused_alone("j1", "a@example.com")
    p.broken()  # its signal: the server is on trial again
    assert p.refused_alone("j1", "a@example.com")  # nobody else refused: the recipient's

    p.proven()
    assert not p.refused_alone("j2", "b@example.com")
    p.broken()
    assert not p.refused_alone("j3", "c@example.com")  # another refused meanwhile: a broken server
    assert not p.refused_alone("j2", "b@example.com")
    assert not p.refused_alone("j3", "c@example.com")  # and it was on trial at c's first refusal


def test_the_same_recipient_of_another_job_is_judged_apart() -> None:
    p = pool()
    assert not p.refused_alone("j1", "a@example.com")
    p.proven()
    assert not p.refused_alone("j2", "a@example.com")
    assert p.refused_alone("j1", "a@example.com")
