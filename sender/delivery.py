"""Deliver one batch's jobs over a server's pool before the batch's deadline.

``deliver`` first claims every recipient of the batch in one round trip (sender/claims.py),
which also reads Redis time: the deadline is judged by it, never by this worker's clock.
Up to the pool's size of workers then each take the next job, send its claimed recipients in
one SMTP transaction, and mark the accepted ones "sent" before the next mail on that
connection starts (marks of concurrent connections share a round trip). Recipients another
live holder has are asked for again until they are sent or released, or the cutoff comes.
No mail is started later than ``deadline - margin``: what is left goes back to the limiter,
with its token refunded only when nobody touched the job under this grant.

Per recipient: 2xx sent, 4xx deferred, 5xx failed; a connection that fails defers every
recipient of the mail it was carrying (connection failures are always transient). Before the
delivery ends, its deferred recipients are recorded as deferred in their claims, in one round
trip: only then may their retry copies (the next attempt) be published, so no holder of this
attempt ever sends them again. Without Redis they go back to the limiter instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mailpipe.errors import RedisUnavailable, ServerPaused, SmtpError
from mailpipe.model import Job, now_ms
from mailpipe.pushback import CONNECTIONS, RATE, SERVER_BROKEN, Change, ConnectionLeases, Policy, Signal
from mailpipe.servers import ServerConfig
from sender import metrics
from sender.claims import Claim, Claims
from sender.pool import ServerPool
from sender.replies import FAILED, SENT, Reply, classify
from sender.smtp import Connection
from sender.transaction import send_mail
from sender.translate import reply_of

if TYPE_CHECKING:
    from sender.envelope import Planner, Transaction

log = logging.getLogger(__name__)

US = 1_000_000
PACE_SIGNALS = (RATE, CONNECTIONS, SERVER_BROKEN)
PAUSED = "paused"  # no connection: the server is paused
DOUBTS = 3  # without a pushback policy: relaying-denied refusals in a row that are the server's
RECLAIM_EVERY_S = 0.25  # how often recipients a live holder has are asked for again
# What a holder that takes over a deferral left unfinished (Claim.RETRY) says in its events: the
# recipient was deferred before, and its retry copy is published again (no mail is sent now).
DEFERRED_BEFORE = classify(451, "4.3.0 deferred before by a holder that did not finish; its retry is published again")


@dataclass(frozen=True)
class Hold:
    """Who holds a granted batch, and until when, in Redis time: its claims are taken as
    ``owner`` under ``grant`` and leased until ``deadline_us`` plus ``lease_extra_us`` (the
    SMTP timeout: a mail started just before the deadline may still be on its way)."""

    claims: Claims
    owner: str
    grant: str
    deadline_us: int
    lease_extra_us: int


@dataclass
class JobOutcome:
    """What happened to one job of the batch in this delivery."""

    job: Job
    attempted: bool = False  # a transaction was started for it
    sent: list[str] = field(default_factory=list)
    already_sent: list[str] = field(default_factory=list)  # accepted in an earlier delivery
    deferred: dict[str, Reply] = field(default_factory=dict)
    failed: dict[str, Reply] = field(default_factory=dict)
    back: list[str] = field(default_factory=list)  # not sent under this grant: to the limiter
    refundable: bool = False  # nothing of it was touched under this grant: its token comes back
    retried: list[str] = field(default_factory=list)  # deferred ones whose retry copy (attempt + 1) goes out
    at_ms: int = 0

    def record(self, recipient: str, reply: Reply) -> None:
        if reply.outcome == SENT:
            self.sent.append(recipient)
        elif reply.outcome == FAILED:
            self.failed[recipient] = reply
        else:
            self.deferred[recipient] = reply


@dataclass
class BatchDelivery:
    outcomes: list[JobOutcome]
    started: float
    ended: float
    # "", "late", "deadline", "stop", "redis", "paused" (the server is), "broken" (it said so),
    # "throttled" (it said slow down), "busy" (too many connections): why mails were handed back
    stopped_by: str = ""
    successes: int = 0  # mails the server accepted (for its pace: mailpipe/pushback.py)
    signals: list[Signal] = field(default_factory=list)  # what its replies said about it
    changes: list[Change] = field(default_factory=list)  # to its pace, by signals reported at once

    def releases(self, grant: str) -> list[tuple[Job, str, str]]:
        """The claims to let go once the outputs are published: recipients whose retry copy
        went out as deferred under ``grant`` (done for every holder of this attempt: the copy,
        attempt + 1, sends them), the other refused ones (dead letters) as attempted under it,
        handed-back ones as given back under it."""
        out = [(o.job, r, f"{'d' if r in o.retried else 'x'} {grant}") for o in self.outcomes
               for r in (*o.deferred, *o.failed)]
        return out + [(o.job, r, f"r {grant}") for o in self.outcomes for r in o.back]


async def deliver(jobs: Sequence[Job], server: ServerConfig, pool: ServerPool, deadline: float, *,
                  hold: Hold | None, margin_s: float = 1.0,
                  stop: Callable[[], bool] = lambda: False, plan: Planner | None = None,
                  pace: ConnectionLeases | None = None, policy: Policy | None = None) -> BatchDelivery:
    """Send ``jobs`` over ``pool`` until done or the deadline less ``margin_s``. With a ``hold``,
    each recipient is claimed first and the deadline is ``hold.deadline_us`` in Redis time;
    without one (tests, benchmarks), ``deadline`` in ``time.monotonic()`` and no claims. With
    ``pace``, a server paused since the grant gets nothing: it all goes back; and with its
    ``policy`` too, a server-broken signal is reported at once."""
    outcomes = [JobOutcome(job) for job in jobs]
    run = _Run(jobs, outcomes, server, pool, hold, stop, plan)
    run.pace, run.policy = pace, policy
    if pace is not None and await _paused(pace, server.name):
        run.waiting = {i: list(job.recipients) for i, job in enumerate(jobs)}
        run.stop(PAUSED)
    elif hold is None:
        run.cutoff = deadline - margin_s
        run.mine = {i: list(job.recipients) for i, job in enumerate(jobs)}
        for outcome in outcomes:
            outcome.refundable = True
        await run.send_all()
    else:
        await run.claim_and_send(hold.deadline_us - int(margin_s * US))
    busy = run.connect_failure is not None and run.connect_failure.signal == CONNECTIONS and run.connect_failure.code
    if busy and not run.stopped_by:
        # No worker could connect, the server answering that it has too many connections (not
        # one that does not answer: that is deferred below): its cap is lowered; the mail goes
        # back, to be granted again (not refunded: the grant paced this try, and paces the next).
        run.stop("busy")
        for outcome in outcomes:
            outcome.refundable = False
    elif run.connect_failure is not None and not run.stopped_by:
        # No worker could connect: the server is unreachable or refuses us. Defer the rest
        # (connection failures are transient: retried after a delay, through the limiter)
        # rather than knock again once per mail. A server broken for us (stopped_by "broken")
        # gets it all back instead, to wait while it is paused.
        for index, recipients in run.mine.items():
            outcome = outcomes[index]
            outcome.attempted, outcome.at_ms = True, now_ms()
            for recipient in recipients:
                outcome.record(recipient, run.connect_failure)
        run.mine = {}
    for index, recipients in (*run.mine.items(), *run.waiting.items()):  # never started: back
        outcomes[index].back += recipients
    if hold is not None:
        await run.record_deferrals()
    for outcome in outcomes:
        outcome.refundable = outcome.refundable and not outcome.attempted and bool(outcome.back)
    return BatchDelivery(outcomes=outcomes, started=run.started, ended=time.monotonic(),
                         stopped_by=run.stopped_by, successes=run.successes, signals=run.signals,
                         changes=run.changes)


async def _paused(pace: ConnectionLeases, server: str) -> bool:
    try:
        return await pace.paused(server)
    except RedisUnavailable:
        return False  # the claims will say so in a moment


class _Run:
    """One delivery of a batch: what its workers share."""

    def __init__(self, jobs: Sequence[Job], outcomes: list[JobOutcome], server: ServerConfig,
                 pool: ServerPool, hold: Hold | None, stop: Callable[[], bool],
                 plan: Planner | None = None) -> None:
        self.plan = plan  # the envelopes (sender/envelope.py): a VERP sender per recipient, DSN
        self.jobs = jobs
        self.outcomes = outcomes
        self.server = server
        self.pool = pool
        self.hold = hold
        self.should_stop = stop
        self.started = time.monotonic()
        self.cutoff = self.started
        self.lease_end = float("inf")  # monotonic: when this holder's claims end (with a hold)
        self.mine: dict[int, list[str]] = {}  # claimed, to send
        self.waiting: dict[int, list[str]] = {}  # held by another live holder
        self.marking: list[tuple[Job, asyncio.Future[None]]] = []
        self.stopped_by = ""
        self.connect_failure: Reply | None = None
        self.successes = 0
        # Recipients refused at RCPT as if the server were broken for us (relaying denied), not
        # judged yet: the next mails tell. One taken means the refusals were the recipients'
        # (failed, like any 5xx); ``pause_after`` of them in a row, the server's (signals).
        self.doubtful: list[tuple[JobOutcome, str, Reply]] = []
        self.signals: list[Signal] = []
        self.pace: ConnectionLeases | None = None
        self.policy: Policy | None = None
        self.changes: list[Change] = []

    def stop(self, why: str) -> None:
        self.stopped_by = self.stopped_by or why

    async def heard(self, job: Job | None, reply: Reply) -> None:
        """Note what a reply says about the server (mailpipe/pushback.py), counted once per job,
        attempt and grant (or, for a connection this batch could not open, once per batch); the batch
        stops at a broken server (the rest goes back; reported at once, so that every replica
        tries it one connection at a time from now), and at one that says slow down (the rest
        goes back, to be granted again at the cut rate)."""
        if reply.signal not in PACE_SIGNALS:
            return
        # Per hold, not per job only: a job given back by a broken server and refused again
        # under its next grant counts again (towards the pause), however often it comes back.
        grant = self.hold.grant if self.hold else str(id(self))
        key = f"{job.id}:{job.attempt}:{grant}" if job is not None else f"{grant}:connect"
        signal = Signal(reply.signal, reply.rule, reply.cut, key, str(reply)[:300])
        self.signals.append(signal)
        metrics.SIGNALS.labels(self.server.name, reply.signal, reply.rule).inc()
        if reply.signal == SERVER_BROKEN:
            self.pool.broken()
            self.stop("broken")
            if self.pace is not None and self.policy is not None:
                with contextlib.suppress(RedisUnavailable):  # the batch's report tries again
                    self.changes += await self.pace.report(self.server.name, self.policy, [signal])
        elif reply.signal == RATE:
            self.stop("throttled")

    async def claim_and_send(self, cutoff_us: int) -> None:
        """Claim every recipient, send what is ours; what a live holder has, ask for again
        until it is sent or released, or the cutoff comes."""
        asked = {i: list(job.recipients) for i, job in enumerate(self.jobs)}
        first = True
        while asked and not self.stopped_by:
            try:
                late = await self.claim(asked, cutoff_us, first)
            except RedisUnavailable as exc:
                log.warning("%s: the rest of the batch goes back", exc.reason)
                self.waiting.update(asked)
                self.stop("redis")
                return
            first = False
            if late:
                self.stop("late")
                return
            await self.send_all()
            asked, self.waiting = self.waiting, {}
            wait_s = min(RECLAIM_EVERY_S, self.cutoff - time.monotonic())
            if asked and wait_s <= 0:
                self.waiting = asked
                self.stop("deadline")
            elif asked and not self.stopped_by:
                await asyncio.sleep(wait_s)

    async def claim(self, asked: dict[int, list[str]], cutoff_us: int, first: bool) -> bool:
        """Claim ``asked``; sort what comes back. True when the batch is past its cutoff. On
        the ``first`` claim, a job none of whose recipients anyone touched may be refunded."""
        hold = self.hold
        assert hold is not None
        indexes = list(asked)
        before = time.monotonic()  # Redis time is mapped from before the call: the cutoff comes early, never late
        snap = await hold.claims.claim(hold.owner, hold.grant, [self.jobs[i] for i in indexes],
                                       [asked[i] for i in indexes], hold.deadline_us + hold.lease_extra_us,
                                       cutoff_us)
        self.cutoff = before + (cutoff_us - snap.now_us) / US
        self.lease_end = before + (hold.deadline_us + hold.lease_extra_us - snap.now_us) / US
        late = snap.now_us >= cutoff_us
        for index, codes in zip(indexes, snap.codes, strict=True):
            outcome = self.outcomes[index]
            if first:
                outcome.refundable = all(code == Claim.MINE for code in codes.values())
            for recipient, code in codes.items():
                if code == Claim.MINE:
                    (outcome.back if late else self.mine.setdefault(index, [])).append(recipient)
                elif code == Claim.SENT:
                    outcome.already_sent.append(recipient)
                    metrics.mails(self.server.name, "skipped", "").inc()
                elif code == Claim.HELD:
                    self.waiting.setdefault(index, []).append(recipient)
                elif code == Claim.TOUCHED:
                    outcome.back.append(recipient)
                elif code == Claim.RETRY:  # ours now: its retry copy goes out (again), nothing is sent
                    outcome.deferred[recipient] = DEFERRED_BEFORE
                    outcome.at_ms = outcome.at_ms or now_ms()
        return late

    async def record_deferrals(self) -> None:
        """Record every deferred recipient as such in its claim ("D"), before any retry copy is
        published. A holder that dies after this leaves a claim that no holder of this attempt
        sends from; one that dies before it has published nothing. A recipient no longer ours
        (our lease ended and another holder took it) is that holder's to finish: no retry copy
        from us. Without Redis, the deferred recipients go back to the limiter as touched."""
        hold = self.hold
        assert hold is not None
        deferred = [(outcome, r) for outcome in self.outcomes for r in outcome.deferred]
        if not deferred:
            return
        try:
            ours = await hold.claims.defer(hold.owner, hold.grant, hold.deadline_us + hold.lease_extra_us,
                                           [(outcome.job, r) for outcome, r in deferred])
        except RedisUnavailable as exc:
            log.warning("%s: %d deferred recipient(s) go back to the limiter instead of a retry queue",
                        exc.reason, len(deferred))
            for outcome, recipient in deferred:
                del outcome.deferred[recipient]
                outcome.back.append(recipient)
            return
        for (outcome, recipient), mine in zip(deferred, ours, strict=True):
            if not mine:
                log.warning("job %s: %s deferred after this holder's lease ended; another holder has it",
                            outcome.job.id, recipient)
                del outcome.deferred[recipient]

    async def send_all(self) -> None:
        todo = sorted(self.mine, reverse=True)  # pop() from the end takes them in order
        workers = max(1, min(self.pool.size, len(todo)))
        await asyncio.gather(*(self._worker(todo) for _ in range(workers)))
        await self.doubts_confirmed()

    async def doubts_confirmed(self) -> None:
        """No mail taken after the doubtful refusals: they were the server's. Each is a signal
        (the batch stops; reported at once), its recipient goes back to wait in its lane."""
        doubtful, self.doubtful = self.doubtful, []
        for outcome, recipient, reply in doubtful:
            await self.heard(outcome.job, reply)
            outcome.back.append(recipient)

    async def _worker(self, todo: list[int]) -> None:
        conn: Connection | None = None
        marking: asyncio.Future[None] | None = None  # the last mail's "sent" mark on ``conn``
        try:
            while todo and not self.stopped_by:
                if self.should_stop():
                    self.stop("stop")
                elif time.monotonic() >= self.cutoff:
                    self.stop("deadline")
                elif conn is None:
                    got = await _acquire(self.pool, self.cutoff, lambda: bool(self.stopped_by))
                    if isinstance(got, str):  # PAUSED
                        self.stop(PAUSED)
                        return
                    if isinstance(got, Reply):
                        # This worker cannot connect: the others (if any) go on with the jobs.
                        self.connect_failure = got
                        try:
                            await self.heard(None, got)
                        finally:
                            self.pool.trial_over()
                        return
                    if got is None:
                        self.stop("deadline")
                    conn = got
                else:
                    index = todo.pop()
                    recipients = self.mine.pop(index)
                    plan = self.plan(self.jobs[index], recipients, conn.session.supports("dsn")) if self.plan else None
                    for transaction in plan or (None,):
                        marking = await self._send(conn, index, list(transaction.recipients) if transaction
                                                   else recipients, marking, transaction)
                    if conn.broken or conn.mails >= self.server.max_mails_per_connection:
                        await self._marked(marking)
                        marking = None
                        self.pool.release(conn)  # retired: the next mail gets a fresh connection
                        conn = None
        finally:
            await self._marked(marking)  # before the connection serves anyone else
            if conn is not None:
                self.pool.release(conn)

    async def _marked(self, marking: asyncio.Future[None] | None) -> bool:
        """Wait for a mark to be in Redis; False (and the batch stops) if Redis refused it."""
        if marking is None:
            return True
        try:
            await marking
        except RedisUnavailable as exc:
            log.warning("%s: sending stops for this batch", exc.reason)
            self.stop("redis")
            return False
        return True

    async def _send(self, conn: Connection, index: int, recipients: list[str],
                    marking: asyncio.Future[None] | None,
                    transaction: Transaction | None = None) -> asyncio.Future[None] | None:
        """One transaction; returns its "sent" mark on the way to Redis. The message goes only
        once the previous mail's mark on this connection (``marking``) is in: a holder that
        dies leaves at most one accepted, unmarked mail per connection, and the mark's round
        trip overlaps this mail's envelope."""
        outcome = self.outcomes[index]
        job = outcome.job
        outcome.attempted = True
        async def ready() -> bool:
            # The message goes once the previous mark is in, and only while this holder's lease
            # lasts: a holder frozen mid-transaction (SIGSTOP, a stalled VM) past its lease is,
            # to the others, gone, and one of them may have sent these recipients meanwhile.
            return await self._marked(marking) and time.monotonic() < self.lease_end
        try:
            result = await send_mail(conn, transaction.sender if transaction else job.sender, recipients,
                                     job.message, ready=ready, cutoff=self.cutoff,
                                     mail_params=transaction.mail_params if transaction else b"",
                                     rcpt_params=transaction.rcpt_params if transaction else None)
        except SmtpError as exc:
            reply = reply_of(exc)
            log.info("job %s: %s", job.id, exc.reason)
            await self.heard(job, reply)
            for recipient in recipients:
                self._record(outcome, recipient, reply)
            outcome.at_ms = now_ms()
            return marking  # still to wait for, if the message never came to ask
        if result.aborted:
            # Never sent: the previous mark failed (and was reported), or the cutoff came before
            # the body could go (a server slow to say 354, a mark slow to be written). Its
            # recipients go back as touched under this grant: the server saw their envelope.
            for recipient, reply in result.refused.items():
                outcome.record(recipient, reply)
            outcome.back += [r for r in recipients if r not in result.refused]
            outcome.at_ms = now_ms()
            if result.late:
                self.stop("deadline")
            return None
        outcome.at_ms = now_ms()
        outcome.sent.extend(result.accepted)
        self.successes += bool(result.accepted)
        if result.accepted or any(r.signal not in PACE_SIGNALS for r in result.refused.values()):
            self.pool.proven()
        if result.accepted:
            doubtful, self.doubtful = self.doubtful, []
            for earlier, recipient, reply in doubtful:  # the server takes mail: theirs alone
                earlier.record(recipient, reply)
        for recipient, reply in result.refused.items():
            if reply.signal == SERVER_BROKEN:
                # Relaying denied for one recipient while others go through is that recipient's
                # failure: judged by the mails around it, or by this recipient's last try.
                if result.accepted or self.pool.refused_alone(job.id, recipient):
                    outcome.record(recipient, reply)
                else:
                    self.doubtful.append((outcome, recipient, reply))
                continue
            await self.heard(job, reply)
            self._record(outcome, recipient, reply)
        if len(self.doubtful) >= (self.policy.pause_after if self.policy else DOUBTS):
            await self.doubts_confirmed()
        if not result.accepted:
            return marking
        metrics.latency_seconds(self.server.name).observe(max(0, outcome.at_ms - job.created_ms) / 1000)
        return self.hold.claims.mark_sent(job, result.accepted) if self.hold is not None else None


    @staticmethod
    def _record(outcome: JobOutcome, recipient: str, reply: Reply) -> None:
        """A refusal that says the server is broken for us (a wrong password, relaying denied) is
        no fault of the mail: it goes back, to wait in its lane while the server is paused."""
        if reply.signal == SERVER_BROKEN:
            outcome.back.append(recipient)
        else:
            outcome.record(recipient, reply)


async def _acquire(pool: ServerPool, cutoff: float, stopped: Callable[[], bool]) -> Connection | Reply | str | None:
    """A connection; the reply that says why there is none; PAUSED; or None when the cutoff
    came first, or the batch stopped meanwhile."""
    try:
        return await asyncio.wait_for(pool.acquire(stopped), max(0.0, cutoff - time.monotonic()))
    except TimeoutError:
        return None
    except ServerPaused:
        return PAUSED
    except SmtpError as exc:
        log.warning("%s", exc.reason)
        return reply_of(exc)


__all__ = ["BatchDelivery", "Hold", "JobOutcome", "deliver"]
