"""No duplicate without a fault on the wire: a deferred recipient is not sent again under its old attempt.

The claims of a (job, attempt) said, after any refusal, ``x <grant>``: "attempted under that
grant, its outcome published". For a 4xx that outcome is a retry copy of the job under attempt
+ 1, whose claims live under another key. ``claims.lua`` treats ``x <grant>`` as final only for
a holder of the *same* grant (a dead letter replayed goes out under the same attempt); a holder
of the same (job, attempt) under any other grant got code 1 (claimable) and sent the recipient
again, while the retry copy sent it once more.

Two holders of one (job, attempt) under two grants are what the claims are there for (design
notes, "One holder per recipient"): a re-packed batch (a packer that died after its confirm),
a give-back racing a copy of its batch, a late copy of a granted part that hands back what a
live holder still has, a limiter's part published again without its cached grant. Here the
copy is made deterministic: the same job in two batches, as a re-packing packer publishes it
(new batch id, same job bytes). The peer answers the first RCPT with 451 (times=1).

Whichever holder claims first gets the 451: it defers the recipient, publishes the retry copy
(attempt 1) and releases the claim. The other holder (G2) finds it released, or waits for it
(HELD, asked again every 250 ms) and then finds it released: before the fix, code 1, it sent
attempt 0, 250, and the retry copy sent it again, 250: the peer accepted it twice with no
connection cut, no reply lost, no holder dead. Now it is done for G2 too: once, by the copy.

Real RabbitMQ, Redis, SMTP peer and stage processes; no mocks. The fix: a deferral releases
its claim as ``d <grant>``, "carried on by the next attempt", final for every holder of this
attempt whatever its grant (``sender/claims.lua``).
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
from tests.faults.harness import LedgerPeer, Pipeline, in_flight, write_servers

pytestmark = [pytest.mark.faults, pytest.mark.integration]

RECIPIENT = "deferred-once@example.com"


def _job(settings: Settings) -> Job:
    job_id = new_id()
    req = IntakeRequest(id=job_id, tenant="acme", sender="hr@acme.example", created_ms=now_ms(),
                        to=(RECIPIENT,), subject="Deferred once", text="Hello.\n")
    return Job(id=job_id, tenant="acme", server="tenant-smtp", sender=req.sender, recipients=(RECIPIENT,),
               message=render(req, job_id), created_ms=req.created_ms, enqueued_ms=now_ms())


def _batch_of(job: Job) -> Batch:
    """A batch as the packer makes it; a re-packing packer makes another with a new id."""
    raw = codec.encode_job(job)
    return Batch(id=new_id(), server=job.server, jobs=(raw,), mails=1, bytes=job.size, created_ms=now_ms(),
                 tenants={job.tenant: 1})


def test_deferred_recipient_is_not_sent_again_by_a_copy_under_another_grant(
        settings: Settings, tmp_path: Path) -> None:
    settings = settings.replace(window_s=5.0, send_margin_s=0.2, linger_ms=100, smtp_timeout_s=3.0,
                                retry_base_s=1, retry_max_s=2)
    logs = tmp_path / "logs"
    logs.mkdir()
    with LedgerPeer() as peer:
        peer.refuse(RECIPIENT, 451, "4.7.1 Try again later", times=1)
        write_servers(settings, peer.port)  # unlimited: both copies are granted at once
        with Pipeline(settings, logs, stages=("packer", "limiter", "sender")) as pipeline:
            job = _job(settings)
            first, second = _batch_of(job), _batch_of(job)
            batches = Topology.from_settings(settings).batches
            broker = Broker(settings.amqp_url, client_name="dupe-repro").connect()
            try:
                broker.publish([Outgoing(batches, codec.encode_batch(b), message_id=b.id) for b in (first, second)])
            finally:
                broker.close()
            client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
            try:
                # Until the mail is at the peer and nothing is in flight, twice in a row (the
                # retry copy waits ~1 s in its delay queue, then goes packer -> limiter -> sender).
                deadline = time.monotonic() + 60
                quiet = 0
                while time.monotonic() < deadline and quiet < 3:
                    accepted = [a for a in peer.accepted if a.job_id == job.id]
                    busy = in_flight(settings, client)
                    quiet = quiet + 1 if accepted and not busy else 0
                    time.sleep(0.5)
                assert not pipeline.dead(), pipeline.logs()
            finally:
                client.close()
        with peer._lock:
            copies = [a for a in peer.accepted if a.job_id == job.id]
    times = [round(a.at - copies[0].at, 3) for a in copies] if copies else []
    assert len(copies) == 1, (
        f"{RECIPIENT} accepted {len(copies)} times (at +{times} s, client ports "
        f"{[a.client_port for a in copies]}): the holder of the second grant sent attempt 0 after the "
        "first deferred it, and the retry copy (attempt 1) sent it again\n" + pipeline.logs(6000))
