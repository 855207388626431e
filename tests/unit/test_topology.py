"""Queue names per namespace and the retry delays (declaration itself: tests/integration/test_amqp.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailpipe.settings import Settings
from mailpipe.topology import DEAD_REASON, DEAD_STAGE, SCHEDULE_STEPS_S, Topology, retry_delays


def test_names_are_under_the_namespace() -> None:
    topology = Topology(namespace="acme-prod")
    assert topology.intake == "acme-prod.intake"
    assert topology.jobs == "acme-prod.jobs"
    assert topology.batches == "acme-prod.batches"
    assert topology.send == "acme-prod.send"
    assert topology.dead == "acme-prod.dead"
    assert topology.events == "acme-prod.events"
    assert topology.work_queues == (
        "acme-prod.intake", "acme-prod.jobs", "acme-prod.batches", "acme-prod.send")


def test_two_namespaces_share_no_name() -> None:
    a, b = Topology(namespace="a", retry_delays_s=(1, 2)), Topology(namespace="b", retry_delays_s=(1, 2))
    names_a = {*a.work_queues, a.dead, a.events, a.retry_queue(1), a.retry_queue(2)}
    names_b = {*b.work_queues, b.dead, b.events, b.retry_queue(1), b.retry_queue(2)}
    assert not names_a & names_b


def test_dead_letter_header_names() -> None:
    assert DEAD_REASON == "x-mailpipe-reason"
    assert DEAD_STAGE == "x-mailpipe-stage"


def test_from_settings() -> None:
    topology = Topology.from_settings(Settings(namespace="ns", delivery_limit=7, retry_base_s=30,
                                               retry_max_s=200))
    assert topology == Topology(namespace="ns", delivery_limit=7, retry_delays_s=(30, 60, 120, 200))


def test_default_settings_give_hourly_capped_doubling() -> None:
    assert Topology.from_settings(Settings()).retry_delays_s == (60, 120, 240, 480, 960, 1920, 3600)


@pytest.mark.parametrize(("base", "maximum", "delays"), [
    (60, 3600, (60, 120, 240, 480, 960, 1920, 3600)),
    (60, 60, (60,)),
    (60, 30, (30,)),  # a maximum below the base wins
    (1, 8, (1, 2, 4, 8)),
    (1, 10, (1, 2, 4, 8, 10)),
    (0.2, 3, (1, 2, 3)),  # never below one second: a TTL of 0 would not delay at all
    (1.5, 10, (1, 3, 6, 10)),  # whole seconds, as queue names and TTLs need
    (60, 60.5, (60,)),  # no two queues with the same delay
    (1, 0.5, (1,)),  # nor a maximum below one second
])
def test_retry_delays(base: float, maximum: float, delays: tuple[int, ...]) -> None:
    assert retry_delays(base, maximum) == delays


@given(base=st.floats(min_value=0.01, max_value=1e6), maximum=st.floats(min_value=0.01, max_value=1e7))
def test_retry_delays_properties(base: float, maximum: float) -> None:
    delays = retry_delays(base, maximum)
    assert delays, "at least one retry queue"
    assert list(delays) == sorted(set(delays)), "strictly increasing"
    assert all(isinstance(d, int) and d >= 1 for d in delays)
    assert delays[-1] == max(1, int(maximum)), "the last delay is the maximum"
    assert all(d <= max(1, maximum) for d in delays)
    assert len(delays) <= 64  # doubling reaches any finite maximum quickly


def test_retry_queue_per_attempt() -> None:
    topology = Topology(namespace="ns", retry_delays_s=(60, 120, 240))
    assert topology.retry_queue(1) == "ns.retry.60s"
    assert topology.retry_queue(2) == "ns.retry.120s"
    assert topology.retry_queue(3) == "ns.retry.240s"
    assert topology.retry_queue(4) == "ns.retry.240s"  # capped at the longest delay
    assert topology.retry_queue(1000) == "ns.retry.240s"
    assert topology.retry_queue(0) == "ns.retry.60s"  # attempts are 1-based; 0 is treated as 1
    assert topology.retry_queue(-3) == "ns.retry.60s"


@pytest.mark.parametrize(("wait_ms", "queue"), [
    (0, "ns.scheduled.1s"), (999, "ns.scheduled.1s"), (1000, "ns.scheduled.1s"), (9_999, "ns.scheduled.1s"),
    (10_000, "ns.scheduled.10s"), (59_999, "ns.scheduled.10s"), (600_000, "ns.scheduled.600s"),
    (3_600_000, "ns.scheduled.3600s"), (30 * 86_400_000, "ns.scheduled.3600s"), (-5, "ns.scheduled.1s"),
])
def test_schedule_queue_never_overshoots(wait_ms: int, queue: str) -> None:
    assert Topology(namespace="ns").schedule_queue(wait_ms) == queue


def test_all_queues_holds_every_queue_once() -> None:
    topology = Topology(namespace="ns", retry_delays_s=(60, 120))
    queues = topology.all_queues
    assert len(queues) == len(set(queues))
    assert set(topology.work_queues) <= set(queues)
    assert {topology.dead, topology.retry_queue(1), topology.retry_queue(2)} <= set(queues)
    assert {topology.schedule_queue(d * 1000) for d in SCHEDULE_STEPS_S} <= set(queues)
    assert all(q.startswith("ns.") for q in queues)
