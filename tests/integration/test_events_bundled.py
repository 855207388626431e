"""Events bundled (issue 24), through a real sender, RabbitMQ, Redis and SMTP peer: a batch's
events arrive as one message per routing key (outcome and tenant), bindings by key still
select them, and ``codec.decode_events`` gives one record per outcome of each mail."""

from __future__ import annotations

from pathlib import Path

import pika
import pytest

from mailpipe import codec
from mailpipe.feedback import decode_feedback, is_feedback
from mailpipe.settings import Settings
from tests.integration.test_sender import Bus, granted, make_job, run_sender
from tests.smtp_peer import SmtpPeer

pytestmark = pytest.mark.integration


def test_a_batch_publishes_one_message_per_outcome_and_tenant(settings: Settings) -> None:
    acme = [make_job(f"a{i}@example.com", f"nobody{i}@example.com") for i in range(6)]
    beta = [make_job(f"b{i}@example.com", tenant="beta") for i in range(3)]
    busy = make_job("busy@example.com", tenant="beta")
    bus = Bus(settings)
    channel = bus.channel
    failures = channel.queue_declare("", exclusive=True).method.queue  # a subscriber of one kind
    channel.queue_bind(failures, bus.topology.events, routing_key="failed.*")
    try:
        with SmtpPeer() as peer:
            for i in range(6):
                peer.refuse(f"nobody{i}@example.com", 550, "5.1.1 User unknown")
            peer.refuse("busy@example.com", 451, "4.7.1 Greylisted, try again later")
            Path(settings.servers_file).write_text(
                f'[servers.smtp]\naddress = "[127.0.0.1]:{peer.port}"\ntls = "none"\n\n'
                '[tenants.acme]\nserver = "smtp"\n\n[tenants.beta]\nserver = "smtp"\n', encoding="utf-8")
            bus.send(granted([*acme, *beta, busy]))
            run_sender(settings)
        messages = take_with_keys(channel, bus.events_queue)
        only_failures = take_with_keys(channel, failures)
    finally:
        bus.conn.close()
    delivery = [(key, body) for key, body in messages if not is_feedback(body)]
    assert sorted((key, codec.kind_of(body)) for key, body in delivery) == [
        ("deferred.beta", "event"), ("failed.acme", "events"), ("sent.acme", "events"), ("sent.beta", "events")]
    records = {key: codec.decode_events(body) for key, body in delivery}
    assert [e.recipients for e in records["sent.acme"]] == [(f"a{i}@example.com",) for i in range(6)]
    assert [e.recipients for e in records["failed.acme"]] == [(f"nobody{i}@example.com",) for i in range(6)]
    assert [e.recipients for e in records["sent.beta"]] == [(f"b{i}@example.com",) for i in range(3)]
    assert [(e.recipients, e.code) for e in records["deferred.beta"]] == [(("busy@example.com",), 451)]
    assert [e.job_id for e in records["sent.acme"]] == [j.id for j in acme]
    for key, events in records.items():
        assert {(e.outcome, e.tenant) for e in events} == {tuple(key.split("."))}
    # The binding by key still selects: one message, the six failures.
    assert [(key, len(codec.decode_events(body))) for key, body in only_failures] == [("failed.acme", 6)]
    # Feedback events (the synchronous hard bounces) stay one per message, kind "feedback".
    feedback = [decode_feedback(body) for key, body in messages if is_feedback(body)]
    assert {f.recipient for f in feedback if f.type == "bounced"} == {f"nobody{i}@example.com" for i in range(6)}


def take_with_keys(channel: pika.adapters.blocking_connection.BlockingChannel, queue: str) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    while True:
        method, _props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return out
        out.append((method.routing_key, body))

