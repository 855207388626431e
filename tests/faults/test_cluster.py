"""The three promises on a real cluster (issue 15): three RabbitMQ nodes with quorum queues
replicated on all three, and Redis as a primary, two replicas and three Sentinels
(``mailpipe.devcluster.LocalCluster``, on free ports in a tmp dir, started once for the module).

2 replicas of every stage, given every node's URL (node 0 first), the Sentinels, a quorum group
size of 3 and ``WAIT 1``; the limits on, as in the fault campaign: one SMTP server (the
timestamping ``LedgerPeer``) at 36,000 mails/hour (10/s), burst 20, a 1 s window with a 0.2 s
margin. A publisher thread publishes through ``Producer(cluster.amqp_urls(), ...)`` and records
every call: confirmed (it returned), or raised, and how long it took either way.

- ``test_kill_9_the_node_the_stages_use``: kill -9 RabbitMQ node 0 under load: every stage
  reconnects by itself within 30 s (its log's "reconnected to RabbitMQ"), nothing confirmed is
  lost, no duplicate (no SMTP connection was cut, so neither SMTP kind can occur); node 0 is
  started again while mail flows.
- ``test_majority_lost_publishes_fail_loudly``: two of the three nodes stopped: every publish
  made meanwhile raises within the Producer's ``reconnect_s`` (+ a margin), none returns; the
  nodes start again, nothing confirmed is lost and the pipeline drains.
- ``test_redis_primary_killed``: kill -9 the Redis primary under load: no mail reaches the peer
  from just after the kill until Sentinel has promoted a replica; the peer never receives more
  than rate x window + burst in any window of 1, 10 or 60 s (the worst excess is printed, the
  docs quote it); the old primary comes back as a replica.

Each test ends when the run has drained (every confirmed job at the peer or dead-lettered, then
no queue of its namespace holding a message, ready or unacked, and no claim held, twice in a
row), then the checker judges loss per recipient, duplicates and the rate at the peer. Each test
prints its figures as JSON, and the module a summary of all of them at the end.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from mailpipe import redis_client
from mailpipe.devcluster import LocalCluster, free_ports, missing_binaries
from mailpipe.errors import ClusterError, MailpipeError
from mailpipe.model import IntakeRequest, job_id_for, now_ms
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from producer import Producer
from tests.faults.checker import CampaignReport, Fault, check, rate_windows
from tests.faults.harness import (
    LedgerPeer,
    Pipeline,
    _unavailable,
    dead_for_check,
    held_claims,
    parse_depths,
    tcp_client_ports,
    wait_until,
    write_servers,
)
from tests.faults.ledger import read_dead

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.slow, pytest.mark.cluster]

RATE_PER_S = 10
BURST = 20
WINDOW_S = 1.0
MARGIN_S = 0.2
RECIPIENTS = 3
CHUNK = 5  # mails per publish call, and per batch
STAGE_NAMES = [f"{s}-{r}" for s in ("producer", "packer", "limiter", "sender") for r in range(2)]
# The Producer's own give-up time: a publish no node confirms raises after this.
PRODUCER_RECONNECT_S = 3.0
# What a raise may take beyond reconnect_s: the Producer checks its deadline between attempts,
# and the attempt under way (a connect that a node being stopped accepts but does not answer,
# bounded by the Broker's 5 s stack timeout with several URLs; a publish's 0.5 s minimum) ends
# first.
RAISE_MARGIN_S = 6.0
RECONNECT_LIMIT_S = 30.0  # the bound on a stage's own reconnection
# A transaction on the wire when Redis died still completes (its claim was taken before): one
# per SMTP connection, each well under a second on loopback.
REDIS_KILL_GRACE_S = 1.0

SUMMARY: dict[str, Any] = {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    if missing := missing_binaries():
        _unavailable(f"not installed: {', '.join(missing)}: the local cluster cannot start")
    ports = free_ports(12)
    # Three Redis: after a failover the new primary still has a replica, so WAIT 1 keeps working.
    local = LocalCluster(tmp_path_factory.mktemp("cluster"), rabbit_ports=ports[0:3], dist_ports=ports[3:6],
                         redis_ports=ports[6:9], sentinel_ports=ports[9:12])
    started = time.monotonic()
    try:
        local.up()
        SUMMARY["cluster_up_s"] = round(time.monotonic() - started, 1)
        yield local
    finally:
        local.down()
        SUMMARY["module_wall_s"] = round(time.monotonic() - started, 1)
        print("\ncluster fault tests:\n" + json.dumps(SUMMARY, indent=2))


@pytest.fixture(autouse=True)
def healed(cluster: LocalCluster) -> Iterator[None]:
    """After each test the cluster is whole again, so the next one starts on three nodes and a
    primary with two replicas: a test that failed half-way may have left a node or Redis down."""
    yield
    status = cluster.status()
    for i, row in enumerate(status["rabbitmq"]):
        if not row["alive"]:
            cluster.start_rabbit(i)
    for row in status["redis"]:
        if not row["alive"]:
            with contextlib.suppress(ClusterError):
                cluster.wait_for_new_primary(row["port"], timeout_s=30)
            cluster.start_redis(row["port"])


def cluster_settings(cluster: LocalCluster, tmp_path: Path) -> Settings:
    primary = cluster.redis_primary()
    return Settings(
        amqp_url=cluster.amqp_urls()[0], amqp_urls=",".join(cluster.amqp_urls()), quorum_group_size=3,
        # With Sentinels the URL gives only the database; the primary's port keeps anything that
        # would read it from reaching the machine's own Redis.
        redis_url=f"redis://127.0.0.1:{primary}/0",
        redis_sentinels=",".join(f"{h}:{p}" for h, p in cluster.sentinels()), redis_master=cluster.master,
        redis_wait_replicas=1, namespace=f"test-cluster-{uuid.uuid4().hex[:8]}",
        servers_file=str(tmp_path / "servers.toml"), linger_ms=100, retry_base_s=1, retry_max_s=2,
        shutdown_timeout_s=10, burst_mails=BURST, window_s=WINDOW_S, send_margin_s=MARGIN_S,
        max_batch_mails=CHUNK, smtp_timeout_s=3.0,
        # A limiter may hold the whole backlog (a test's few hundred mails in batches of 5).
        limiter_prefetch=100,
        # JSON lines carry a timestamp to the millisecond: a reconnection is timed from them.
        log_format="json")


def write_rate_limited_server(settings: Settings, port: int) -> None:
    write_servers(settings, port, server=(
        f'[servers.tenant-smtp]\naddress = "[127.0.0.1]:{port}"\ntls = "none"\n'
        f'rate_per_hour = {RATE_PER_S * 3600}\n'
        '[tenants.acme]\nserver = "tenant-smtp"\ndaily_limit = 1000000\n'))


# -- the publisher ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """One ``publish_requests`` call: when it started (wall clock), how long it took, and the
    exception it raised ("" when it returned, that is, when RabbitMQ confirmed it)."""

    started: float
    seconds: float
    ids: tuple[str, ...]
    error: str = ""


class Publisher(threading.Thread):
    """Publishes ``CHUNK`` mails of ``RECIPIENTS`` recipients per call, at about ``per_s``
    mails/s, until ``total`` or ``stop_now``; one Producer, given every node of the cluster."""

    def __init__(self, urls: list[str], namespace: str, total: int, per_s: float) -> None:
        super().__init__(name="cluster-publisher", daemon=True)
        self.urls, self.namespace, self.total, self.per_s = urls, namespace, total, per_s
        self.confirmed: dict[str, tuple[str, ...]] = {}
        self.attempted: set[str] = set()
        self.calls: list[Call] = []
        self.stop_now = threading.Event()
        # When the call under way started (wall clock), None between calls: a call that hangs
        # is seen while it hangs, not only once (if ever) it ends.
        self.in_call_since: float | None = None
        self._lock = threading.Lock()

    def requests(self, first: int, n: int) -> list[IntakeRequest]:
        out = []
        for i in range(first, first + n):
            key = f"{self.namespace}-{i}"
            out.append(IntakeRequest(
                id=job_id_for("acme", key), tenant="acme", sender="hr@acme.example", created_ms=now_ms(),
                to=tuple(f"user{i}-{k}@example.com" for k in range(RECIPIENTS)), subject=f"Cluster {i}",
                text="Hello from the cluster fault tests.\n", idempotency_key=key))
        return out

    def run(self) -> None:
        started = time.monotonic()
        with Producer(self.urls, self.namespace, reconnect_s=PRODUCER_RECONNECT_S) as producer:
            for first in range(0, self.total, CHUNK):
                if self.stop_now.is_set():
                    return
                batch = self.requests(first, min(CHUNK, self.total - first))
                ids = tuple(r.id for r in batch)
                with self._lock:
                    self.attempted |= set(ids)
                wall, t0 = time.time(), time.monotonic()
                self.in_call_since = wall
                error = ""
                try:
                    producer.publish_requests(batch)
                except MailpipeError as exc:  # not confirmed: it may or may not be queued
                    error = f"{type(exc).__name__}: {exc.reason}"
                except Exception as exc:  # anything else is a finding: recorded, never swallowed
                    error = f"UNEXPECTED {type(exc).__name__}: {exc}"
                with self._lock:
                    self.in_call_since = None
                    self.calls.append(Call(wall, time.monotonic() - t0, ids, error))
                    if not error:
                        self.confirmed.update((r.id, r.to) for r in batch)
                pause = started + (first + CHUNK) / self.per_s - time.monotonic()
                if pause > 0:
                    self.stop_now.wait(pause)

    def snapshot(self) -> tuple[dict[str, tuple[str, ...]], set[str], list[Call]]:
        with self._lock:
            return dict(self.confirmed), set(self.attempted), list(self.calls)

    def stack(self) -> str:
        """Where the publisher thread is now (for a call that does not end)."""
        frame = sys._current_frames().get(self.ident or 0)
        return "".join(traceback.format_stack(frame)) if frame is not None else "(not running)"


# -- the drain, on the cluster ------------------------------------------------------------------

def queue_depths(cluster: LocalCluster, namespace: str) -> dict[str, tuple[int, int]] | None:
    """Every queue of ``namespace`` with its (ready, unacked) counts, as the first node that
    answers ``rabbitmqctl list_queues`` lists them; None while none does."""
    for i in range(len(cluster.rabbit_ports)):
        try:
            out = cluster.ctl(i, "list_queues", "-q", "--no-table-headers", "-p", "/", "name", "messages_ready",
                              "messages_unacknowledged", timeout_s=30)
        except ClusterError:
            continue
        return parse_depths(out, namespace)
    return None


def in_flight(cluster: LocalCluster, settings: Settings, client: redis.Redis) -> str:
    """What is still in flight in the namespace ("" when nothing): a queue not listed yet (a
    restarted node lists a quorum queue once it has recovered), a queue holding a message ready
    or unacked (the dead letters aside), or a claim held in Redis."""
    depths = queue_depths(cluster, settings.namespace)
    if depths is None:
        return "no RabbitMQ node answers"
    if missing := set(Topology.from_settings(settings).all_queues) - set(depths):
        return f"queues not listed yet: {sorted(missing)[:3]}"
    busy = {q: d for q, d in depths.items() if q != Topology(settings.namespace).dead and d != (0, 0)}
    try:
        claims = held_claims(client, settings.namespace)
    except redis.RedisError as exc:
        return f"Redis: {exc}"
    return f"queues (ready, unacked) {busy}, {claims} claims held" if busy or claims else ""


@dataclass
class Settled:
    seconds: float
    waited_for: list[tuple[float, str]]  # what was still in flight, from when (s), as it changed


def settle(cluster: LocalCluster, settings: Settings, peer: LedgerPeer, confirmed: set[str], pipeline: Pipeline,
           timeout_s: float) -> Settled:
    """Wait until every confirmed job reached the peer or the dead-letter queue, then until
    nothing is in flight, twice in a row: only then can no further copy reach the peer."""
    started = time.monotonic()
    waited: list[tuple[float, str]] = []

    def accounted() -> bool:
        missing = confirmed - peer.accepted_jobs()
        if missing:
            missing -= {job for entry in read_dead(settings.amqp_url, settings.namespace) for job in entry.job_ids}
        return not missing

    wait_until(accounted, timeout_s, f"{len(confirmed)} confirmed jobs at the peer or dead", pipeline)
    client = redis_client.connect(settings, timeout_s=5.0)
    why = ""
    in_a_row = 0

    def drained() -> bool:
        nonlocal why, in_a_row
        why = in_flight(cluster, settings, client)
        if why and (not waited or waited[-1][1] != why):
            waited.append((round(time.monotonic() - started, 1), why))
        in_a_row = 0 if why else in_a_row + 1
        return in_a_row >= 2

    try:
        wait_until(drained, timeout_s, "the run to drain (nothing in flight, twice in a row)", pipeline)
    except BaseException:
        print(f"still in flight: {why}")
        raise
    finally:
        client.close()
    return Settled(time.monotonic() - started, waited)


def judge(settings: Settings, peer: LedgerPeer, publisher: Publisher, faults: list[Fault],
          origin: float) -> CampaignReport:
    confirmed, attempted, _ = publisher.snapshot()
    with peer._lock:
        accepted = list(peer.accepted)
    # No fault here cuts an SMTP connection or drops a reply: no duplicate has evidence, and
    # the checker counts any as unexplained.
    return check(seed=0, confirmed=confirmed, attempted=attempted, accepted=accepted,
                 dead=dead_for_check(settings), rate_per_s=RATE_PER_S, burst=BURST, faults=faults,
                 origin=origin, duration_s=time.time() - origin)


def over_release(report: CampaignReport) -> dict[str, int]:
    """Per window length, how far the worst window went above rate x window + burst (0: not)."""
    return {f"{w.window_s:g}s": max(0, int(w.worst - w.bound)) for w in report.windows}


def wait_flowing(peer: LedgerPeer, pipeline: Pipeline, mails: int) -> None:
    """Faults are applied under load: once ``mails`` reached the peer."""
    wait_until(lambda: len(peer.accepted) >= mails, 90, f"{mails} mails at the peer before the fault", pipeline)


def connected_to(pipeline: Pipeline, port: int) -> list[str]:
    """The stage processes holding a connection to 127.0.0.1:``port``."""
    return [name for name in pipeline.names if tcp_client_ports(pipeline.pid(name), port)]


def reconnections(log_dir: Path, since: float) -> dict[str, float]:
    """Per stage process, the seconds from ``since`` to its first "reconnected to RabbitMQ"
    log line after it (mailpipe/stage.py logs it once it consumes again)."""
    found: dict[str, float] = {}
    for name in STAGE_NAMES:
        path = log_dir / f"{name}.log"
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a traceback's lines, or anything not from the JSON formatter
            if (isinstance(record, dict) and str(record.get("msg", "")).startswith("reconnected to RabbitMQ")
                    and float(record.get("ts", 0)) >= since):
                found[name] = round(float(record["ts"]) - since, 2)
                break
    return found


def report_json(name: str, figures: dict[str, Any], report: CampaignReport) -> None:
    figures |= {"mails_confirmed": report.mails, "unconfirmed_publishes": report.unconfirmed,
                "transactions_at_peer": report.transactions, "recipients_lost": report.lost,
                "recipients_dead_lettered": report.failed, "dead_letter_reasons": report.failed_reasons,
                "duplicates": {"explained": len(report.explained), "unexplained": len(report.unexplained)},
                "worst_windows": {f"{w.window_s:g}s": {"worst": w.worst, "bound": w.bound} for w in report.windows}}
    SUMMARY[name] = figures
    print(f"\n{name}:\n{json.dumps(figures, indent=2)}")


# -- a. kill -9 the node the stages use -----------------------------------------------------------

def test_kill_9_the_node_the_stages_use(cluster: LocalCluster, tmp_path: Path) -> None:
    wall = time.monotonic()
    settings, logs = cluster_settings(cluster, tmp_path), logs_dir(tmp_path)
    faults: list[Fault] = []
    node0 = cluster.rabbit_ports[0]
    with LedgerPeer() as peer:
        write_rate_limited_server(settings, peer.port)
        origin = time.time()
        with Pipeline(settings, logs, replicas=2) as pipeline:
            assert pipeline.names == STAGE_NAMES
            # Node 0 is every stage's first URL: each must be on it before it is killed.
            wait_until(lambda: connected_to(pipeline, node0) == STAGE_NAMES, 60,
                       "every stage connected to node 0", pipeline)
            publisher = Publisher(cluster.amqp_urls(), settings.namespace, total=240, per_s=15.0)
            publisher.start()
            try:
                wait_flowing(peer, pipeline, 40)
                killed_at = time.time()
                cluster.kill_rabbit(0)
                faults.append(Fault(killed_at - origin, "kill -9", cluster.rabbit_node(0)))
                wait_until(lambda: len(reconnections(logs, killed_at)) == len(STAGE_NAMES), RECONNECT_LIMIT_S + 30,
                           "every stage to log its reconnection", pipeline)
                reconnected = reconnections(logs, killed_at)
                nodes = {name: [i for i, port in enumerate(cluster.rabbit_ports)
                                if tcp_client_ports(pipeline.pid(name), port)] for name in STAGE_NAMES}
                restart = time.monotonic()
                cluster.start_rabbit(0)
                restart_s = time.monotonic() - restart
                faults.append(Fault(time.time() - origin, "start", cluster.rabbit_node(0), restart_s))
                publisher.join(120)
                assert not publisher.is_alive(), "the publisher did not finish"
                confirmed, _, calls = publisher.snapshot()
                settled = settle(cluster, settings, peer, set(confirmed), pipeline, 120)
            finally:
                publisher.stop_now.set()
        report = judge(settings, peer, publisher, faults, origin)
    figures = {
        "reconnect_s": reconnected, "reconnect_s_max": max(reconnected.values()),
        "reconnected_to_nodes": nodes, "node0_restart_s": round(restart_s, 1),
        # A publish that raises here is not a failure of the test (it is not confirmed, and the
        # checker counts it apart), but how it fails and how fast is worth reading.
        "publishes_raised": [{"after_s": round(c.seconds, 2), "at_s": round(c.started - killed_at, 2),
                              "error": c.error} for c in calls if c.error],
        "settle_s": round(settled.seconds, 1), "settle_waited_for": settled.waited_for[:8],
        "wall_s": round(time.monotonic() - wall, 1)}
    report_json("a_kill_9_rabbitmq_node_0", figures, report)
    slow = {n: s for n, s in reconnected.items() if s > RECONNECT_LIMIT_S}
    assert not slow, f"stages that took over {RECONNECT_LIMIT_S:g} s to reconnect: {slow}"
    assert all(n and 0 not in n for n in nodes.values()), f"a stage not on a surviving node: {nodes}"
    assert_promises(report)


def logs_dir(tmp_path: Path) -> Path:
    logs = tmp_path / "logs"
    logs.mkdir()
    return logs


def assert_promises(report: CampaignReport) -> None:
    """What every scenario ends with: publishes were confirmed, and the checker found nothing."""
    assert report.mails > 0, "no publish was confirmed"
    assert report.ok, "violations:\n" + "\n".join(report.violations()) + "\n" + report.to_json()


# -- b. the queues lose their majority ------------------------------------------------------------

def test_majority_lost_publishes_fail_loudly(cluster: LocalCluster, tmp_path: Path) -> None:
    wall = time.monotonic()
    settings, logs = cluster_settings(cluster, tmp_path), logs_dir(tmp_path)
    faults: list[Fault] = []
    with LedgerPeer() as peer:
        write_rate_limited_server(settings, peer.port)
        origin = time.time()
        with Pipeline(settings, logs, replicas=2) as pipeline:
            # Below the rate: the test is about what the client sees, and the drain stays short.
            publisher = Publisher(cluster.amqp_urls(), settings.namespace, total=2000, per_s=8.0)
            publisher.start()
            stopped: list[int] = []
            try:
                wait_flowing(peer, pipeline, 30)
                # One node down: the queues keep their majority (2 of 3) and publishes go on.
                stopped.append(2)
                cluster.stop_rabbit(2)
                faults.append(Fault(time.time() - origin, "stop", cluster.rabbit_node(2)))
                # A second one: every quorum queue is left with one member of three.
                stopped.append(1)
                cluster.stop_rabbit(1)
                lost_at = time.time()
                faults.append(Fault(lost_at - origin, "stop", cluster.rabbit_node(1)))

                def raised_since_loss() -> int:
                    return sum(1 for c in publisher.snapshot()[2] if c.started >= lost_at and c.error)

                def hung_s() -> float:
                    since = publisher.in_call_since
                    return time.time() - since if since is not None else 0.0

                # Three publishes raise, or one is seen to hang past its bound (then the nodes are
                # started again all the same: what was confirmed must still be delivered).
                wait_until(lambda: raised_since_loss() >= 3 or hung_s() > PRODUCER_RECONNECT_S + RAISE_MARGIN_S,
                           60, "3 publishes to raise (or one to hang) without a majority", pipeline)
                # A call in progress counts as hung only past the bound (the next publish may
                # have just begun when the third one raised).
                in_call = hung_s()
                hung = round(in_call, 1) if in_call > PRODUCER_RECONNECT_S + RAISE_MARGIN_S else 0.0
                hung_stack = publisher.stack() if hung else ""
                restored_at = time.time()
                restart = time.monotonic()
                while stopped:
                    cluster.start_rabbit(stopped.pop(0))
                restart_s = time.monotonic() - restart
                faults.append(Fault(restored_at - origin, "start", "nodes 2 and 1", restart_s))

                def confirmed_since_restore() -> int:
                    return sum(1 for c in publisher.snapshot()[2] if c.started >= restored_at and not c.error)

                wait_until(lambda: confirmed_since_restore() >= 5, 60, "publishes confirmed again", pipeline)
                publisher.stop_now.set()
                publisher.join(30)
                assert not publisher.is_alive(), "the publisher did not stop"
                confirmed, _, calls = publisher.snapshot()
                settled = settle(cluster, settings, peer, set(confirmed), pipeline, 180)
            finally:
                publisher.stop_now.set()
                # Before the stages are stopped: without a majority, their stop hangs on the
                # queues (a basic.cancel is answered after RabbitMQ's own 60 s timeout).
                for i in stopped:
                    with contextlib.suppress(ClusterError):
                        cluster.start_rabbit(i)
        report = judge(settings, peer, publisher, faults, origin)
    # The calls made while no majority existed: each that ended before the nodes came back must
    # have raised, and each (one still under way then included) must have ended within its bound.
    during = [c for c in calls if lost_at <= c.started < restored_at]
    ended = [c for c in during if c.started + c.seconds <= restored_at]
    raised = [c for c in ended if c.error]
    bound_s = PRODUCER_RECONNECT_S + RAISE_MARGIN_S
    figures = {
        "majority_lost_s": round(restored_at - lost_at, 1), "nodes_restart_s": round(restart_s, 1),
        "publishes_during_loss": len(during), "raised_during_loss": len(raised),
        "returned_during_loss": len(ended) - len(raised),
        "call_seconds_during_loss": [{"s": round(c.seconds, 2), "error": c.error[:120]} for c in during],
        "raise_after_s_max": round(max((c.seconds for c in raised), default=0.0), 2),
        "hung_call_s_when_seen": hung, "producer_reconnect_s": PRODUCER_RECONNECT_S, "bound_s": bound_s,
        "errors": sorted({c.error.split(":")[0] for c in raised}),
        "publishes_raised_total": sum(1 for c in calls if c.error),
        "settle_s": round(settled.seconds, 1), "settle_waited_for": settled.waited_for[:8],
        "wall_s": round(time.monotonic() - wall, 1)}
    report_json("b_majority_lost", figures, report)
    assert len(raised) == len(ended), \
        f"publishes returned (confirmed) while no majority existed: {[c for c in ended if not c.error]}"
    assert not [c for c in raised if c.error.startswith("UNEXPECTED")], f"not a MailpipeError: {raised}"
    slow = [c for c in during if c.seconds > bound_s]
    assert not slow and not hung, (
        f"publishes made without a majority must raise within reconnect_s + {RAISE_MARGIN_S:g} s = {bound_s:g} s; "
        f"these took longer: {[(round(c.seconds, 1), c.error[:100]) for c in slow]}; one was seen hung "
        f"for {hung} s in:\n{hung_stack}")
    assert len(raised) >= 3, f"too few publishes raised while the majority was lost: {figures}"
    assert_promises(report)


# -- c. the Redis primary dies ----------------------------------------------------------------------

def test_redis_primary_killed(cluster: LocalCluster, tmp_path: Path) -> None:
    wall = time.monotonic()
    settings, logs = cluster_settings(cluster, tmp_path), logs_dir(tmp_path)
    faults: list[Fault] = []
    with LedgerPeer() as peer:
        write_rate_limited_server(settings, peer.port)
        origin = time.time()
        with Pipeline(settings, logs, replicas=2) as pipeline:
            publisher = Publisher(cluster.amqp_urls(), settings.namespace, total=240, per_s=15.0)
            publisher.start()
            try:
                wait_flowing(peer, pipeline, 40)
                killed_at = time.time()
                old = cluster.kill_redis_primary()
                killed = time.time()
                faults.append(Fault(killed_at - origin, "kill -9", f"redis primary {old}"))
                replicas = [p for p in cluster.redis_ports if p != old]
                # Until a replica says it is primary, no Redis can grant or claim anything: the
                # start of the last poll that found none bounds that time from below.
                no_primary_until = killed
                deadline = time.monotonic() + 60
                while not any(cluster.redis_role(p) == "master" for p in replicas):
                    assert time.monotonic() < deadline, f"no replica promoted in 60 s\n{pipeline.logs()}"
                    no_primary_until = time.time()
                    time.sleep(0.05)
                promoted_seen = time.time()
                new = cluster.wait_for_new_primary(old, timeout_s=30)
                faults.append(Fault(promoted_seen - origin, "promoted", f"redis {new}"))
                publisher.join(120)
                assert not publisher.is_alive(), "the publisher did not finish"
                confirmed, _, _ = publisher.snapshot()
                settled = settle(cluster, settings, peer, set(confirmed), pipeline, 120)
            finally:
                publisher.stop_now.set()
        back = time.monotonic()
        cluster.start_redis(old)
        back_s = time.monotonic() - back
        assert cluster.redis_role(old) == "slave", f"Redis {old} did not come back as a replica"
        report = judge(settings, peer, publisher, faults, origin)
        with peer._lock:
            arrivals = sorted(a.at for a in peer.accepted)
    silent_from = killed + REDIS_KILL_GRACE_S
    while_none = [t for t in arrivals if silent_from < t <= no_primary_until]
    before_kill = [t for t in arrivals if t <= killed_at]
    after = [t for t in arrivals if t > promoted_seen]
    excess = over_release(report)
    after_windows = rate_windows(after, RATE_PER_S, BURST, origin=origin)
    figures = {
        "killed_primary": old, "promoted": new,
        "no_primary_s": round(no_primary_until - killed_at, 2),
        "promotion_seen_s": round(promoted_seen - killed_at, 2),
        "arrivals_while_no_primary": len(while_none),
        "arrivals_after_kill_within_grace": len([t for t in arrivals if killed_at < t <= silent_from]),
        "last_arrival_before_kill_s": round(killed_at - before_kill[-1], 2) if before_kill else None,
        "first_arrival_after_promotion_s": round(after[0] - promoted_seen, 2) if after else None,
        "over_release_mails": excess, "over_release_max": max(excess.values()),
        "over_release_after_promotion": {f"{w.window_s:g}s": max(0, int(w.worst - w.bound)) for w in after_windows},
        # How much of the burst the peer saw used after the promotion (the worst window less the
        # rate's share of it): a new primary that forgot grants would show here first.
        "burst_used_after_promotion": {f"{w.window_s:g}s": int(w.worst - RATE_PER_S * w.window_s)
                                       for w in after_windows},
        "wait_replicas": settings.redis_wait_replicas, "old_primary_back_as_replica_s": round(back_s, 1),
        "settle_s": round(settled.seconds, 1), "settle_waited_for": settled.waited_for[:8],
        "wall_s": round(time.monotonic() - wall, 1)}
    report_json("c_redis_primary_killed", figures, report)
    assert not while_none, (f"{len(while_none)} mails reached the peer while no Redis primary answered "
                            f"({silent_from - origin:.2f} .. {no_primary_until - origin:.2f} s): {figures}")
    assert_promises(report)
