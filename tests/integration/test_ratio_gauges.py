"""The per-tenant reputation ratios (issue 23) are current in every process that exports them:
the dashboard and the alerts take ``max by (tenant)`` across processes, so one process keeping
an old value would win over the others.

First ``RatioGauges`` itself against a real Redis, on a clock of its own (no waiting); then the
sender as the process it is in production: a synchronous 550 5.1.1 at RCPT from a real SMTP
peer on a shared server shows in the sender's /metrics, and once the ratio changes in Redis
(more sends counted, a resume) the sender's value follows within its 10 s read."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pytest
import redis
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from mailpipe import codec, reputation
from mailpipe.feedback import RATIOS_EVERY_S, RATIOS_FORGET_S, RATIOS_SOON_S, RatioGauges
from mailpipe.model import Batch, Job, new_id, now_ms
from mailpipe.reputation import Thresholds
from mailpipe.settings import Settings
from mailpipe.sink import free_port
from mailpipe.topology import Topology
from tests.smtp_peer import SmtpPeer
from tests.stages import StageProcesses

pytestmark = pytest.mark.integration

THRESHOLDS = Thresholds(min_sends=2)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def exported(metric: str, tenant: str) -> float | None:
    """What this process's registry exports for the tenant (None: no such series)."""
    return REGISTRY.get_sample_value(metric, {"tenant": tenant})


def bounced(client: redis.Redis, ns: str, tenant: str, sends: int, bounces: int) -> None:
    reputation.record_sends(client, ns, {tenant: sends})
    for i in range(bounces):
        reputation.record_report(client, ns, tenant, "bounce", THRESHOLDS, now_ms(), event_id=f"{tenant}-{i}")


def test_ratios_are_read_again_until_forgotten(client: redis.Redis, namespace: str) -> None:
    # Tenants named after the namespace: the registry is this process's, shared by every test.
    acme, globex, initech = (f"{name}-{namespace}" for name in ("acme", "globex", "initech"))
    now = [1000.0]
    gauges = RatioGauges(client, namespace, THRESHOLDS, clock=lambda: now[0])
    gauges.tick()  # the first read: nothing noted, nobody paused
    assert gauges.tenants == frozenset()

    bounced(client, namespace, acme, sends=40, bounces=1)  # 2.5%: not even warned
    gauges.note([acme])
    now[0] += RATIOS_SOON_S
    gauges.tick()
    assert exported("mailpipe_tenant_bounce_ratio", acme) == 1 / 40
    assert exported("mailpipe_tenant_complaint_ratio", acme) == 0.0
    assert exported("mailpipe_tenant_window_sends", acme) == 40  # below the minimum: no alert yet

    # The window slides with sends nobody here counted; a report paused a tenant never noted here.
    reputation.record_sends(client, namespace, {acme: 40})
    bounced(client, namespace, globex, sends=2, bounces=1)
    assert reputation.paused_tenants(client, namespace).keys() == {globex}
    now[0] += RATIOS_SOON_S
    gauges.tick()  # only noted tenants are read this soon: none is due
    assert exported("mailpipe_tenant_bounce_ratio", acme) == 1 / 40
    now[0] += RATIOS_EVERY_S
    gauges.tick()
    assert exported("mailpipe_tenant_bounce_ratio", acme) == 1 / 80
    assert exported("mailpipe_tenant_window_sends", acme) == 80
    assert exported("mailpipe_tenant_bounce_ratio", globex) == 0.5

    # A resume starts a fresh window: 0 at the next read, not the ratio of the pause.
    reputation.resume(client, namespace, globex)
    bounced(client, namespace, initech, sends=10, bounces=0)
    gauges.note([initech])
    now[0] += RATIOS_EVERY_S
    gauges.tick()
    assert exported("mailpipe_tenant_bounce_ratio", globex) == 0.0
    assert exported("mailpipe_tenant_bounce_ratio", initech) == 0.0
    assert gauges.tenants == {acme, globex, initech}

    # At 0 and 0, neither noted nor paused for long: the series goes. Above 0, it stays.
    now[0] += RATIOS_FORGET_S + 1
    gauges.tick()
    assert gauges.tenants == {acme}
    assert exported("mailpipe_tenant_bounce_ratio", globex) is None
    assert exported("mailpipe_tenant_complaint_ratio", initech) is None
    assert exported("mailpipe_tenant_window_sends", initech) is None
    assert exported("mailpipe_tenant_bounce_ratio", acme) == 1 / 80


def test_a_redis_error_skips_the_read_and_the_next_one_tries_again(client: redis.Redis, namespace: str) -> None:
    acme = f"acme-{namespace}"
    bounced(client, namespace, acme, sends=4, bounces=1)
    now = [1000.0]
    down = redis.Redis(port=free_port(), socket_connect_timeout=1)  # nobody listens there
    gauges = RatioGauges(down, namespace, THRESHOLDS, clock=lambda: now[0])
    gauges.note([acme])
    gauges.tick()  # no error out of it
    assert exported("mailpipe_tenant_bounce_ratio", acme) is None
    gauges._client = client  # Redis is back
    now[0] += RATIOS_SOON_S
    gauges.tick()  # not before the next full read: a hung Redis would hold the stage each time
    assert exported("mailpipe_tenant_bounce_ratio", acme) is None
    now[0] += RATIOS_EVERY_S
    gauges.tick()
    assert exported("mailpipe_tenant_bounce_ratio", acme) == 0.25
    down.close()


# -- the sender, a process with its /metrics ----------------------------------------------------

def scrape(port: int) -> dict[tuple[str, str], float]:
    """The sender's per-tenant ratios and window sends: (metric, tenant) -> value."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:  # not serving yet
        return {}
    return {(s.name, s.labels["tenant"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name in ("mailpipe_tenant_bounce_ratio", "mailpipe_tenant_complaint_ratio",
                                                  "mailpipe_tenant_window_sends")}


def wait(condition: Callable[[], bool], what: str, stages: StageProcesses, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{stages.logs()}")
        if stages.alive() != list(stages.procs):
            pytest.fail(f"the sender died waiting for {what}\n{stages.logs()}")
        time.sleep(0.2)


def job(tenant: str, recipient: str) -> Job:
    return Job(id=new_id(), tenant=tenant, server="platform", sender=f"news@{tenant}.example",
               recipients=(recipient,), created_ms=now_ms(),
               message=f"From: news@{tenant}.example\r\nSubject: news\r\n\r\nNews.\r\n".encode())


def test_a_synchronous_bounce_shows_in_the_senders_metrics_and_follows_the_ratio(
        settings: Settings, tmp_path: Path, client: redis.Redis) -> None:
    """acme: 1 sent, 1 refused: 100%, below the minimum sends to judge it (no reputation event:
    before, the sender exported nothing for it). globex: 2 sent, 1 refused: 50%, paused (before,
    the sender exported 50% and kept it after the resume)."""
    settings = settings.replace(metrics_tenant_label=True, reputation_min_sends=2)
    ns, port = settings.namespace, free_port()
    jobs = [job("acme", "ann@example.net"), job("acme", "gone@example.net"),
            job("globex", "bob@example.net"), job("globex", "cid@example.net"), job("globex", "gone@example.net")]
    granted = now_ms()
    batch = Batch(id=new_id(), server="platform", jobs=tuple(codec.encode_job(j) for j in jobs), mails=len(jobs),
                  bytes=sum(j.size for j in jobs), created_ms=granted - 100, grant_id=new_id(), granted_ms=granted,
                  deadline_ms=granted + 30_000, tenants={"acme": 2, "globex": 3})
    with SmtpPeer() as peer:
        peer.refuse("gone@example.net", 550, "5.1.1 <gone@example.net>: Recipient address rejected: User unknown")
        Path(settings.servers_file).write_text(
            f'[servers.platform]\naddress = "[127.0.0.1]:{peer.port}"\ntls = "none"\nplatform = true\n\n'
            '[tenants.acme]\n\n[tenants.globex]\n', encoding="utf-8")
        with StageProcesses(settings, tmp_path, "sender", metrics_ports={"sender": port}) as stages:
            conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
            conn.channel().basic_publish("", Topology.from_settings(settings).send, codec.encode_batch(batch),
                                         pika.BasicProperties(delivery_mode=2))
            conn.close()
            wait(lambda: scrape(port).get(("mailpipe_tenant_bounce_ratio", "acme")) == 1.0
                 and scrape(port).get(("mailpipe_tenant_bounce_ratio", "globex")) == 0.5,
                 "the ratios of the synchronous bounces in the sender's /metrics", stages, timeout_s=20)
            assert sorted(peer.recipients()) == ["ann@example.net", "bob@example.net", "cid@example.net"]
            assert reputation.paused_tenants(client, ns).keys() == {"globex"}
            first = scrape(port)
            assert first[("mailpipe_tenant_complaint_ratio", "acme")] == 0.0
            assert first[("mailpipe_tenant_window_sends", "acme")] == 1
            assert first[("mailpipe_tenant_window_sends", "globex")] == 2

            reputation.record_sends(client, ns, {"acme": 3})  # sent by another sender: 1 in 4
            reputation.resume(client, ns, "globex")
            changed = time.monotonic()
            wait(lambda: scrape(port).get(("mailpipe_tenant_bounce_ratio", "acme")) == 0.25
                 and scrape(port).get(("mailpipe_tenant_bounce_ratio", "globex")) == 0.0,
                 "the sender's ratios to follow Redis", stages, timeout_s=RATIOS_EVERY_S + 5)
            assert time.monotonic() - changed <= RATIOS_EVERY_S + 2
