"""The tenant's SMTP server goes away, and the network to it misbehaves: everything is delivered
once it can be, nothing fails for a transient reason, duplicates only where a cut explains them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mailpipe.settings import Settings
from tests.faults.harness import LedgerPeer, Pipeline, ledger, mails, publish, settle, wait_until, write_servers
from tests.faults.proxy import FaultProxy

pytestmark = [pytest.mark.faults, pytest.mark.integration]


def test_smtp_peer_down_then_up_delivers_everything_and_fails_nothing(
        settings: Settings, tmp_path: Path) -> None:
    """The issue says 30 s down; 10 s here (several retry rounds at the tests' 1-2 s retry
    delays, the same paths) keeps the suite fast. 500 mails, 2 replicas of each stage."""
    with LedgerPeer() as peer:
        write_servers(settings, peer.port)
        with Pipeline(settings, tmp_path, replicas=2) as pipeline:
            published = publish(settings, mails(250))
            wait_until(lambda: len(peer.accepted) >= 50, 60, "mail flowing", pipeline)
            peer.stop()
            down_at = time.monotonic()
            published += publish(settings, mails(250))
            time.sleep(10)
            accepted_while_down = len(peer.accepted)
            peer.start()
            settle(peer, published, 90, pipeline)
            recovered_s = time.monotonic() - down_at - 10
        report = ledger(settings, peer, published)
    print(report.summary(), f"recovered {recovered_s:.1f} s after the peer came back")
    assert accepted_while_down < len(published), "the outage really held mail back"
    report.assert_clean()


def test_latency_resets_and_a_blackhole_between_sender_and_peer(settings: Settings, tmp_path: Path) -> None:
    """Through the proxy: 20 ms each way on every chunk, 2% of client chunks reset both
    connections after forwarding, and for 5 s every new connection is blackholed (accepted,
    never answered; the sender's 3 s SMTP timeout ends it). 500 mails (the issue gives no number)."""
    settings = settings.replace(smtp_timeout_s=3.0)
    with LedgerPeer() as peer, FaultProxy(peer.port) as proxy:
        write_servers(settings, proxy.port)
        proxy.latency_s = 0.02
        proxy.reset_rate = 0.02
        with Pipeline(settings, tmp_path, replicas=2) as pipeline:
            published = publish(settings, mails(500))
            wait_until(lambda: len(peer.accepted) >= 100, 90, "mail flowing", pipeline)
            proxy.blackhole = True
            time.sleep(5)
            proxy.blackhole = False
            settle(peer, published, 120, pipeline)
        report = ledger(settings, peer, published, proxy.cuts)
    print(report.summary(), f"{len(proxy.cuts)} resets, {proxy.connections} connections")
    assert proxy.cuts, "the proxy reset connections"
    report.assert_clean(allow_explained_duplicates=True)
