"""How a limiter takes batches from lanes, and deletes idle ones: the reference of ``taking.lua``
(``mailpipe/lanes.py`` explains the protocol; the tests check Lua against these functions).

- ``plan``: which lanes to take from next. With fair share, those of the first tenants in turn
  order (a lane held somewhere is listed too: a dead holder's batch may be back in it), and every
  present high lane (transactional mail within its ration does not wait for a turn); without,
  the present lanes, high first, then the oldest.
- ``hold`` before ``basic.get``, ``got`` after it: an empty lane is no longer present unless its
  version moved since; a batch got stays held (leased) until ``release``.
- ``close_begin`` / ``close_end``: a lane idle, not present, not held and not being published
  into is closed (no enter, no hold), checked empty, deleted.
"""

from __future__ import annotations

from collections.abc import Sequence

from mailpipe.lanes import US, LaneBook, tenant_of

PURGE = 32


def _held_off(book: LaneBook, lane: str, now_us: int) -> bool:
    off = book.off.get(tenant_of(lane))
    return (off is not None and off > now_us) or book.lane_off(lane, now_us)


def plan(book: LaneBook, now_us: int, fair: bool, k: int) -> list[tuple[str, int]]:
    """(lane, version) to take from, in order."""
    book.purge_holds(now_us, PURGE)
    for tenant in sorted(t for t, until in book.off.items() if until <= now_us):
        del book.off[tenant]
        book.update_waiting(tenant, now_us)
    book.update_active()
    out: list[tuple[str, int]] = []
    seen: set[str] = set()

    def add(lane: str) -> None:
        if lane not in seen:
            seen.add(lane)
            out.append((lane, book.version.get(lane, 0)))

    present = sorted(book.present.items(), key=lambda item: (item[1], item[0]))
    if fair:
        for tenant, _ in sorted(book.tags.items(), key=lambda item: (item[1], item[0]))[:k]:
            for lane in (f"h:{tenant}", f"n:{tenant}"):
                if not book.lane_off(lane, now_us) and (lane in book.present or book.held.get(lane, 0) > 0):
                    add(lane)
        for lane, _ in [p for p in present if p[1] < 0][:k]:
            if not _held_off(book, lane, now_us):
                add(lane)
    else:
        for lane, _ in present[:4 * k]:
            if len(out) >= k:
                break
            if not _held_off(book, lane, now_us):
                add(lane)
    return out


def hold(book: LaneBook, now_us: int, lease_us: int, members: Sequence[str]) -> list[int]:
    out = []
    for member in members:
        lane = member.split(" ", 1)[1]
        if book.closing.get(lane, 0) > now_us:
            out.append(-1)
            continue
        if member not in book.holds:
            LaneBook._add(book.held, lane, 1)
        book.holds[member] = now_us + lease_us
        out.append(book.version.get(lane, 0))
    book.update_active()
    return out


def got(book: LaneBook, now_us: int, lease_us: int, results: Sequence[tuple[str, int, int]]) -> None:
    """``results``: (member, the version ``hold`` gave, mails got; 0 = empty)."""
    for member, version, mails in results:
        lane = member.split(" ", 1)[1]
        if mails == 0:
            book.drop_hold(member)
            if book.version.get(lane, 0) == version:
                book.present.pop(lane, None)
                book.mails.pop(lane, None)
        else:
            if member not in book.holds:
                LaneBook._add(book.held, lane, 1)
            book.holds[member] = now_us + lease_us
            LaneBook._add(book.hold_mails, member, mails)
            LaneBook._add(book.held_mails, lane, mails)
            LaneBook._add(book.mails, lane, -mails)
        book.update_waiting(tenant_of(lane), now_us)
    book.update_active()


def release(book: LaneBook, now_us: int, members: Sequence[tuple[str, bool]]) -> None:
    """(member, requeued): a batch acked, or requeued unacked into its lane by the broker."""
    for member, requeued in members:
        lane = member.split(" ", 1)[1]
        _, left = book.drop_hold(member)
        if requeued:
            LaneBook._add(book.mails, lane, left)
            book.mark_present(lane, now_us)
        book.update_waiting(tenant_of(lane), now_us)
    book.update_active()


def renew(book: LaneBook, now_us: int, lease_us: int, members: Sequence[str]) -> list[int]:
    out = []
    for member in members:
        if member in book.holds:
            book.holds[member] = now_us + lease_us
            out.append(1)
        else:
            out.append(0)
    return out


def hold_off(book: LaneBook, now_us: int, tenant: str, until_us: int) -> None:
    if until_us > now_us:
        book.off[tenant] = until_us
    else:
        book.off.pop(tenant, None)
    book.update_waiting(tenant, now_us)


def lane_off(book: LaneBook, now_us: int, lane: str, until_us: int) -> None:
    if until_us > now_us:
        book.lanes_off[lane] = until_us
    else:
        book.lanes_off.pop(lane, None)
    book.update_waiting(tenant_of(lane), now_us)


def close_begin(book: LaneBook, now_us: int, idle_s: int, lease_us: int, lanes: Sequence[str]) -> list[int]:
    for member in [m for m, until in book.pubs.items() if until <= now_us]:
        del book.pubs[member]
    busy = {member.split(" ", 1)[1] for member in book.pubs}
    out = []
    for lane in lanes:
        last = book.known.get(lane)
        ok = (last is not None and last <= now_us // US - idle_s and lane not in busy
              and book.held.get(lane, 0) == 0 and lane not in book.present and book.closing.get(lane, 0) <= now_us)
        if ok:
            book.closing[lane] = now_us + lease_us
        out.append(1 if ok else 0)
    return out


def close_end(book: LaneBook, now_us: int, lane: str, deleted: bool) -> None:
    book.closing.pop(lane, None)
    if deleted:
        book.generation[lane] = book.generation.get(lane, 0) + 1
        book.version.pop(lane, None)
        book.mails.pop(lane, None)
        book.known.pop(lane, None)
    else:
        book.mark_present(lane, now_us)
        book.update_waiting(tenant_of(lane), now_us)
        book.update_active()


def idle(book: LaneBook, now_us: int, idle_s: int, limit: int) -> list[str]:
    return [lane for lane, last in sorted(book.known.items(), key=lambda item: (item[1], item[0]))
            if last <= now_us // US - idle_s][:limit]
