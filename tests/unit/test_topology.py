"""Queue names per namespace and the retry delays (declaration itself: tests/integration/test_amqp.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailpipe.retry import retry_delays
from mailpipe.settings import Settings
from mailpipe.topology import DEAD_REASON, DEAD_STAGE, SCHEDULE_STEPS_S, Topology


def test_names_are_under_the_namespace() -> None:
    topology = Topology(namespace="acme-prod")
    assert topology.intake == "acme-prod.intake"
    assert topology.jobs == "acme-prod.jobs"
    assert topology.batches == "acme-prod.batches"
    assert topology.send == "acme-prod.send"
    assert topology.dead == "acme-prod.dead"
    assert topology.events == "acme-prod.events"
    assert topology.intake_large == "acme-prod.intake.large"
    assert topology.jobs_large == "acme-prod.jobs.large"
    assert topology.work_queues == (
        "acme-prod.intake", "acme-prod.intake.large", "acme-prod.jobs", "acme-prod.jobs.large",
        "acme-prod.batches", "acme-prod.send")


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
    assert Topology.from_settings(Settings(large_message_bytes=1000)).large_message_bytes == 1000


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
    big = topology.large_message_bytes + 1
    assert {topology.intake_large, topology.jobs_large, topology.retry_queue(1, big),
            topology.retry_queue(2, big)} <= set(queues)
    assert {topology.schedule_queue(d * 1000, big) for d in SCHEDULE_STEPS_S} <= set(queues)
    assert all(q.startswith("ns.") for q in queues)


def test_size_class_by_encoded_bytes() -> None:
    """Over large_message_bytes (256 KiB by default) is large; exactly the limit is small."""
    topology = Topology(namespace="ns")
    assert topology.large_message_bytes == Settings().large_message_bytes == 256 * 1024
    for size, large in ((0, False), (1, False), (256 * 1024, False), (256 * 1024 + 1, True), (25 << 20, True)):
        assert topology.is_large(size) is large
        assert topology.intake_for(size) == ("ns.intake.large" if large else "ns.intake")
        assert topology.jobs_for(size) == ("ns.jobs.large" if large else "ns.jobs")
    small = Topology(namespace="ns", large_message_bytes=10)
    assert small.jobs_for(10) == "ns.jobs" and small.jobs_for(11) == "ns.jobs.large"


def test_delay_queues_keep_the_size_class() -> None:
    topology = Topology(namespace="ns", retry_delays_s=(60, 120))
    big = topology.large_message_bytes + 1
    assert topology.retry_queue(1) == topology.retry_queue(1, 100) == "ns.retry.60s"
    assert topology.retry_queue(2, big) == "ns.retry.120s.large"
    assert topology.retry_queue(9, big) == "ns.retry.120s.large"
    assert topology.schedule_queue(10_000) == topology.schedule_queue(10_000, 100) == "ns.scheduled.10s"
    assert topology.schedule_queue(10_000, big) == "ns.scheduled.10s.large"
    back = {queue: to for queue, _ttl, to in topology._delay_queues()}
    assert back["ns.retry.60s"] == back["ns.scheduled.10s"] == "ns.jobs"
    assert back["ns.retry.60s.large"] == back["ns.scheduled.10s.large"] == "ns.jobs.large"
    assert not any("park" in queue for queue in back), "the limiter parks nothing: batches wait in their lanes"
    assert set(back) <= set(topology.all_queues)


@given(size=st.integers(min_value=0, max_value=1 << 31), limit=st.integers(min_value=1, max_value=1 << 30),
       attempt=st.integers(min_value=1, max_value=20), wait_ms=st.integers(min_value=0, max_value=10**9))
def test_every_routed_queue_is_declared_and_comes_back_to_its_class(size: int, limit: int, attempt: int,
                                                                     wait_ms: int) -> None:
    topology = Topology(namespace="ns", retry_delays_s=(1, 2, 4), large_message_bytes=limit)
    declared = set(topology.all_queues)
    back = {queue: to for queue, _ttl, to in topology._delay_queues()}
    jobs = topology.jobs_for(size)
    assert {topology.intake_for(size), jobs} <= declared
    assert back[topology.retry_queue(attempt, size)] == jobs
    assert back[topology.schedule_queue(wait_ms, size)] == jobs
