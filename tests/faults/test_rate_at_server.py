"""The rate holds at the SMTP server, not only at the grant (issue 12, finding 6).

A granted batch may be started any time before its deadline, and a sender that stalls keeps
receiving granted batches (its prefetch) while the limiter goes on granting to the others; when
it resumes it sends what it holds beside the fresh grants the other replica sends. The promise
is kept at the server: in every window ``w`` it receives at most ``rate x w + burst``.

One limiter and two sender replicas (processes), one SMTP server at 36,000 mails/hour (10/s),
burst 20, a 1 s window with a 0.2 s margin (as in the fault campaign). A backlog of 600 mails,
in batches of 5 jobs of three recipients each, is published to ``batches`` already packed
(about a minute at the rate). While it drains, the senders are stopped (SIGSTOP) in turn, for
a few seconds each, many times. Then, once the run has drained (every mail at the peer or dead,
every queue of the namespace empty, no claim held in Redis), the peer's arrival times must
show at most ``10 x w + 20`` transactions in every window of 1, 10 and 60 s, and every
recipient must have been accepted exactly once.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis

from mailpipe.amqp import Broker, Outgoing
from mailpipe.codec import encode_batch, encode_job
from mailpipe.model import Batch, Job, new_id, now_ms
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from tests.faults.checker import Fault, check
from tests.faults.harness import LedgerPeer, Pipeline, dead_for_check, held_claims, queue_depths, write_servers
from tests.faults.ledger import read_dead

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

RATE_PER_S = 10
BURST = 20
WINDOW_S = 1.0
MARGIN_S = 0.2
BATCH_MAILS = 5
RECIPIENTS = 3
MAILS = 600  # about a minute at the rate
SENDERS = ("sender-0", "sender-1")
STALL_S = 3.0  # each stop, longer than the window: what the stopped sender holds is late
GAP_S = 1.5  # between one sender's SIGCONT and the next stop
DRAIN_TIMEOUT_S = 60.0  # after the backlog's own minute


def backlog(n: int) -> tuple[list[Batch], dict[str, tuple[str, ...]]]:
    """``n`` jobs of ``RECIPIENTS`` recipients in packed batches of ``BATCH_MAILS``, and the
    recipients of each job. Each message carries its job id in its Message-ID (the peer's key)."""
    batches, recipients = [], {}
    for first in range(0, n, BATCH_MAILS):
        jobs = []
        for i in range(first, min(n, first + BATCH_MAILS)):
            job_id = new_id()
            to = tuple(f"user{i}-{k}@example.com" for k in range(RECIPIENTS))
            message = (f"Message-ID: <{job_id}@acme.example>\r\nFrom: hr@acme.example\r\n"
                       f"To: {', '.join(to)}\r\nSubject: Rate {i}\r\n\r\nHello from the rate test.\r\n").encode()
            jobs.append(encode_job(Job(id=job_id, tenant="acme", server="tenant-smtp", sender="hr@acme.example",
                                       recipients=to, message=message, created_ms=now_ms())))
            recipients[job_id] = to
        batches.append(Batch(id=new_id(), server="tenant-smtp", jobs=tuple(jobs), mails=len(jobs),
                             bytes=sum(len(j) for j in jobs), created_ms=now_ms(), tenants={"acme": len(jobs)}))
    return batches, recipients


def drained(settings: Settings, client: redis.Redis) -> str:
    """What is still in flight ("" when nothing): a queue of the namespace not empty (ready or
    unacked; the dead letters aside), or a claim held in Redis."""
    depths = queue_depths(settings.namespace)
    if depths is None:
        return "RabbitMQ does not answer"
    busy = {q: d for q, d in depths.items() if q != Topology(settings.namespace).dead and d != (0, 0)}
    claims = held_claims(client, settings.namespace)
    return f"queues (ready, unacked) {busy}, {claims} claims held" if busy or claims else ""


def test_stalled_senders_do_not_push_the_server_above_rate_times_window_plus_burst(
        settings: Settings, tmp_path: Path) -> None:
    settings = settings.replace(burst_mails=BURST, window_s=WINDOW_S, send_margin_s=MARGIN_S,
                                max_batch_mails=BATCH_MAILS,
                                # The whole backlog held in the limiter's line, none parked for a minute.
                                limiter_prefetch=2 * MAILS // BATCH_MAILS)
    batches, confirmed = backlog(MAILS)
    wanted = {(job, r) for job, rcpts in confirmed.items() for r in rcpts}
    logs = tmp_path / "logs"
    logs.mkdir()
    faults: list[Fault] = []
    with LedgerPeer() as peer:
        write_servers(settings, peer.port, server=(
            f'[servers.tenant-smtp]\naddress = "[127.0.0.1]:{peer.port}"\ntls = "none"\n'
            f'rate_per_hour = {RATE_PER_S * 3600}\n'
            '[tenants.acme]\nserver = "tenant-smtp"\ndaily_limit = 1000000\n'))
        pipeline = Pipeline(settings, logs, stages=("limiter", "sender"), replicas=2)
        pipeline.names.remove("limiter-1")  # one limiter, two senders
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
        origin = time.time()
        with pipeline:
            broker = Broker(settings.amqp_url, client_name="test-rate-at-server").connect()
            broker.publish([Outgoing(Topology(settings.namespace).batches, encode_batch(b), message_id=b.id)
                            for b in batches])
            broker.close()

            def at_peer() -> int:
                with peer._lock:
                    return len({(a.job_id, r) for a in peer.accepted for r in a.recipients} & wanted)

            stopped = ""
            try:
                flowing = time.monotonic() + 30
                while not peer.accepted and time.monotonic() < flowing and not pipeline.dead():
                    time.sleep(0.05)
                assert peer.accepted, f"no mail reached the peer within 30 s\n{pipeline.logs()}"
                # The fault schedule: stop each sender in turn while a good part of the backlog is left.
                turn = 0
                while at_peer() < len(wanted) - 60 * RECIPIENTS and time.time() - origin < 2 * MAILS / RATE_PER_S:
                    assert not pipeline.dead(), f"{pipeline.dead()} died\n{pipeline.logs()}"
                    stopped = SENDERS[turn % 2]
                    faults.append(Fault(time.time() - origin, "stop", stopped, STALL_S))
                    pipeline.signal(stopped, signal.SIGSTOP)
                    time.sleep(STALL_S)
                    pipeline.signal(stopped, signal.SIGCONT)
                    stopped = ""
                    time.sleep(GAP_S)
                    turn += 1
                # The end of the run is a condition, not a pause: every mail at the peer or dead,
                # then nothing in flight anywhere (polled until it holds twice in a row).
                deadline = time.monotonic() + max(DRAIN_TIMEOUT_S / 2, MAILS / RATE_PER_S + DRAIN_TIMEOUT_S
                                                  - (time.time() - origin))
                in_a_row, why = 0, "not polled"
                while in_a_row < 2:
                    assert time.monotonic() < deadline, f"not drained: {why}\n{pipeline.logs()}"
                    assert not pipeline.dead(), f"{pipeline.dead()} died\n{pipeline.logs()}"
                    dead_jobs = {j for e in read_dead(settings.amqp_url, settings.namespace) for j in e.job_ids}
                    with peer._lock:
                        got = {(a.job_id, r) for a in peer.accepted for r in a.recipients}
                    missing = {(j, r) for j, r in wanted if j not in dead_jobs} - got
                    why = f"{len(missing)} recipients neither at the peer nor dead" if missing else \
                        drained(settings, client)
                    in_a_row = in_a_row + 1 if not why else 0
                    time.sleep(0.5)
            finally:
                if stopped:
                    pipeline.signal(stopped, signal.SIGCONT)
        client.close()
        with peer._lock:
            accepted = list(peer.accepted)
        dead = dead_for_check(settings)
    report = check(seed=0, confirmed=confirmed, accepted=accepted, dead=dead, rate_per_s=RATE_PER_S,
                   burst=BURST, faults=faults, origin=origin, duration_s=time.time() - origin)
    worst = ", ".join(f"{w.worst} in {w.window_s:g} s (bound {w.bound:g}, from t={w.start:.1f})"
                      for w in report.windows)
    print(f"\n{len(faults)} stops, {report.transactions} transactions in {report.duration_s:.1f} s; worst: {worst}")
    assert len(faults) >= 6, f"the senders were stopped only {len(faults)} times: the run drained too fast"
    assert report.ok, "violations:\n" + "\n".join(report.violations()) + "\n" + report.to_json()
    assert not report.explained and not report.unexplained, \
        f"a recipient accepted more than once:\n{report.to_json()}"
    assert report.failed == 0 and report.delivered == len(wanted), report.to_json()
