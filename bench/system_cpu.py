"""CPU of whole processes from /proc (Linux), for the benchmarks' CPU per mail of the system:
the stages, the machine's RabbitMQ and Redis (found by the port they listen on), the publishing
process. Imported by the benchmarks; not a benchmark itself.

A process's CPU is its user + system time (``/proc/PID/stat``, every thread), and that of its
descendants alive at the time (RabbitMQ's ``erl_child_setup``, say); children it has reaped
count through its ``cutime``/``cstime`` (Postfix's master reaps its daemons)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Times:
    """One process's CPU seconds: its own (every thread), user and system, and its reaped
    children's."""

    user_s: float
    sys_s: float
    reaped_s: float

    @property
    def own_s(self) -> float:
        return self.user_s + self.sys_s


def times(pid: int) -> Times | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the ")": state is fields[0], so utime (field 14) is fields[11], cstime (17) fields[14].
    return Times(int(fields[11]) * TICK_S, int(fields[12]) * TICK_S, (int(fields[13]) + int(fields[14])) * TICK_S)


def children_of() -> dict[int, list[int]]:
    """Every process's children, by parent pid."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def with_descendants(pids: Iterable[int], tree: dict[int, list[int]] | None = None) -> list[int]:
    tree = children_of() if tree is None else tree
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += tree.get(pid, [])
    return found


def cpu_s(pids: Iterable[int], reaped: bool = False) -> float:
    """The CPU seconds of these processes and their live descendants, now; with ``reaped``,
    their reaped children's too."""
    total = 0.0
    for pid in with_descendants(pids):
        t = times(pid)
        if t is not None:
            total += t.own_s + (t.reaped_s if reaped else 0.0)
    return total


def sys_s(pids: Iterable[int]) -> float:
    """The system (kernel) part of ``cpu_s``: system calls, socket I/O above all."""
    return sum(t.sys_s for pid in with_descendants(pids) if (t := times(pid)) is not None)


def listening_pids(port: int) -> list[int]:
    """The processes with a socket listening on TCP ``port`` (any address, IPv4 or IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local address "0100007F:14EB", state 0A is LISTEN
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:
            continue
        if any(link.startswith("socket:[") and link[8:-1] in inodes for link in links):
            pids.append(int(entry.name))
    return pids


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
