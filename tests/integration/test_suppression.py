"""Suppression fair to the recipient and the tenant pause, against the real Redis: hard at once,
soft at 3 days within 30 (one a day, reset by a delivery), complaints until lifted, never
weakened, once per report; per tenant; and a tenant paused at the thresholds until resumed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from mailpipe import reputation, suppression
from mailpipe.suppression import Kind, Outcome, Policy

pytestmark = pytest.mark.integration
POLICY = Policy()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def blocked(client: redis.Redis, ns: str, tenant: str, *addresses: str, shared: bool = False) -> dict[str, str]:
    return suppression.suppressed(client, ns, [(tenant, addresses)], shared=shared)[0]


def test_a_hard_bounce_suppresses_at_once_for_that_tenant_only(client: redis.Redis, namespace: str) -> None:
    done = suppression.record(client, namespace, "acme", "Ann@Example.com", Kind.HARD_BOUNCE, "550 5.1.1 x", POLICY)
    assert done.outcome == Outcome.SUPPRESSED and done.days == 180
    assert "hard_bounce" in blocked(client, namespace, "acme", "ann@example.com")["ann@example.com"]
    assert blocked(client, namespace, "globex", "ann@example.com") == {}
    assert 179 * 86400 < client.ttl(suppression.key(namespace, "acme", "ann@example.com")) <= 180 * 86400


def test_soft_bounces_count_once_a_day_and_suppress_at_three(client: redis.Redis, namespace: str) -> None:
    def soft(day: int) -> suppression.Recorded:
        return suppression.record(client, namespace, "acme", "bob@example.com", Kind.SOFT_BOUNCE, "452 4.2.2 full",
                                  POLICY, day=day)
    assert soft(20000).soft_count == 1
    assert soft(20000).soft_count == 1, "the same day counts once"
    assert soft(20020).outcome == Outcome.COUNTED
    assert soft(20040).soft_count == 2, "day 20000 has left the 30-day window"
    assert blocked(client, namespace, "acme", "bob@example.com") == {}
    assert soft(20041).outcome == Outcome.SUPPRESSED
    assert blocked(client, namespace, "acme", "bob@example.com")


def test_a_delivery_resets_the_soft_count(client: redis.Redis, namespace: str) -> None:
    for day in (20000, 20001):
        suppression.record(client, namespace, "acme", "cy@example.com", Kind.SOFT_BOUNCE, "4.2.2", POLICY, day=day)
    suppression.delivered(client, namespace, [("acme", "cy@example.com")])
    assert suppression.record(client, namespace, "acme", "cy@example.com", Kind.SOFT_BOUNCE, "4.2.2", POLICY,
                              day=20002).soft_count == 1


def test_a_complaint_lasts_until_lifted_and_is_never_weakened(client: redis.Redis, namespace: str) -> None:
    assert suppression.record(client, namespace, "acme", "dee@example.com", Kind.COMPLAINT, "abuse (ARF)",
                              POLICY).outcome == Outcome.SUPPRESSED
    later = suppression.record(client, namespace, "acme", "dee@example.com", Kind.HARD_BOUNCE, "5.1.1", POLICY)
    assert later.outcome == Outcome.COUNTED
    (row,) = suppression.list_suppressed(client, namespace, "acme")
    assert row.expires_in_s == -1 and row.kind == "complaint"
    assert suppression.remove(client, namespace, "acme", "dee@example.com")
    assert blocked(client, namespace, "acme", "dee@example.com") == {}


def test_a_report_is_recorded_once(client: redis.Redis, namespace: str) -> None:
    first = suppression.record(client, namespace, "acme", "eve@example.com", Kind.SOFT_BOUNCE, "4.2.2", POLICY,
                               event_id="e1", day=20000)
    again = suppression.record(client, namespace, "acme", "eve@example.com", Kind.SOFT_BOUNCE, "4.2.2", POLICY,
                               event_id="e1", day=20001)
    assert (first.soft_count, again.outcome) == (1, Outcome.DUPLICATE)


def test_a_shared_hard_bounce_reaches_every_tenant_when_asked(client: redis.Redis, namespace: str) -> None:
    suppression.record(client, namespace, "acme", "fay@example.com", Kind.HARD_BOUNCE, "5.1.1",
                       Policy(hard_shared=True))
    found = blocked(client, namespace, "globex", "fay@example.com", shared=True)
    assert "shared" in found["fay@example.com"] and "acme" not in found["fay@example.com"]
    assert blocked(client, namespace, "globex", "fay@example.com") == {}


def test_add_by_hand_lists_and_removes(client: redis.Redis, namespace: str) -> None:
    assert suppression.add(client, namespace, "acme", "gus@example.com", "asked by phone")
    assert not suppression.add(client, namespace, "acme", "gus@example.com", "again")
    assert [r.kind for r in suppression.list_suppressed(client, namespace, "acme")] == ["manual"]


def test_a_tenant_is_warned_then_paused_then_resumed(client: redis.Redis, namespace: str) -> None:
    limits = reputation.Thresholds(window_sends=1000, min_sends=200)
    reputation.record_sends(client, namespace, {"acme": 999, "globex": 999})
    states = [reputation.record_report(client, namespace, "acme", "bounce", limits, 1, event_id=f"b{i}").after
              for i in range(100)]
    assert states[48] == "ok" and states[49] == "warned" and states[99] == "paused"
    assert reputation.record_report(client, namespace, "acme", "bounce", limits, 1,
                                                   event_id="b5").before == "duplicate"
    paused = reputation.paused_tenants(client, namespace)
    assert set(paused) == {"acme"} and "10.0% hard bounces" in paused["acme"].reason
    assert reputation.record_report(client, namespace, "globex", "bounce", limits, 1).after == "ok"
    assert reputation.resume(client, namespace, "acme")
    assert reputation.paused_tenants(client, namespace) == {}


def test_complaints_pause_at_half_a_percent_and_new_tenants_are_not_judged(client: redis.Redis,
                                                                           namespace: str) -> None:
    limits = reputation.Thresholds()
    reputation.record_sends(client, namespace, {"acme": 999, "tiny": 20})
    states = [reputation.record_report(client, namespace, "acme", "complaint", limits, 1).after for _ in range(5)]
    assert states == ["warned", "warned", "warned", "warned", "paused"]
    assert reputation.record_report(client, namespace, "tiny", "bounce", limits, 1).after == "ok"
    assert reputation.standing(client, namespace, "acme", limits).complaint_ratio == pytest.approx(0.005, rel=0.01)


def test_the_command_line_adds_lists_removes_and_resumes(client: redis.Redis, namespace: str, redis_url: str,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from mailpipe.cli import main

    monkeypatch.setenv("MAILPIPE_NAMESPACE", namespace)
    monkeypatch.setenv("MAILPIPE_REDIS_URL", redis_url)
    assert main(["suppression", "add", "hal@example.com", "--tenant", "acme", "--reason", "asked"]) == 0
    assert main(["suppression", "list", "--tenant", "acme"]) == 0
    assert "hal@example.com" in capsys.readouterr().out
    assert main(["suppression", "remove", "hal@example.com", "--tenant", "acme"]) == 0
    assert blocked(client, namespace, "acme", "hal@example.com") == {}
    assert main(["tenants", "pause", "acme", "--reason", "test"]) == 0
    assert main(["tenants", "list"]) == 0 and "acme" in capsys.readouterr().out
    assert main(["tenants", "resume", "acme"]) == 0
    assert reputation.paused_tenants(client, namespace) == {}


def test_the_senders_aftermath_records_sync_bounces_sends_and_resets(client: redis.Redis, namespace: str) -> None:
    """sender/envelope.py after a batch on a platform server: a 550 5.1.1 suppresses at once, a
    4xx past the retry age counts as a soft bounce, a 250 resets the address's soft count and
    counts as the tenant's send, a reputation refusal suppresses nobody; events for each."""
    from mailpipe.feedback import decode_feedback
    from mailpipe.model import Job
    from mailpipe.replies import classify
    from mailpipe.servers import parse_config
    from mailpipe.settings import Settings
    from mailpipe.topology import Topology
    from sender.delivery import JobOutcome
    from sender.envelope import aftermath

    settings = Settings(namespace=namespace)
    server = parse_config({"servers": {"platform": {"address": "x.example", "platform": True}}}, "t", {}).servers[
        "platform"]
    suppression.record(client, namespace, "acme", "ok@example.net", Kind.SOFT_BOUNCE, "4.2.2", POLICY)
    old = Job(id="j1", tenant="acme", server="platform", sender="a@acme.example",
              recipients=("ok@example.net", "gone@example.net", "full@example.net", "listed@example.net"),
              message=b"x", created_ms=1)
    outcome = JobOutcome(old, attempted=True, sent=["ok@example.net"], at_ms=10**13)
    outcome.failed = {"gone@example.net": classify(550, "5.1.1 <gone@example.net>: user unknown"),
                      "listed@example.net": classify(554, "5.7.1 blocked using zen.spamhaus.org")}
    outcome.deferred = {"full@example.net": classify(452, "4.2.2 Mailbox full")}
    out = aftermath(client, settings, Topology.from_settings(settings), server, [outcome])
    events = [(e.type, e.recipient, e.bounce_class) for e in map(decode_feedback, (o.body for o in out))]
    assert ("bounced", "gone@example.net", "hard") in events and ("suppressed", "gone@example.net", "") in events
    assert ("bounced", "full@example.net", "soft") in events, "expired after its retries: a soft bounce"
    assert ("bounced", "listed@example.net", "reputation") in events
    assert not any(t == "suppressed" and r in ("listed@example.net", "full@example.net") for t, r, _ in events)
    assert blocked(client, namespace, "acme", "gone@example.net", "listed@example.net") == {
        "gone@example.net": blocked(client, namespace, "acme", "gone@example.net")["gone@example.net"]}
    assert not client.exists(suppression.soft_key(namespace, "acme", "ok@example.net")), "a delivery resets"
    assert client.hget(reputation.tenant_key(namespace, "acme"), "sends") == b"1"
    again = aftermath(client, settings, Topology.from_settings(settings), server, [outcome])
    assert [o.message_id for o in again] == [o.message_id for o in out], "the same events, harmless"
