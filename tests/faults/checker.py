"""The fault campaign's checker, in the spirit of RabbitMQ's Jepsen checker: pure functions from
what a run recorded (the confirmed jobs and their recipients, what the SMTP peer accepted and
when, the dead letters, the connections faults cut, the faults applied) to a report that prints
as JSON and names every violation.

Three checks:

- **lost**, per recipient: a (job id, recipient) whose publish returned (confirmed), which the
  peer never accepted and which is not in the dead-letter queue. Must be 0.
- **duplicates**, per recipient: a recipient the peer accepted more than once. Each copy but the
  last must be one of the two cases SMTP cannot rule out, with its evidence:
  (a) ``cut``: it was the last mail the peer accepted on a connection a fault cut (kill -9 of the
  sender holding it, a proxy reset), at most ``CUT_GRACE_S`` after the cut (what the kernel had
  buffered still arrives), so its sender never recorded the 250;
  (b) ``lost reply``: the proxy dropped the peer's reply to its DATA, at most ``grace_s`` after the
  peer accepted it, and it was the last mail accepted on that connection before the drop.
  Any other duplicate is a bug.
- **rate**, at the peer: for each window ``w`` (1 s, 10 s, 60 s) the most transactions (accepted
  DATA, not recipients) in any closed window ``[t, t + w]`` is at most ``rate x w + burst``.
- **failed**, where a run refuses nothing for good (``failed_is_violation``): a confirmed
  recipient in the dead-letter queue and never accepted is a violation, with its reasons.

Also here, pure: ``claim_held``, which reads one claim hash of the sender (field values ``s``,
``r <grant>`` or ``h <owner> <until_us> <grant>``) against Redis time.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from tests.faults.ledger import CUT_GRACE_S, Acceptance, Cut

WINDOWS_S = (1.0, 10.0, 60.0)
SAMPLE = 20  # ids listed in the report per category, at most


@dataclass(frozen=True)
class Dead:
    """A dead letter, as far as the checker needs it: the job, the recipients it stands for (empty:
    every recipient of the job, as for a whole batch or an intake request) and the reason."""

    job_id: str
    recipients: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class Fault:
    """One fault the nemesis applied: when (seconds since the run started), what, to whom."""

    at: float
    kind: str
    target: str = ""
    duration_s: float = 0.0
    detail: str = ""


@dataclass(frozen=True)
class Copy:
    at: float
    port: int


@dataclass(frozen=True)
class Duplicate:
    job_id: str
    recipient: str
    copies: tuple[Copy, ...]
    explained: bool
    evidence: tuple[str, ...]  # one line per copy but the last: why it was sent again, or why not


@dataclass(frozen=True)
class WindowResult:
    window_s: float
    worst: int  # the most transactions the peer accepted in any closed window of this length
    bound: float  # rate x window + burst
    start: float  # where that worst window starts (seconds since the run started)

    @property
    def ok(self) -> bool:
        return self.worst <= self.bound


@dataclass
class CampaignReport:
    seed: int
    mails: int  # confirmed jobs
    recipients: int  # confirmed (job, recipient) pairs
    delivered: int  # pairs the peer accepted at least once
    failed: int  # pairs in the dead-letter queue and never accepted
    lost: int
    lost_sample: list[str]
    explained: list[Duplicate]
    unexplained: list[Duplicate]
    windows: list[WindowResult]
    faults: list[Fault]
    unconfirmed: int = 0  # publishes that raised (not counted above; may still be delivered)
    unexpected: list[str] = field(default_factory=list)  # accepted job ids nobody published
    transactions: int = 0  # accepted DATA at the peer
    failed_reasons: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the harness itself reports (not drained...)
    duration_s: float = 0.0
    failed_is_violation: bool = False  # nothing in the run refuses mail for good

    def violations(self) -> list[str]:
        found = [f"{self.lost} recipients lost (confirmed, never accepted, not dead): "
                 f"{', '.join(self.lost_sample[:5])}"] if self.lost else []
        found += [f"unexplained duplicate {d.job_id} {d.recipient}: {'; '.join(d.evidence)}"
                  for d in self.unexplained[:SAMPLE]]
        if len(self.unexplained) > SAMPLE:
            found.append(f"... {len(self.unexplained) - SAMPLE} more unexplained duplicates")
        found += [f"{w.worst} transactions in {w.window_s:g} s from t={w.start:.3f}, bound {w.bound:g}"
                  for w in self.windows if not w.ok]
        if self.unexpected:
            found.append(f"{len(self.unexpected)} accepted jobs nobody published: {self.unexpected[:5]}")
        if self.failed_is_violation and self.failed:
            found.append(f"{self.failed} recipients dead-lettered where nothing refuses mail for good: "
                         f"{self.failed_reasons}")
        return found + self.notes

    @property
    def ok(self) -> bool:
        return not self.violations()

    def as_dict(self) -> dict[str, Any]:
        def dup(d: Duplicate) -> dict[str, Any]:
            return {"job_id": d.job_id, "recipient": d.recipient,
                    "copies": [{"at": round(c.at, 3), "port": c.port} for c in d.copies],
                    "evidence": list(d.evidence)}

        return {
            "seed": self.seed, "ok": self.ok, "duration_s": round(self.duration_s, 1),
            "mails": self.mails, "unconfirmed_publishes": self.unconfirmed, "recipients": self.recipients,
            "transactions": self.transactions, "delivered": self.delivered, "failed": self.failed,
            "failed_reasons": self.failed_reasons, "lost": self.lost, "lost_sample": self.lost_sample,
            "duplicates": {"explained": len(self.explained), "unexplained": len(self.unexplained),
                           "explained_list": [dup(d) for d in self.explained[:SAMPLE]],
                           "unexplained_list": [dup(d) for d in self.unexplained[:SAMPLE]]},
            "windows": [{"window_s": w.window_s, "worst": w.worst, "bound": w.bound,
                         "start": round(w.start, 3), "ok": w.ok} for w in self.windows],
            "faults": [dataclasses.asdict(f) | {"at": round(f.at, 3)} for f in self.faults],
            "unexpected": self.unexpected[:SAMPLE], "notes": self.notes,
            "violations": self.violations(),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


# -- lost -----------------------------------------------------------------------------------------

def lost_recipients(confirmed: Mapping[str, Sequence[str]], accepted: Iterable[Acceptance],
                    dead: Iterable[Dead]) -> tuple[list[tuple[str, str]], list[tuple[str, str]], int]:
    """(lost pairs, failed pairs, delivered count) over the confirmed (job, recipient) pairs."""
    got = {(a.job_id, r.lower()) for a in accepted for r in a.recipients}
    dead_pairs: set[tuple[str, str]] = set()
    for entry in dead:
        rcpts: Sequence[str] = entry.recipients or confirmed.get(entry.job_id, ())
        dead_pairs |= {(entry.job_id, r.lower()) for r in rcpts}
    lost, failed, delivered = [], [], 0
    for job, rcpts in confirmed.items():
        for rcpt in dict.fromkeys(r.lower() for r in rcpts):
            if (job, rcpt) in got:
                delivered += 1
            elif (job, rcpt) in dead_pairs:
                failed.append((job, rcpt))
            else:
                lost.append((job, rcpt))
    return lost, failed, delivered


# -- duplicates -----------------------------------------------------------------------------------

def _last_before(on_port: Sequence[Acceptance], limit: float) -> Acceptance | None:
    """The last acceptance (sorted by time) at or before ``limit``."""
    found = None
    for acc in on_port:
        if acc.at > limit:
            break
        found = acc
    return found


def classify_duplicates(accepted: Iterable[Acceptance], cuts: Iterable[Cut] = (),
                        lost_replies: Iterable[Cut] = (), *, cut_grace_s: float = CUT_GRACE_S,
                        reply_grace_s: float = CUT_GRACE_S) -> list[Duplicate]:
    """Every recipient accepted more than once, each copy but the last explained or not."""
    ordered = sorted(accepted, key=lambda a: a.at)
    by_port: dict[int, list[Acceptance]] = defaultdict(list)
    for acc in ordered:
        if acc.client_port:
            by_port[acc.client_port].append(acc)
    # Which acceptance each piece of evidence can explain: (job, at, port) -> why.
    explains: dict[tuple[str, float, int], str] = {}
    for cut in cuts:
        last = _last_before(by_port.get(cut.port, []), cut.at + cut_grace_s)
        if last is not None:
            explains.setdefault((last.job_id, last.at, last.client_port),
                                f"cut: the last mail on port {cut.port}, accepted {last.at - cut.at:+.3f} s "
                                f"from {cut.why} at {cut.at:.3f}")
    for drop in lost_replies:
        last = _last_before(by_port.get(drop.port, []), drop.at)
        if last is not None and drop.at - last.at <= reply_grace_s:
            explains.setdefault((last.job_id, last.at, last.client_port),
                                f"lost reply: the peer's reply on port {drop.port} dropped "
                                f"{drop.at - last.at:.3f} s after it accepted ({drop.why})")
    per_rcpt: dict[tuple[str, str], list[Acceptance]] = defaultdict(list)
    for acc in ordered:
        for rcpt in dict.fromkeys(r.lower() for r in acc.recipients):
            per_rcpt[(acc.job_id, rcpt)].append(acc)
    found = []
    for (job, rcpt), accs in sorted(per_rcpt.items()):
        if len(accs) < 2:
            continue
        evidence, explained = [], True
        for acc, again in pairwise(accs):
            why = explains.get((acc.job_id, acc.at, acc.client_port))
            if why is None:
                explained = False
                why = (f"UNEXPLAINED: accepted at {acc.at:.3f} on port {acc.client_port}, no fault cut that "
                       f"connection nor dropped its reply; accepted again at {again.at:.3f} "
                       f"on port {again.client_port}")
            evidence.append(why)
        found.append(Duplicate(job, rcpt, tuple(Copy(a.at, a.client_port) for a in accs), explained,
                               tuple(evidence)))
    return found


# -- rate -----------------------------------------------------------------------------------------

def max_in_window(times: Iterable[float], window_s: float) -> tuple[int, float]:
    """The most events in any closed window ``[t, t + window_s]``, and where it starts (the
    count is maximal at a window that starts on an event). Two pointers over sorted times."""
    ts = sorted(times)
    best, start, j = 0, ts[0] if ts else 0.0, 0
    for i, t in enumerate(ts):
        if j < i:
            j = i
        while j < len(ts) and ts[j] <= t + window_s:
            j += 1
        if j - i > best:
            best, start = j - i, t
    return best, start


def rate_windows(times: Sequence[float], rate_per_s: float, burst: int,
                 windows_s: Iterable[float] = WINDOWS_S, origin: float = 0.0) -> list[WindowResult]:
    out = []
    for w in windows_s:
        worst, start = max_in_window(times, w)
        out.append(WindowResult(w, worst, rate_per_s * w + burst, start - origin if times else 0.0))
    return out


# -- claims ---------------------------------------------------------------------------------------

def claim_held(values: Iterable[str | bytes], now_us: int) -> bool:
    """Whether a claim hash (its field values) is held: any ``h <owner> <until_us> <grant>``
    whose lease ends after ``now_us`` (Redis time). ``s`` (sent) and ``r <grant>`` are not."""
    for raw in values:
        value = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if not value.startswith("h "):
            continue
        parts = value.split()
        try:
            until_us = int(parts[2])
        except (IndexError, ValueError):
            return True  # a held claim we cannot read: count it held rather than call it drained
        if until_us > now_us:
            return True
    return False


# -- the whole run -------------------------------------------------------------------------------

def check(*, seed: int, confirmed: Mapping[str, Sequence[str]], accepted: Sequence[Acceptance],
          dead: Iterable[Dead] = (), cuts: Iterable[Cut] = (), lost_replies: Iterable[Cut] = (),
          rate_per_s: float, burst: int, faults: Iterable[Fault] = (), attempted: Iterable[str] = (),
          windows_s: Iterable[float] = WINDOWS_S, origin: float | None = None,
          notes: Iterable[str] = (), duration_s: float = 0.0, failed_is_violation: bool = False) -> CampaignReport:
    """Every check over one run. ``attempted``: every job id the run tried to publish, confirmed
    or not (a publish that raised may still have been queued: its delivery is not unexpected)."""
    dead = list(dead)
    known = set(confirmed) | set(attempted)
    ours = [a for a in accepted if a.job_id in known]
    unexpected = sorted({a.job_id for a in accepted if a.job_id not in known})
    lost, failed, delivered = lost_recipients(confirmed, ours, dead)
    duplicates = classify_duplicates(ours, cuts, lost_replies)
    times = sorted(a.at for a in accepted)  # the server's view: every transaction counts
    start = origin if origin is not None else (times[0] if times else 0.0)
    reasons: dict[str, int] = defaultdict(int)
    failed_jobs = {job for job, _ in failed}
    for entry in dead:
        if entry.job_id in failed_jobs:
            reasons[entry.reason or "(no reason)"] += 1
    return CampaignReport(
        seed=seed, mails=len(confirmed), recipients=sum(len(set(map(str.lower, r))) for r in confirmed.values()),
        delivered=delivered, failed=len(failed), lost=len(lost),
        lost_sample=[f"{j} {r}" for j, r in lost[:SAMPLE]],
        explained=[d for d in duplicates if d.explained], unexplained=[d for d in duplicates if not d.explained],
        windows=rate_windows(times, rate_per_s, burst, windows_s, start), faults=list(faults),
        unconfirmed=len(known - set(confirmed)), unexpected=unexpected, transactions=len(accepted),
        failed_reasons=dict(reasons), notes=list(notes),
        duration_s=duration_s, failed_is_violation=failed_is_violation)
