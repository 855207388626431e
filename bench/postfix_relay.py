"""A Postfix relay on this machine, the yardstick of issue 24: the same mails into the same
smtp-sink through a Postfix 3.x relay, 8 connections in and out.

    python bench/postfix_relay.py [--mails 20000] [--size 2048]   (prints one JSON object)

A private Postfix instance (``postfix -c DIR start``), never the system's: its own
config_directory, queue_directory and data_directory under a temporary directory, smtpd on a
free loopback port, ``relayhost = [127.0.0.1]:<sink port>``, 8 connections to it
(``default_destination_concurrency_limit`` and ``smtp_destination_concurrency_limit``), no
local delivery, no DNS, its log in a file of its own; stopped and removed at the end. Postfix's
master must start as root (it binds its ports and runs its daemons as ``mail_owner``): as
another user the figure is left out and the JSON says why.

Fed by Postfix's ``smtp-source`` (8 sessions, messages over the same connection, a payload of
SIZE bytes, each to its own recipient), timed from the first connection to the moment the
queue is empty, every mail having had its 250 at the sink (the log's ``status=sent`` lines
are counted). Also the CPU of every Postfix process (the master, its live daemons and those it
reaped) and of the feeder, per mail.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from system_cpu import cpu_s

ROOT = Path(__file__).resolve().parents[1]
CONNECTIONS = 8
QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

MAIN_CF = """\
# A private relay for bench/postfix_relay.py: nothing of the system's Postfix is used.
compatibility_level = 3.6
config_directory = {dir}/etc
queue_directory = {dir}/queue
data_directory = {dir}/data
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
daemon_directory = /usr/lib/postfix/sbin
command_directory = /usr/sbin
mail_owner = postfix
setgid_group = postdrop
myhostname = relay.bench.invalid
mydomain = bench.invalid
mydestination =
local_transport = error:local delivery is disabled
relayhost = [127.0.0.1]:{sink_port}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtp_host_lookup = native
default_destination_concurrency_limit = {connections}
smtp_destination_concurrency_limit = {connections}
maillog_file_prefixes = {dir}
maillog_file = {dir}/maillog
"""

# The daemons a relay needs, none chrooted (the temporary directory has no chroot tree).
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def unavailable() -> str | None:
    """Why a private Postfix cannot run here, or None."""
    if os.geteuid() != 0:
        return ("Postfix's master must start as root (it binds its ports and runs its daemons as "
                "mail_owner); this bench runs as another user")
    if shutil.which("postfix", path="/usr/sbin:/usr/bin") is None:
        return "postfix is not installed (scripts/install-tools postfix)"
    if shutil.which("smtp-source", path="/usr/sbin:/usr/bin") is None:
        return "smtp-source (Debian package postfix) is not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _postfix(directory: Path, command: str) -> None:
    # Postfix writes its errors to the terminal only when there is one, to syslog otherwise
    # (absent here): its own log file then says what went wrong.
    result = subprocess.run(["/usr/sbin/postfix", "-c", str(directory / "etc"), command],
                            capture_output=True, text=True)
    if result.returncode != 0:
        log = (directory / "maillog").read_text()[-2000:] if (directory / "maillog").exists() else ""
        raise RuntimeError(f"postfix {command} failed ({result.returncode}): {result.stderr.strip()} {log}")


@contextmanager
def private_postfix(sink_port: int, connections: int = CONNECTIONS) -> Iterator[tuple[int, Path]]:
    """A private Postfix relay into 127.0.0.1:``sink_port``, for the block: yields its smtpd's
    port and its directory."""
    directory = Path(tempfile.mkdtemp(prefix="mailpipe-postfix-"))
    port = free_port()
    try:
        for sub in ("etc", "queue", "data"):
            (directory / sub).mkdir()
        directory.chmod(0o755)  # the daemons (mail_owner) reach the queue through it
        shutil.chown(directory / "data", "postfix", "postfix")
        (directory / "etc" / "main.cf").write_text(MAIN_CF.format(dir=directory, sink_port=sink_port,
                                                                  connections=connections))
        (directory / "etc" / "master.cf").write_text(MASTER_CF.format(port=port))
        _postfix(directory, "start")
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield port, directory
    finally:
        if (directory / "queue" / "pid" / "master.pid").exists():
            _postfix(directory, "stop")
            master = _master_pid(directory)
            deadline = time.monotonic() + 15
            while master and Path(f"/proc/{master}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(directory, ignore_errors=True)


def _master_pid(directory: Path) -> int:
    try:
        return int((directory / "queue" / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def queued(directory: Path) -> int:
    """Queue files not yet delivered (in any of the queues, hashed subdirectories too)."""
    count = 0
    for name in QUEUES:
        for _dirpath, _dirs, files in os.walk(directory / "queue" / name):
            count += len(files)
    return count


def relay_rate(sink_port: int, mails: int = 20_000, size: int = 2048, connections: int = CONNECTIONS,
               timeout_s: float = 600.0) -> dict[str, Any]:
    """Mails per second through a private Postfix relay into the sink, and CPU per mail."""
    why = unavailable()
    if why is not None:
        return {"skipped": why}
    with private_postfix(sink_port, connections) as (port, directory):
        master = _master_pid(directory)
        feeder_cmd = ["smtp-source", "-d", "-N", "-s", str(connections), "-m", str(mails), "-l", str(size),
                      "-f", "news@demo.example", "-t", "reader@example.com", "-S", "Relay mail",
                      "-M", "client.bench.invalid", f"127.0.0.1:{port}"]
        feeder0 = _children_cpu_s()
        cpu0, started = cpu_s([master], reaped=True), time.monotonic()
        feeder = subprocess.run(feeder_cmd, capture_output=True, text=True, timeout=timeout_s)
        feeder_cpu = _children_cpu_s() - feeder0
        fed_s = time.monotonic() - started
        deadline = started + timeout_s
        while queued(directory) and time.monotonic() < deadline:
            time.sleep(0.02)
        seconds = time.monotonic() - started
        cpu = cpu_s([master], reaped=True) - cpu0
        time.sleep(0.5)  # postlogd writes the last lines
        log = (directory / "maillog").read_text()
    sent = log.count("status=sent")
    return {
        "mails": mails, "delivered": sent, "mails_per_s": round(sent / seconds, 1), "seconds": round(seconds, 3),
        "accepted_s": round(fed_s, 3), "postfix_cpu_us_per_mail": round(cpu / max(sent, 1) * 1e6, 1),
        "feeder": " ".join(feeder_cmd[:-1]), "feeder_exit": feeder.returncode,
        "feeder_cpu_us_per_mail": round(feeder_cpu / max(sent, 1) * 1e6, 1),
        "connections": connections, "not_sent_reasons": _not_sent(log),
    }


def _children_cpu_s() -> float:
    """The CPU of our reaped children (the feeder, once run), from getrusage."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _not_sent(log: str) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for line in log.splitlines():
        if "status=" in line and "status=sent" not in line:
            status = line.split("status=", 1)[1].split(" ", 1)[0]
            reasons[status] = reasons.get(status, 0) + 1
    return reasons


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mails", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    sink_bin = shutil.which("smtp-sink", path="/usr/sbin:/usr/bin")
    if sink_bin is None:
        sys.exit("postfix_relay: smtp-sink (Debian package postfix) is not available")
    sink_port = free_port()
    sink = subprocess.Popen([sink_bin, "-u", "nobody", f"127.0.0.1:{sink_port}", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        print(json.dumps(relay_rate(sink_port, args.mails, args.size)))
    finally:
        sink.terminate()
        sink.wait()


if __name__ == "__main__":
    main()
