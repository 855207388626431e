"""The ledger's own sorting, without services: it must be able to say lost, duplicated and why."""

from __future__ import annotations

from tests.faults.ledger import Acceptance, Cut, DeadEntry, reconcile


def acc(job: str, at: float, port: int = 1000) -> Acceptance:
    return Acceptance(job, ("a@example.com",), at, port)


def test_every_category() -> None:
    dead = [DeadEntry(("d",), "refused by tenant-smtp: 550 5.7.1 no", "policy", "", {}),
            DeadEntry(("p",), "", "", "delivery_limit", {})]
    report = reconcile(["ok", "lost", "d", "p", "dup"], [acc("ok", 1), acc("dup", 2), acc("dup", 3), acc("zz", 4)],
                       dead)
    assert report.delivered == ["ok"]
    assert report.lost == ["lost"]
    assert report.failed == {"d": ["refused by tenant-smtp: 550 5.7.1 no"], "p": ["rabbitmq: delivery_limit"]}
    assert report.delivery_limit == ["p"]
    assert report.duplicated == {"dup": 2} and report.unexplained == ["dup"]
    assert report.unexpected == ["zz"]


def test_a_duplicate_is_explained_only_by_the_last_mail_of_a_cut_connection() -> None:
    accepted = [acc("a", 1.0, 7), acc("b", 2.0, 7), acc("b", 5.0, 8), acc("a", 6.0, 8)]
    report = reconcile(["a", "b"], accepted, [], [Cut(7, 2.5, "sender-0 killed")])
    assert report.explained.keys() == {"b"}, "b was the last mail on port 7 before the kill"
    assert report.unexplained == ["a"], "a was followed by b on that connection: it had been marked"
    report = reconcile(["b"], accepted[1:3], [], [Cut(9, 2.5, "another connection")])
    assert report.unexplained == ["b"]
