"""Relaying denied for some recipients only, while the server takes the others (a relay that
serves some domains, a connector that refuses one address): each refused recipient is its own
failure, dead-lettered once with the server's reply, and the server is never paused for it.

Relaying denied is also what a server broken for us says to every recipient (issue 22: pause
it, dead-letter nothing; tests/integration/test_pushback_at_the_peer.py). The sender tells the
two apart by the mails around the refusal (sender/delivery.py ``doubtful``) and, for a
recipient alone in its batch, by its next try (sender/pool.py ``refused_alone``). Refused
recipients first in their batch, alone in theirs, and among others, with 2 sender replicas.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mailpipe import dead
from mailpipe.model import IntakeRequest, new_id, now_ms
from mailpipe.settings import Settings
from tests.faults.harness import LedgerPeer, Pipeline, ledger, publish, settle, wait_until, write_servers

pytestmark = pytest.mark.integration

BLOCKED = "blocked"


class RefusalCountingPeer(LedgerPeer):
    """The ledger peer, counting its refusals per recipient."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refusals: Counter[str] = Counter()

    def __enter__(self) -> RefusalCountingPeer:
        super().__enter__()
        return self

    def _take_rule(self, rules: Any, addresses: list[str]) -> str | None:
        refusal = super()._take_rule(rules, addresses)
        if refusal is not None:
            with self._lock:
                self.refusals.update(addresses)
        return refusal


def request(to: str) -> IntakeRequest:
    return IntakeRequest(id=new_id(), tenant="acme", sender="hr@acme.example", created_ms=now_ms(),
                         to=(to,), subject="Your order", text="It ships on Monday.\n")


def test_relaying_denied_for_some_recipients_fails_them_alone_and_never_pauses_the_server(
        settings: Settings, tmp_path: Path) -> None:
    settings = settings.replace(max_batch_mails=50)
    # Two refused recipients in a row every 25 (at the head of batches, or among others), and
    # one mail alone, published after the rest. Three in a row before the server has taken a
    # mail look like a server broken for us, and pause it for a probe: not this shape.
    addresses = [f"{BLOCKED}{i}@example.com" if i % 25 < 2 else f"user{i}@example.com" for i in range(400)]
    with RefusalCountingPeer() as peer:
        write_servers(settings, peer.port)
        peer.refuse(lambda address: address.startswith(BLOCKED), 550, "5.7.1 Relaying denied")
        with Pipeline(settings, tmp_path, replicas=2) as pipeline:
            requests = [request(to) for to in addresses]
            published = publish(settings, requests)
            blocked = [r.id for r in requests if r.to[0].startswith(BLOCKED)]
            fine = [r.id for r in requests if not r.to[0].startswith(BLOCKED)]
            settle(peer, fine, 60, pipeline)
            alone = request(f"{BLOCKED}-alone@example.com")
            published += publish(settings, [alone])
            blocked.append(alone.id)

            def all_dead() -> bool:
                with dead.DeadQueue(settings) as queue:
                    return queue.count() >= len(blocked)
            wait_until(all_dead, 60, f"{len(blocked)} dead letters", pipeline)
            settle(peer, fine, 30, pipeline)
            logs = pipeline.logs(tail=10**6)
        report = ledger(settings, peer, published)
    assert sorted(report.failed) == sorted(blocked), report.summary()
    assert not report.lost and not report.duplicated and not report.unexpected, report.summary()
    with dead.DeadQueue(settings) as queue:
        letters = list(queue.letters())
    assert len(letters) == len(blocked) and all("5.7.1 Relaying denied" in d.reason for d in letters)
    assert "paused (rule" not in logs, "the server was paused for a few recipients' refusals"
    # Each refused recipient tried at most once per sender replica before it is judged its own.
    assert max(peer.refusals.values()) <= 2 + 1, peer.refusals.most_common(5)
