"""The delivery ledger: after a run, every confirmed job is sorted, as RabbitMQ's Jepsen checker
sorts messages, into exactly one of

- ``delivered``: the SMTP peer accepted each of its recipients once;
- ``duplicated``: the peer accepted a recipient more than once. A duplicate is *explained*
  when each earlier copy was the last mail accepted on a connection that a fault cut (a sender
  replica killed with kill -9, a proxy that reset the connection): the peer said 250 but the
  sender never recorded its "sent" mark (it marks each mail before it sends the next on that
  connection, so only the last one can be unmarked). Any other duplicate is a bug;
- ``failed``: it (or some recipients of it) is in the dead-letter queue, with the reason;
- ``lost``: none of the above: confirmed by the broker, and then gone.

``unexpected`` holds what the peer received that nobody published (a job id the test never
got a confirm for). The ledger reads the dead-letter queue without consuming it, so a test can
inspect or replay it afterwards.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pika

from mailpipe.dead import contents
from mailpipe.topology import DEAD_REASON, Topology

# A connection cut by kill -9 may still deliver what the kernel had buffered: the peer can
# accept that mail a little after the kill.
CUT_GRACE_S = 1.0
MESSAGE_ID = re.compile(rb"^Message-ID: <([0-9a-f]+)@", re.MULTILINE | re.IGNORECASE)


@dataclass(frozen=True)
class Acceptance:
    """One message the SMTP peer accepted (a 250 to DATA)."""

    job_id: str
    recipients: tuple[str, ...]
    at: float  # time.time() when the peer accepted it
    client_port: int = 0  # the client's source port as the peer saw it (0: unknown)


@dataclass(frozen=True)
class Cut:
    """A connection a fault broke: the client's source port as the peer saw it, and when."""

    port: int
    at: float
    why: str


@dataclass(frozen=True)
class DeadEntry:
    job_ids: tuple[str, ...]
    reason: str
    category: str
    first_death_reason: str  # RabbitMQ's own reason ("delivery_limit"), or ""
    headers: dict[str, Any] = field(repr=False)
    body: bytes = field(repr=False, default=b"")


def job_id_of(content: bytes) -> str | None:
    """The job id every rendered mail carries in its Message-ID."""
    match = MESSAGE_ID.search(content)
    return match.group(1).decode() if match else None


def job_ids_of_dead(body: bytes) -> tuple[str, ...]:
    """The job ids a dead letter stands for: a job, an intake request, or a whole batch."""
    return contents(body).job_ids


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


def read_dead(amqp_url: str, namespace: str, limit: int = 100_000) -> list[DeadEntry]:
    """Every dead letter of ``namespace``, read without consuming (they are all requeued)."""
    queue = Topology(namespace).dead
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = conn.channel()
        entries: list[DeadEntry] = []
        while len(entries) < limit:
            method, props, body = channel.basic_get(queue, auto_ack=False)
            if method is None:
                break
            headers = dict(props.headers or {})
            deaths = headers.get("x-death") or []
            first = _text(headers.get("x-first-death-reason", ""))
            if not first and deaths and isinstance(deaths[0], dict):
                first = _text(deaths[0].get("reason", ""))
            entries.append(DeadEntry(
                job_ids=job_ids_of_dead(body), reason=_text(headers.get(DEAD_REASON, "")),
                category=_text(headers.get("x-mailpipe-category", "")), first_death_reason=first,
                headers=headers, body=body))
        # Closing the channel without acks returns every one of them to the queue.
    finally:
        conn.close()
    return entries


@dataclass
class Report:
    published: int
    delivered: list[str]
    duplicated: dict[str, int]  # job id -> times accepted
    explained: dict[str, str]  # duplicated job id -> the cut that explains it
    failed: dict[str, list[str]]  # job id -> reasons
    lost: list[str]
    unexpected: list[str]
    delivery_limit: list[str]  # job ids RabbitMQ dead-lettered for their delivery count

    @property
    def unexplained(self) -> list[str]:
        return sorted(set(self.duplicated) - set(self.explained))

    def summary(self) -> str:
        lines = [f"published {self.published}: delivered once {len(self.delivered)}, "
                 f"duplicated {len(self.duplicated)} ({len(self.explained)} explained), "
                 f"failed {len(self.failed)}, lost {len(self.lost)}, unexpected {len(self.unexpected)}, "
                 f"dead by delivery limit {len(self.delivery_limit)}"]
        for title, ids in (("lost", self.lost), ("unexplained duplicates", self.unexplained),
                           ("unexpected", self.unexpected)):
            if ids:
                lines.append(f"  {title}: {', '.join(sorted(ids)[:10])}{' ...' if len(ids) > 10 else ''}")
        reasons = Counter(r for rs in self.failed.values() for r in rs)
        lines += [f"  failed x{n}: {reason}" for reason, n in reasons.most_common(5)]
        lines += [f"  explained {job}: {why}" for job, why in sorted(self.explained.items())[:5]]
        return "\n".join(lines)

    def assert_clean(self, *, allow_explained_duplicates: bool = False, allow_failed: bool = False) -> None:
        """No loss, nothing unexpected, nothing dead by the delivery limit; duplicates only where
        allowed and explained; failures only where allowed."""
        problems = bool(self.lost or self.unexpected or self.delivery_limit or self.unexplained)
        problems |= bool(self.duplicated) and not allow_explained_duplicates
        problems |= bool(self.failed) and not allow_failed
        assert not problems, f"the ledger does not balance:\n{self.summary()}"


def reconcile(published: Iterable[str], accepted: Iterable[Acceptance], dead: Iterable[DeadEntry],
              cuts: Iterable[Cut] = ()) -> Report:
    """Sort every published job id; see the module docstring for the categories."""
    published_ids = list(dict.fromkeys(published))
    wanted = set(published_ids)
    per_recipient: dict[tuple[str, str], list[Acceptance]] = defaultdict(list)
    by_job: dict[str, list[Acceptance]] = defaultdict(list)
    unexpected: set[str] = set()
    for acc in sorted(accepted, key=lambda a: a.at):
        if acc.job_id not in wanted:
            unexpected.add(acc.job_id)
            continue
        by_job[acc.job_id].append(acc)
        for rcpt in acc.recipients:
            per_recipient[(acc.job_id, rcpt.lower())].append(acc)
    # The last mail each cut connection carried: the sender sends one mail at a time on a
    # connection and marks it sent before the next, so only that one can be accepted unmarked.
    last_on_cut: dict[tuple[str, float], Cut] = {}
    all_accepted = sorted((a for accs in by_job.values() for a in accs), key=lambda a: a.at)
    for cut in cuts:
        on_port = [a for a in all_accepted if a.client_port == cut.port and a.at <= cut.at + CUT_GRACE_S]
        if on_port:
            last_on_cut[(on_port[-1].job_id, on_port[-1].at)] = cut

    duplicated: dict[str, int] = {}
    why: dict[str, list[str]] = defaultdict(list)
    unexplained: set[str] = set()
    for (job, _rcpt), accs in per_recipient.items():
        if len(accs) < 2:
            continue
        duplicated[job] = max(duplicated.get(job, 0), len(accs))
        # Every copy but the last must have been lost to its sender by a cut.
        for acc in accs[:-1]:
            found = last_on_cut.get((acc.job_id, acc.at))
            if found is None:
                unexplained.add(job)
                break
            why[job].append(f"accepted at {acc.at:.3f}, the last mail on port {acc.client_port}, "
                            f"{found.why} at {found.at:.3f}")
    explained = {job: "; ".join(reasons) for job, reasons in why.items() if job not in unexplained}

    failed: dict[str, list[str]] = defaultdict(list)
    delivery_limit: set[str] = set()
    for entry in dead:
        for job in entry.job_ids:
            if job in wanted:
                failed[job].append(entry.reason or f"rabbitmq: {entry.first_death_reason}")
                if entry.first_death_reason == "delivery_limit":
                    delivery_limit.add(job)
            else:
                unexpected.add(job)
    lost = [j for j in published_ids if j not in by_job and j not in failed]
    delivered = [j for j in published_ids if j in by_job and j not in duplicated]
    return Report(published=len(published_ids), delivered=delivered, duplicated=duplicated,
                  explained=explained, failed=dict(failed), lost=lost, unexpected=sorted(unexpected),
                  delivery_limit=sorted(delivery_limit))
