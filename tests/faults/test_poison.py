"""Garbage and poison: every malformed input is dead-lettered with a reason and the stage never
dies; a message that crashes a stage every time ends in the dead-letter queue, the stage goes on."""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pika
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from mailpipe.codec import decode_job, encode_batch, encode_intake, encode_job
from mailpipe.model import Batch, IntakeRequest, Job, new_id, now_ms
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from tests.faults.harness import (
    LedgerPeer,
    Pipeline,
    ledger,
    mails,
    publish,
    rss_bytes,
    settle,
    wait_until,
    write_servers,
)
from tests.faults.ledger import read_dead

pytestmark = [pytest.mark.faults, pytest.mark.integration]

CRLF = st.sampled_from(["\r\n", "\n", "\r", "\r\nBcc: victim@example.com\r\n", "\nX-Injected: 1"])
HEADER_FIELDS = ("sender", "to", "cc", "bcc", "subject", "header_value", "header_name")
NOT_STR = st.one_of(st.integers(-(2**63), 2**64 - 1), st.floats(), st.booleans(), st.binary(min_size=1, max_size=8),
                   st.lists(st.integers(0, 9), min_size=1, max_size=3))
NOT_INT = st.one_of(st.floats(), st.booleans(), st.text(min_size=1, max_size=8), st.binary(min_size=1, max_size=8),
                    st.integers(-(2**63), -1))
NOT_CONTAINER = st.one_of(st.integers(0, 9), st.floats(), st.text(min_size=1, max_size=8))
# Each field with values of a type it must refuse (empty containers and in-range ints are valid).
WRONG = st.one_of(
    st.tuples(st.sampled_from(["id", "tenant", "sender", "subject", "kind", "message"]), NOT_STR),
    st.tuples(st.sampled_from(["created_ms", "v"]), NOT_INT),
    st.tuples(st.sampled_from(["to", "headers", "attachments"]), NOT_CONTAINER),
)


def base_fields() -> dict[str, Any]:
    return {"v": 1, "kind": "intake", "id": new_id(), "tenant": "acme", "sender": "hr@acme.example",
            "created_ms": now_ms(), "to": ["ann@example.com"], "subject": "Hi", "text": "Hello"}


def with_crlf(field: str, crlf: str) -> bytes:
    f = base_fields()
    if field == "header_value":
        f["headers"] = {"X-Campaign": f"spring{crlf}"}
    elif field == "header_name":
        f["headers"] = {f"X-Bad{crlf}": "1"}
    elif field in ("to", "cc", "bcc"):
        f[field] = [f"ann@example.com{crlf}"]
    else:
        f[field] = f"{f.get(field) or 'x'}{crlf}"
    return msgpack.packb(f, use_bin_type=True)  # type: ignore[no-any-return]


def wrong_type(field: str, value: Any) -> bytes:
    f = base_fields()
    f[field] = value
    return msgpack.packb(f, use_bin_type=True)  # type: ignore[no-any-return]


def huge_claim(prefix: bytes) -> bytes:
    """A msgpack header that claims 1 GiB (a str32, bin32, array32 or map32) and ends early."""
    return prefix + (1 << 30).to_bytes(4, "big") + b"\x00" * 16


def nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"  # fixarray of one, nested ``depth`` deep


def truncated(cut: float) -> bytes:
    whole = encode_intake(IntakeRequest(id=new_id(), tenant="acme", sender="hr@acme.example",
                                        created_ms=now_ms(), to=("ann@example.com",), text="x" * 200))
    return whole[:max(1, int(len(whole) * cut))]


MALFORMED = st.one_of(
    st.binary(max_size=512),
    st.floats(0.0, 0.99).map(truncated),
    st.integers(2, 5000).map(nested),
    st.sampled_from([b"\xdb", b"\xc6", b"\xdd", b"\xdf"]).map(huge_claim),
    WRONG.map(lambda t: wrong_type(*t)),
    st.tuples(st.sampled_from(HEADER_FIELDS), CRLF).map(lambda t: with_crlf(*t)),
    # A raw message whose "message" claims 1 GiB of binary.
    st.just(msgpack.packb({**base_fields(), "text": None, "recipients": ["a@example.com"]},
                          use_bin_type=True)[:-1] + b"\xa7message\xc6" + (1 << 30).to_bytes(4, "big")),
)


def generate(count: int) -> list[bytes]:
    out: list[bytes] = []

    @hsettings(max_examples=count, database=None, derandomize=True, phases=[Phase.generate], deadline=None,
               suppress_health_check=list(HealthCheck))
    @given(MALFORMED)
    def collect(body: bytes) -> None:
        out.append(body)

    collect()
    return out


def test_malformed_intake_is_dead_lettered_with_a_reason_and_the_stage_survives(
        settings: Settings, tmp_path: Path) -> None:
    """The issue's 10,000 inputs, from hypothesis (seeded, derandomized): random bytes, truncated
    msgpack, deep nesting, 1 GiB claimed lengths, wrong types, CR/LF in every header and address.
    One producer replica; its RSS grows less than 50 MB; every input is in the dead-letter queue
    with a reason, none became a job; and good mail published after them still goes through."""
    bodies = generate(int(os.environ.get("FAULTS_MALFORMED", "10000")))
    assert len(bodies) >= min(5_000, len(bodies) // 2 + 1), "hypothesis generated the inputs"
    topology = Topology(settings.namespace)
    with LedgerPeer() as peer:
        write_servers(settings, peer.port)
        with Pipeline(settings, tmp_path, stages=("producer",)) as pipeline:
            pid = pipeline.pid("producer-0")
            conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
            channel = conn.channel()
            wait_until(lambda: channel.queue_declare(topology.intake, passive=True).method.consumer_count > 0,
                       30, "the producer consuming", pipeline)
            time.sleep(0.5)
            rss_before = rss_bytes(pid)
            channel.confirm_delivery()
            for body in bodies:
                channel.basic_publish("", topology.intake, body)

            def count(queue: str) -> int:
                return int(channel.queue_declare(queue, passive=True).method.message_count)

            deadline = time.monotonic() + 120
            while count(topology.dead) + count(topology.jobs) < len(bodies) and time.monotonic() < deadline:
                assert pipeline.dead() == [], f"the producer died\n{pipeline.logs()}"
                time.sleep(0.2)
            rss_after = rss_bytes(pid)
            jobs, dead_n, intake = count(topology.jobs), count(topology.dead), count(topology.intake)
            leaked = [decode_job(channel.basic_get(topology.jobs, auto_ack=True)[2]).message[:400]
                      for _ in range(min(jobs, 3))]
            conn.close()
            assert jobs + dead_n == len(bodies), f"{dead_n} dead, {jobs} jobs, {intake} in intake\n{pipeline.logs()}"
        dead = read_dead(settings.amqp_url, settings.namespace, limit=len(bodies) + 10)
    assert jobs == 0, f"no malformed input may become a job; these did: {leaked}"
    assert len(dead) == len(bodies)
    assert all(d.reason for d in dead), [d.headers for d in dead if not d.reason][:3]
    sent = Counter(hashlib.sha256(b).hexdigest() for b in bodies)
    got = Counter(hashlib.sha256(d.body).hexdigest() for d in dead)
    assert got == sent, "each dead letter is the input as it came"
    growth = rss_after - rss_before
    assert growth < 50 * 1024 * 1024, f"RSS grew {growth / 2**20:.1f} MB"


def test_a_batch_that_crashes_the_limiter_every_time_is_dead_lettered_and_the_limiter_goes_on(
        settings: Settings, tmp_path: Path) -> None:
    """A batch whose ``tenants`` map adds up but whose second job is not a job (a limiter that
    trusted the map would grant one mail (burst 2, one kept back for the window) and crash
    splitting the batch). Whatever the stage does with it, the batch must end in the dead-letter
    queue with a reason, within the delivery limit (5 here, reconnects capped at 1 s to keep the
    test short), and the mail behind it must still be delivered by the same, living, limiter."""
    # Grants of one mail: at 1 mail/s with a 1 s window the limiter keeps one mail of the burst back.
    settings = settings.replace(delivery_limit=5, reconnect_max_s=1.0, burst_mails=2, window_s=1.0,
                                send_margin_s=0.2, limiter_prefetch=4)
    topology = Topology(settings.namespace)
    good = Job(id=new_id(), tenant="acme", server="tenant-smtp", sender="hr@acme.example",
               recipients=("ann@example.com",), message=b"Message-ID: <%s@x>\r\n\r\nhi\r\n" % new_id().encode(),
               created_ms=now_ms())
    poison = Batch(id=new_id(), server="tenant-smtp", jobs=(encode_job(good), b"\x93not a job"), mails=2,
                   bytes=20, created_ms=now_ms(), tenants={"acme": 2})
    with LedgerPeer() as peer:
        write_servers(settings, peer.port, server=(
            f'[servers.tenant-smtp]\naddress = "[127.0.0.1]:{peer.port}"\ntls = "none"\nrate_per_hour = 3600\n'
            '[tenants.acme]\nserver = "tenant-smtp"\ndaily_limit = 1000000\n'))
        with Pipeline(settings, tmp_path) as pipeline:
            conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
            conn.channel().basic_publish("", topology.batches, encode_batch(poison))
            conn.close()
            after = publish(settings, mails(5))
            wait_until(lambda: bool(read_dead(settings.amqp_url, settings.namespace)), 60,
                       "the poison batch in the dead-letter queue", pipeline)
            # The mail behind it at the peer, then nothing in flight: no copy of it can come later.
            settle(peer, after, 60, pipeline)
            alive = pipeline.dead() == []
            limiter_exits = [c for n, c in pipeline.exits.items() if n.startswith("limiter")]
        dead = read_dead(settings.amqp_url, settings.namespace)
        # The good job travels in the poison batch: it fails with it, with the batch's reason.
        report = ledger(settings, peer, [*after, good.id])
    assert alive and not limiter_exits, f"the limiter keeps working\n{pipeline.logs()}"
    assert len(dead) == 1 and dead[0].reason, [(d.reason, d.first_death_reason) for d in dead]
    assert list(report.failed) == [good.id]
    report.assert_clean(allow_failed=True)
