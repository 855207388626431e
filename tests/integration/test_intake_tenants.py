"""Tenants at the intake (issue 13), the real enqueue stage against real RabbitMQ and Redis: a
tenant sends only through its own servers and the platform's, only from its verified domains
(raw messages' From included), and no request, however it fails to render, crashes the stage."""

from __future__ import annotations

import logging
from pathlib import Path

import pika
import pytest
from prometheus_client import REGISTRY

from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.codec import decode_job, encode_intake, items_of
from mailpipe.errors import BrokerUnavailable, RedisUnavailable
from mailpipe.model import IntakeRequest, Job, new_id, now_ms
from mailpipe.settings import Settings
from mailpipe.stage import run
from mailpipe.topology import DEAD_REASON, Topology
from producer.compose import render as real_render
from producer.domains import RULE
from producer.stage import EnqueueStage

pytestmark = pytest.mark.integration

SERVERS = """
[servers.platform]
address = "[127.0.0.1]:2525"
platform = true

[servers.a-own]
address = "[127.0.0.1]:2526"

[servers.b-own]
address = "[127.0.0.1]:2527"

[tenants.a]
servers = ["a-own"]
domains = ["a.example"]

[tenants.b]
server = "b-own"
domains = ["b.example"]

[tenants.c]
server = "platform"
domains = ["c.example"]
domain_policy = "warn"

[tenants.legacy]
server = "platform"
"""


def request(tenant: str = "a", sender: str = "hr@a.example", **fields: object) -> IntakeRequest:
    base: dict[str, object] = dict(id=new_id(), tenant=tenant, sender=sender, created_ms=now_ms(),
                                   to=("ann@example.com",), subject="Hello", text="Hello there.\n")
    base.update(fields)
    return IntakeRequest(**base)  # type: ignore[arg-type]


def raw(tenant: str, sender: str, message: bytes) -> IntakeRequest:
    return IntakeRequest(id=new_id(), tenant=tenant, sender=sender, created_ms=now_ms(),
                         recipients=("ann@example.com",), message=message)


def publish(settings: Settings, requests: list[IntakeRequest]) -> None:
    topology = Topology.from_settings(settings)
    broker = Broker(settings.amqp_url, client_name="test").connect()
    topology.declare(broker.channel())
    broker.publish([Outgoing(topology.intake, encode_intake(r), message_id=r.id) for r in requests])
    broker.close()


def drain(settings: Settings, queue: str) -> list[tuple[dict[str, object], bytes]]:
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    out = []
    while True:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append((dict(props.headers or {}), body))
    conn.close()
    return out


def reconnects() -> float:
    return REGISTRY.get_sample_value("mailpipe_reconnects_total",
                                     {"stage": "producer", "service": "rabbitmq"}) or 0.0


def run_intake(settings: Settings, requests: list[IntakeRequest],
               caplog: pytest.LogCaptureFixture) -> tuple[dict[str, Job], dict[str, dict[str, object]]]:
    """Publish, run the enqueue stage until the intake is drained; the jobs and the dead letters
    by request id. The stage must not have crashed or reconnected on the way."""
    Path(settings.servers_file).write_text(SERVERS, encoding="utf-8")
    publish(settings, requests)
    before = reconnects()
    with caplog.at_level(logging.INFO):
        assert run(EnqueueStage(settings), burst=True) == 0
    assert reconnects() == before, "the stage reconnected: something crashed it"
    assert not [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    topology = Topology.from_settings(settings)
    jobs = {j.id: j for j in (decode_job(job) for _h, body in drain(settings, topology.jobs)
                              for job in items_of(body, "job"))}
    dead = {}
    for headers, body in drain(settings, topology.dead):
        ids = [r.id for r in requests if encode_intake(r) == body]
        assert len(ids) == 1, headers
        dead[ids[0]] = headers
    assert len(jobs) + len(dead) == len(requests)
    return jobs, dead


def test_servers_per_tenant(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    via_b = request(server="b-own")  # tenant a naming tenant b's server
    via_platform = request(server="platform")
    default = request()
    own_named = request(server="a-own")
    b_via_a = request(tenant="b", sender="hr@b.example", server="a-own")
    b_default = request(tenant="b", sender="hr@b.example")
    unknown = request(server="nowhere")
    jobs, dead = run_intake(settings, [via_b, via_platform, default, own_named, b_via_a, b_default, unknown],
                            caplog)

    assert dead[via_b.id]["x-mailpipe-category"] == "routing"
    assert str(dead[via_b.id][DEAD_REASON]).startswith("server: tenant 'a' may not send through 'b-own'; "
                                                    "its servers are a-own, platform")
    assert str(dead[b_via_a.id][DEAD_REASON]).startswith("server: tenant 'b' may not send through 'a-own'")
    assert dead[unknown.id][DEAD_REASON] == "server: unknown server 'nowhere'"
    assert jobs[via_platform.id].server == "platform"
    assert jobs[default.id].server == "a-own" and jobs[own_named.id].server == "a-own"
    assert jobs[b_default.id].server == "b-own"
    assert set(jobs) == {via_platform.id, default.id, own_named.id, b_default.id}


def test_verified_sender_domains(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    spoof = request(sender="billing@b.example")  # a sends as b through the platform's server
    spoof_platform = request(sender="billing@b.example", server="platform")
    warned = request(tenant="c", sender="billing@b.example")
    fine = request(tenant="c", sender="news@c.example")
    forged = raw("a", "hr@a.example", b"From: Billing <billing@b.example>\r\nTo: ann@example.com\r\n"
                                      b"Subject: Invoice\r\n\r\nPay now.\r\n")
    forged_name = raw("a", "hr@a.example", b'From: "hr@a.example" <billing@b.example>\r\n\r\nPay.\r\n')
    two_froms = raw("a", "hr@a.example", b"From: hr@a.example\r\nFrom: billing@b.example\r\n\r\nPay.\r\n")
    garbled = raw("a", "hr@a.example", b"From: hr@a.example (x) <billing@b.example>\r\n\r\nPay.\r\n")
    honest = raw("a", "hr@a.example", b"From: HR <hr@a.example>\r\nSubject: Hi\r\n\r\nHello.\r\n")
    legacy = request(tenant="legacy", sender="anyone@b.example")  # no domains: not checked
    jobs, dead = run_intake(settings, [spoof, spoof_platform, warned, fine, forged, forged_name, two_froms,
                                       garbled, honest, legacy], caplog)

    for req in (spoof, spoof_platform):
        reason = str(dead[req.id][DEAD_REASON])
        assert dead[req.id]["x-mailpipe-category"] == "invalid"
        assert reason.startswith("sender: 'billing@b.example' is not at a verified domain of tenant 'a'")
        assert "publish from an address at a.example" in reason and "SPF" in reason and "DKIM" in reason
    assert str(dead[forged.id][DEAD_REASON]).startswith("message.From: 'billing@b.example'")
    assert str(dead[forged_name.id][DEAD_REASON]).startswith("message.From: 'billing@b.example'")
    assert str(dead[two_froms.id][DEAD_REASON]).startswith("message.From: 2 From headers")
    assert str(dead[garbled.id][DEAD_REASON]).startswith("message.From:")
    assert all(dead[r.id]["x-mailpipe-category"] == "invalid" for r in (forged, forged_name, two_froms, garbled))

    assert [f for f in jobs[warned.id].findings if f.startswith(RULE)], jobs[warned.id].findings
    assert "sender: 'billing@b.example'" in jobs[warned.id].findings[0]
    assert not [f for f in jobs[fine.id].findings if f.startswith(RULE)]
    assert jobs[honest.id].message.startswith(b"From: HR <hr@a.example>")
    assert legacy.id in jobs
    warnings = [r.getMessage() for r in caplog.records if "have no `domains`" in r.getMessage()]
    assert len(warnings) == 1 and "legacy" in warnings[0] and "NOT checked" in warnings[0]


def test_a_request_that_fails_to_render_is_one_dead_letter_and_the_stage_goes_on(
        settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """U+2028 in a subject once raised ValueError out of the email package's renderer and crashed
    the stage on every delivery until RabbitMQ's delivery limit. Whichever check catches it
    now, it is one dead letter. And any unexpected error of the renderer (here one forced on a
    request) is that request's dead letter, category invalid, naming the exception."""
    def render(req: IntakeRequest, job_id: str) -> bytes:
        if req.subject == "boom":
            raise UnicodeEncodeError("ascii", "\u2028", 0, 1, "forced by the test")
        return real_render(req, job_id)

    monkeypatch.setattr("producer.stage.render", render)
    before = [request(subject=f"before {i}") for i in range(5)]
    separator = request(subject="Line one\u2028line two")
    boom = request(subject="boom")
    after = [request(subject=f"after {i}") for i in range(5)]
    jobs, dead = run_intake(settings, [*before, separator, boom, *after], caplog)

    assert set(dead) == {separator.id, boom.id}
    assert dead[separator.id]["x-mailpipe-category"] == "invalid"
    assert "subject" in str(dead[separator.id][DEAD_REASON]) or "ValueError" in str(dead[separator.id][DEAD_REASON])
    assert dead[boom.id]["x-mailpipe-category"] == "invalid"
    assert str(dead[boom.id][DEAD_REASON]).startswith("message: cannot be rendered: UnicodeEncodeError:")
    assert set(jobs) == {r.id for r in before + after}
    dead_logs = [r for r in caplog.records if r.getMessage().startswith("dead-lettered: message: cannot be")]
    assert len(dead_logs) == 1  # logged once
    assert not [r for r in caplog.records if "poison" in r.getMessage()]


@pytest.mark.parametrize("error", [BrokerUnavailable("broker gone"), RedisUnavailable("redis gone")])
def test_infrastructure_errors_still_propagate(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                              error: Exception) -> None:
    """Only a request's own failure becomes its dead letter: RabbitMQ or Redis being away is
    the stage's to retry (it raises, the runner reconnects, the request is redelivered)."""
    Path(settings.servers_file).write_text(SERVERS, encoding="utf-8")

    def render(req: IntakeRequest, job_id: str) -> bytes:
        raise error

    monkeypatch.setattr("producer.stage.render", render)
    stage = EnqueueStage(settings)
    delivery = Delivery(tag=1, body=encode_intake(request()), routing_key="x", headers={}, redelivered=False)
    try:
        with pytest.raises(type(error)):
            stage.handle(None, [delivery])  # type: ignore[arg-type]  # raises before it publishes
    finally:
        stage.close()
