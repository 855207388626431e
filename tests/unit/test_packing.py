"""Packing boundaries: exactly 500 mails, exactly 80 MB, one mail over, linger."""

from __future__ import annotations

import pytest

from packer.packing import Packer

MIB = 1024 * 1024


def add(packer: Packer, n: int, size: int, server: str = "s", now: float = 0.0) -> list[int]:
    """Add n jobs; return the sizes (in mails) of the batches that closed."""
    closed = []
    for i in range(n):
        closed += [b.mails for b in packer.add(server, "t", b"job", size, tag=i, now=now)]
    return closed


def test_exactly_500_mails_close_one_batch() -> None:
    packer = Packer(max_mails=500, max_bytes=80 * MIB, linger_s=1)
    assert add(packer, 499, 1000) == []
    assert add(packer, 1, 1000) == [500]
    assert packer.held == 0


def test_the_501st_mail_starts_a_new_batch() -> None:
    packer = Packer(max_mails=500, max_bytes=80 * MIB, linger_s=1)
    assert add(packer, 501, 1000) == [500]
    assert packer.held == 1


def test_exactly_80_mb_closes_the_batch() -> None:
    packer = Packer(max_mails=1000, max_bytes=80 * MIB, linger_s=1)
    size = 160 * 1024  # 512 mails of 160 KiB fill 80 MiB to the byte
    assert add(packer, 511, size) == []
    closed = packer.add("s", "t", b"job", size, tag=0, now=0)
    assert [(b.mails, b.bytes) for b in closed] == [(512, 80 * MIB)]


def test_one_byte_over_80_mb_goes_to_the_next_batch() -> None:
    packer = Packer(max_mails=1000, max_bytes=80 * MIB, linger_s=1)
    size = 160 * 1024
    add(packer, 511, size)
    closed = packer.add("s", "t", b"job", size + 1, tag=0, now=0)
    assert [(b.mails, b.bytes) for b in closed] == [(511, 511 * size)]
    assert packer.held == 1


def test_larger_mails_mean_fewer_per_batch() -> None:
    packer = Packer(max_mails=500, max_bytes=80 * MIB, linger_s=1)
    # 1 MiB mails: the byte budget binds before the count.
    assert add(packer, 81, MIB) == [80]


def test_a_job_larger_than_a_batch_is_refused() -> None:
    packer = Packer(max_mails=500, max_bytes=1000, linger_s=1)
    assert not packer.fits_alone(1001)
    with pytest.raises(ValueError, match="can never fit"):
        packer.add("s", "t", b"job", 1001, tag=0, now=0)


def test_batches_are_per_server() -> None:
    packer = Packer(max_mails=2, max_bytes=MIB, linger_s=1)
    assert add(packer, 1, 10, server="a") == []
    assert add(packer, 1, 10, server="b") == []
    closed = packer.add("a", "t", b"job", 10, tag=9, now=0)
    assert [(b.server, b.mails) for b in closed] == [("a", 2)]
    assert list(packer.open) == [("b", "t", "normal")]


def test_batches_are_per_tenant_so_a_grant_serves_one_tenant() -> None:
    packer = Packer(max_mails=3, max_bytes=MIB, linger_s=1)
    closed = [b for i in range(4) for b in packer.add("s", "big", b"job", 10, tag=i, now=0)]
    closed += packer.add("s", "small", b"job", 10, tag=9, now=0.5)
    assert [(b.tenants, b.mails) for b in closed] == [({"big": 3}, 3)]
    # The small tenant's batch lingers on its own clock, not behind the big one's.
    assert [(dict(b.tenants), b.mails) for b in packer.due(1.0)] == [({"big": 1}, 1)]
    assert [(dict(b.tenants), b.mails) for b in packer.due(1.5)] == [({"small": 1}, 1)]


def test_high_priority_mail_gets_its_own_batch_that_does_not_linger() -> None:
    packer = Packer(max_mails=500, max_bytes=MIB, linger_s=5)
    add(packer, 10, 10, now=0.0)
    assert packer.add("s", "t", b"reset", 10, tag=99, now=0.0, priority="high") == []
    due = packer.due(0.0)
    assert [(b.priority, b.tags) for b in due] == [("high", [99])]
    assert packer.held == 10


def test_linger_closes_a_batch_that_waited_long_enough() -> None:
    packer = Packer(max_mails=500, max_bytes=MIB, linger_s=0.5)
    add(packer, 3, 10, now=10.0)
    assert packer.due(10.4) == []
    due = packer.due(10.5)
    assert [(b.mails, sorted(b.tenants.items()), b.tags) for b in due] == [(3, [("t", 3)], [0, 1, 2])]
    assert packer.held == 0
