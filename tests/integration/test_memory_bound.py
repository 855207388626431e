"""A stage's memory is bounded in bytes: requests and jobs over ``large_message_bytes`` travel on
the ``.large`` queues, consumed with ``large_prefetch``, so a stage holds at most
prefetch x large_message_bytes + large_prefetch x the largest message, whatever the mix.

Real RabbitMQ and Redis. The enqueue stage and the packer are driven in this process as the
runner drives them (every input of ``Stage.inputs``, poll, ``_handle``, tick), and the broker
counts the bytes of the deliveries they hold unacked. The last test runs the enqueue stage as
a process on the worst input of the defaults and measures its peak RSS against the manifest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pika
import pytest
import yaml

from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.codec import decode_batch, decode_job, encode_bundle, encode_intake, encode_job
from mailpipe.lanes import lane_id, queue_name
from mailpipe.model import Attachment, IntakeRequest, Job, new_id, now_ms
from mailpipe.settings import MIB, Settings
from mailpipe.stage import Stage, _handle
from mailpipe.topology import Topology
from packer.stage import PackerStage
from producer import Producer
from producer.client import intake_messages
from producer.stage import EnqueueStage
from tests.stages import settings_env

pytestmark = pytest.mark.integration

KIB = 1024
MANIFESTS = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def write_servers(settings: Settings) -> None:
    Path(settings.servers_file).write_text(
        '[servers.tenant-smtp]\naddress = "[127.0.0.1]:2525"\ntls = "none"\nunlimited = true\n\n'
        '[tenants.acme]\nserver = "tenant-smtp"\ndaily_limit = 100000\n', encoding="utf-8")


def raw_mail(i: int, size: int) -> bytes:
    head = (f"From: hr@acme.example\r\nTo: user{i}@example.com\r\nSubject: Mail {i}\r\n"
            f"Message-ID: <{i}.{new_id()}@acme.example>\r\n\r\n").encode()
    line = b"x" * 998 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def raw_requests(count: int, size: int) -> list[IntakeRequest]:
    return [IntakeRequest(id=new_id(), tenant="acme", sender="hr@acme.example", created_ms=now_ms(),
                          message=raw_mail(i, size), recipients=(f"user{i}@example.com",))
            for i in range(count)]


def depth(settings: Settings, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()


class Driven:
    """A stage run by hand as mailpipe.stage.run runs it: one consumer per input, each with
    its own prefetch; then poll, _handle, tick. Its broker counts the unacked bytes."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.broker = Broker(stage.settings.amqp_url, client_name=f"test-{stage.name}").connect()
        stage.topology.declare(self.broker.channel())
        stage.start(self.broker)
        for queue, prefetch in stage.inputs:
            self.broker.consume(queue, prefetch)
        self.largest: dict[str, int] = {}  # by queue: the largest delivery seen

    def run_until(self, done: Callable[[], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"{self.stage.name}: not done within {timeout_s} s"
            deliveries: list[Delivery] = self.broker.poll(0.05)
            for d in deliveries:
                self.largest[d.routing_key] = max(self.largest.get(d.routing_key, 0), len(d.body))
            if deliveries:
                _handle(self.stage, self.broker, deliveries)
            self.stage.tick(self.broker)

    def bound(self) -> int:
        """What the prefetches allow for the messages it actually got: the sum over its inputs
        of prefetch x the largest message of that queue."""
        return sum(prefetch * self.largest.get(queue, 0) for queue, prefetch in self.stage.inputs)

    def close(self) -> None:
        self.broker.close()
        self.stage.close()


def test_large_and_small_mail_flow_with_the_bytes_held_bounded(settings: Settings) -> None:
    """40 requests of 2 MiB and 460 small ones, through the client: every one becomes a job (the
    large ones on jobs.large), every job lands in a batch, and neither stage ever held more than
    prefetch x the small class + large_prefetch x the large one. Without size classes the
    enqueue stage would have held all 40 large requests (80 MiB) at once."""
    write_servers(settings)
    topology = Topology.from_settings(settings)
    large, small = raw_requests(40, 2 * MIB), raw_requests(460, 2 * KIB)  # not a full batch: the large ones join it
    declare = Broker(settings.amqp_url, client_name="test-declare").connect()
    topology.declare(declare.channel())
    declare.close()
    with Producer(settings.amqp_url, settings.namespace) as producer:
        producer.publish_requests(small + large)
    # The small ones in bundles of 100 (each under 256 KiB), the large ones alone.
    bundles = [m for m in intake_messages(topology, small + large) if m.routing_key == topology.intake]
    assert len(bundles) == 5
    assert depth(settings, topology.intake) == len(bundles)
    assert depth(settings, topology.intake_large) == 40

    enqueue = Driven(EnqueueStage(settings))
    try:
        enqueue.run_until(lambda: depth(settings, topology.intake) == depth(settings, topology.intake_large) == 0
                          and depth(settings, topology.jobs_large) == 40 and enqueue.broker.unacked_bytes == 0)
        held, bound = enqueue.broker.peak_unacked_bytes, enqueue.bound()
    finally:
        enqueue.close()
    assert depth(settings, topology.jobs_large) == 40 and depth(settings, topology.jobs) >= 1  # bundled
    assert depth(settings, topology.dead) == 0
    assert enqueue.largest[topology.intake] <= settings.large_message_bytes < enqueue.largest[topology.intake_large]
    assert 2 * MIB < held <= bound, (held, bound)
    assert held <= settings.prefetch * 3 * KIB + settings.large_prefetch * (2 * MIB + 64 * KIB)
    assert held < 40 * 2 * MIB / 4  # far from all 40 at once

    packer = Driven(PackerStage(settings))
    lane = queue_name(settings.namespace, "tenant-smtp", lane_id("acme", "normal"))
    topology.declare_lane(packer.broker.channel(), lane)  # where the packer publishes acme's batches
    batches = []

    def packed() -> bool:
        channel = packer.broker.channel()
        while True:
            method, _props, body = channel.basic_get(lane, auto_ack=True)
            if method is None:
                break
            batches.append(decode_batch(body))
        return sum(b.mails for b in batches) >= 500

    try:
        packer.run_until(packed)
        held, bound = packer.broker.peak_unacked_bytes, packer.bound()
    finally:
        packer.close()
    assert held <= bound, (held, bound)
    assert held <= packer.stage.prefetch * settings.large_message_bytes + settings.large_prefetch * 3 * MIB
    jobs = [decode_job(raw) for b in batches for raw in b.jobs]
    assert sorted(j.id for j in jobs) == sorted(r.id for r in small + large), "each job once"
    for batch in batches:
        assert batch.mails <= settings.max_batch_mails and batch.bytes <= settings.max_batch_bytes
        assert batch.bytes == sum(decode_job(raw).size for raw in batch.jobs)
    sizes = [{topology.is_large(len(raw)) for raw in b.jobs} for b in batches]
    assert any(s == {True, False} for s in sizes), "large and small jobs of one server share batches"
    assert depth(settings, topology.jobs) == depth(settings, topology.jobs_large) == 0


def test_a_large_request_on_the_small_queue_is_still_processed(settings: Settings) -> None:
    """A publisher that ignores the rule (a 1 MiB request on intake) gets its mail queued, on
    jobs.large; the bound is for publishers that follow the rule."""
    write_servers(settings)
    topology = Topology.from_settings(settings)
    (req,) = raw_requests(1, MIB)
    broker = Broker(settings.amqp_url, client_name="test-rude-publisher").connect()
    topology.declare(broker.channel())
    broker.publish([Outgoing(topology.intake, encode_intake(req), message_id=req.id)])
    broker.close()
    enqueue = Driven(EnqueueStage(settings))
    try:
        enqueue.run_until(lambda: depth(settings, topology.jobs_large) >= 1)
    finally:
        enqueue.close()
    assert depth(settings, topology.dead) == 0 and depth(settings, topology.jobs) == 0


def _manifest_memory_limit(stage: str) -> int:
    doc = next(d for d in yaml.safe_load_all((MANIFESTS / f"{stage}.yaml").read_text())
               if d and d["kind"] == "Deployment")
    limit = doc["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    units = {"Mi": MIB, "Gi": 1024 * MIB}
    return int(limit[:-2]) * units[limit[-2:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="os.wait4's ru_maxrss in KiB is Linux's")
def test_the_enqueue_stage_fits_its_manifest_under_the_worst_input(settings: Settings, tmp_path: Path) -> None:
    """The defaults' worst input for the enqueue stage: a full window of small requests just
    under 256 KiB on intake and large ones of 24 MiB on intake.large, all there at once. Its
    peak RSS (the kernel's, for the process) stays under the manifest's memory limit."""
    settings = settings.replace(linger_ms=500)
    write_servers(settings)
    topology = Topology.from_settings(settings)
    small = raw_requests(settings.prefetch, settings.large_message_bytes - 2 * KIB)
    large = raw_requests(settings.large_prefetch, 24 * MIB)
    # Composed: an 18 MiB attachment renders, in base64, to 24 MiB.
    large += [IntakeRequest(id=new_id(), tenant="acme", sender="hr@acme.example", created_ms=now_ms(),
                            to=(f"big{i}@example.com",), subject="Report", text="Attached.",
                            attachments=(Attachment("report.pdf", "application/pdf", os.urandom(18 * MIB)),))
              for i in range(settings.large_prefetch)]
    broker = Broker(settings.amqp_url, client_name="test-declare").connect()
    topology.declare(broker.channel())
    broker.close()
    with Producer(settings.amqp_url, settings.namespace) as producer:
        for chunk in (small[:250], small[250:], *([r] for r in large)):
            producer.publish_requests(chunk)
    del small, large
    assert depth(settings, topology.intake) == settings.prefetch
    assert depth(settings, topology.intake_large) == 2 * settings.large_prefetch
    expected = settings.prefetch + 2 * settings.large_prefetch
    peak, output = _peak_rss(settings, tmp_path, "producer", lambda: depth(settings, topology.jobs)
                             + depth(settings, topology.jobs_large) == expected)
    assert depth(settings, topology.jobs) == settings.prefetch, output
    assert depth(settings, topology.jobs_large) == 2 * settings.large_prefetch, output
    limit = _manifest_memory_limit("producer")
    print(f"enqueue stage peak RSS {peak / MIB:.0f} MiB, manifest limit {limit / MIB:.0f} MiB")
    assert peak < limit, f"peak RSS {peak / MIB:.0f} MiB over the manifest's {limit / MIB:.0f} MiB\n{output}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="os.wait4's ru_maxrss in KiB is Linux's")
@pytest.mark.parametrize("per_message", [1, 2], ids=["alone", "bundled"])
def test_the_packer_fits_its_manifest_under_the_worst_input(settings: Settings, tmp_path: Path,
                                                            per_message: int) -> None:
    """The defaults' worst input for the packer: a full window (1,000) of messages just under
    256 KiB on jobs, a job each or a jobs bundle of two (whose jobs the packer keeps as views of
    the delivery, not copies: with copies a window of bundles would be held twice over), and
    jobs of 24 MiB on jobs.large, for one server: its open batches hold the window and close at
    80 MB. Its peak RSS stays under the manifest's memory limit."""
    topology = Topology.from_settings(settings)
    stage = PackerStage(settings)
    window = stage.prefetch

    def job(i: int, size: int) -> bytes:
        return encode_job(Job(id=new_id(), tenant="acme", server="tenant-smtp", sender="hr@acme.example",
                              recipients=(f"user{i}@example.com",), message=raw_mail(i, size),
                              created_ms=now_ms(), enqueued_ms=now_ms()))

    def message(i: int) -> Outgoing:
        jobs = [job(i * per_message + k, (settings.large_message_bytes - 2 * KIB) // per_message - KIB)
                for k in range(per_message)]
        body = jobs[0] if per_message == 1 else encode_bundle("job", jobs)
        assert len(body) <= settings.large_message_bytes
        return Outgoing(topology.jobs, body)

    broker = Broker(settings.amqp_url, client_name="test-declare").connect()
    topology.declare(broker.channel())
    for start in range(0, window, 100):
        broker.publish([message(i) for i in range(start, start + 100)])
    for i in range(2 * settings.large_prefetch):
        body = job(i, 24 * MIB)
        broker.publish([Outgoing(topology.jobs_for(len(body)), body)])
    broker.close()
    assert depth(settings, topology.jobs) == window
    assert depth(settings, topology.jobs_large) == 2 * settings.large_prefetch
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    lane = queue_name(settings.namespace, "tenant-smtp", lane_id("acme", "normal"))
    topology.declare_lane(channel, lane)  # where the packer publishes acme's batches
    packed: list[int] = []

    def all_packed() -> bool:
        while (got := channel.basic_get(lane, auto_ack=True))[0] is not None:
            packed.append(decode_batch(got[2]).mails)
        return sum(packed) == window * per_message + 2 * settings.large_prefetch

    try:
        peak, output = _peak_rss(settings, tmp_path, "packer", all_packed)
        assert all_packed(), output
    finally:
        conn.close()
    assert depth(settings, topology.dead) == 0, output
    assert depth(settings, topology.jobs) == depth(settings, topology.jobs_large) == 0, output
    limit = _manifest_memory_limit("packer")
    print(f"packer peak RSS {peak / MIB:.0f} MiB, manifest limit {limit / MIB:.0f} MiB")
    assert peak < limit, f"peak RSS {peak / MIB:.0f} MiB over the manifest's {limit / MIB:.0f} MiB\n{output}"


def _peak_rss(settings: Settings, tmp_path: Path, stage: str, done: Callable[[], bool],
              timeout_s: float = 120.0) -> tuple[int, str]:
    """Run ``python -m STAGE`` until ``done()``, then SIGTERM it (it drains and exits): its peak
    RSS, from the kernel, and its output."""
    with (tmp_path / f"{stage}.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", stage], env=settings_env(settings),
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not done() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _pid, status, usage = os.wait4(proc.pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = (tmp_path / f"{stage}.log").read_text(errors="replace")
    assert proc.returncode == 0, output
    return usage.ru_maxrss * KIB, output
