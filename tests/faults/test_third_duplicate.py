"""The third duplicate (issue 21, item 1): a deferral whose holder dies between publishing the
retry copy and recording the deferral in its claim.

Before, a 4xx'd recipient's retry copy (attempt N + 1) was confirmed by RabbitMQ first, and only
then was the claim of attempt N released as ``d <grant>`` ("carried on by the next attempt",
final for every holder). A sender that died in that gap (or whose release failed, or whose
RabbitMQ connection dropped mid-publish) left the claim "held by the old holder under G". When
that lease ended, the redelivered batch handed the recipient back, the give-back was granted
again, and its holder, under another grant, found the claim free and sent attempt N, while
attempt N + 1 was on its way from the retry queue: the recipient got the mail twice, with no
fault on the wire.

The scenario, made deterministic: the peer answers 451 once to R, and at that moment Redis
stops taking writes for 8 s (``CLIENT PAUSE 8000 WRITE``, on a private Redis: the shared one is
never paused). The sender blocks in its next Redis write; the test sees it blocked
(``CLIENT LIST``: its connection, flag ``b``, a script) and kills it with -9, then starts another.
The pause is lifted once the sender is dead (``CLIENT UNPAUSE``): the rest of it would only try
the limiter under a pause, which is the fault campaign's business.

Now the deferral is recorded in the claim before anything is published (``D <owner> <until>
<grant>``, one script call, sender/claims.py): a holder that dies before it leaves either
nothing recorded and nothing published (the recipient is sent once, under attempt N, by the
next holder), or the intent recorded, in which case the next holder republishes the retry
copy (a second copy of attempt N + 1 is harmless: its own claims send it once) and never sends
attempt N.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from mailpipe import codec
from mailpipe.amqp import Broker, Outgoing
from mailpipe.model import Batch, IntakeRequest, Job, new_id, now_ms
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from producer.compose import render
from tests.faults.harness import LedgerPeer, Pipeline, PrivateRedis, in_flight, tcp_client_ports, write_servers

pytestmark = [pytest.mark.faults, pytest.mark.integration]

RECIPIENT = "deferred-once@example.com"
PAUSE_MS = 8000


def _job() -> Job:
    job_id = new_id()
    req = IntakeRequest(id=job_id, tenant="acme", sender="hr@acme.example", created_ms=now_ms(),
                        to=(RECIPIENT,), subject="Deferred once", text="Hello.\n")
    return Job(id=job_id, tenant="acme", server="tenant-smtp", sender=req.sender, recipients=(RECIPIENT,),
               message=render(req, job_id), created_ms=req.created_ms, enqueued_ms=now_ms())


def blocked_in_a_script(client: redis.Redis, pid: int, redis_port: int) -> bool:
    """Whether process ``pid`` has a script call held by the pause (flag ``b``)."""
    ports = {f"127.0.0.1:{p}" for p in tcp_client_ports(pid, redis_port)}
    return any(c.get("addr") in ports and "b" in c.get("flags", "") and c.get("cmd", "").startswith("eval")
               for c in client.client_list())


def test_a_sender_killed_while_its_deferral_waits_for_redis_sends_the_mail_once(
        settings: Settings, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    with PrivateRedis(tmp_path) as private_redis, LedgerPeer() as peer:
        settings = settings.replace(redis_url=private_redis.url, window_s=5.0, send_margin_s=0.2, linger_ms=100,
                                    smtp_timeout_s=3.0, retry_base_s=1, retry_max_s=2, reconnect_max_s=1.0)
        client = redis.Redis.from_url(private_redis.url, socket_timeout=5, decode_responses=True)
        paused: list[float] = []

        def pause_writes_then_defer(address: str) -> bool:
            if address.lower() != RECIPIENT:
                return False
            client.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
            paused.append(time.monotonic())
            return True

        peer.refuse(pause_writes_then_defer, 451, "4.7.1 Try again later", times=1)
        write_servers(settings, peer.port)  # unlimited: grants at once
        with Pipeline(settings, logs, stages=("packer", "limiter", "sender")) as pipeline:
            job = _job()
            raw = codec.encode_job(job)
            batch = Batch(id=new_id(), server=job.server, jobs=(raw,), mails=1, bytes=job.size,
                          created_ms=now_ms(), tenants={job.tenant: 1})
            broker = Broker(settings.amqp_url, client_name="third-duplicate").connect()
            try:
                broker.publish([Outgoing(Topology.from_settings(settings).batches, codec.encode_batch(batch),
                                         message_id=batch.id)])
            finally:
                broker.close()
            deadline = time.monotonic() + 30
            while not (paused and blocked_in_a_script(client, pipeline.pid("sender-0"), private_redis.port)):
                assert time.monotonic() < deadline, "the sender never blocked in Redis\n" + pipeline.logs()
                assert not paused or time.monotonic() - paused[0] < 4.5, (
                    "the sender did not block in Redis within 4.5 s of the pause\n" + pipeline.logs())
                time.sleep(0.02)
            pipeline.kill("sender-0")
            client.execute_command("CLIENT", "UNPAUSE")
            pipeline.start("sender-0")
            # Until the mail is at the peer and nothing is in flight, three times in a row: the
            # pause ends, the retry copy (if any) and the give-back come back through the limiter.
            deadline = time.monotonic() + 90
            quiet = 0
            while time.monotonic() < deadline and quiet < 3:
                accepted = [a for a in peer.accepted if a.job_id == job.id]
                busy = in_flight(settings, client)
                quiet = quiet + 1 if accepted and not busy else 0
                time.sleep(0.5)
            assert not pipeline.dead(), pipeline.logs()
        client.close()
        with peer._lock:
            copies = [a for a in peer.accepted if a.job_id == job.id]
    times = [round(a.at - copies[0].at, 3) for a in copies] if copies else []
    assert len(copies) == 1, (
        f"{RECIPIENT} accepted {len(copies)} times (at +{times} s): the next holder sent attempt 0 "
        "while the retry copy (attempt 1) sent it too\n" + pipeline.logs(6000))
