"""A local cluster for development and the cluster fault tests: three RabbitMQ nodes joined
into one cluster, and Redis as a primary, a replica and three Sentinels, all on loopback.

``mailpipe cluster up|down|status|env`` (or ``scripts/cluster``) runs one in ``.cluster/``;
tests run their own on free ports with ``LocalCluster(tmp_path, rabbit_ports=..., ...)``.

Everything is a child process in its own process group, started from the Debian packages'
binaries with its own node names, ports, data folders and Erlang cookie, so that killing a
member kills exactly that member, and the machine's own RabbitMQ (5672) and Redis (6379) are
never touched. The pids are kept in ``<workdir>/state.json``: ``down`` from another process
stops what ``up`` started, and nothing else (a pid is only signalled while its start time is
still the one recorded, so a pid the kernel has since reused is left alone).

``up`` starts from empty data folders: a development cluster holds nothing worth keeping, and
a cluster whose nodes were all killed would otherwise wait for the node that stopped last.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import redis

from mailpipe.errors import ClusterError, ConfigError

# Debian's RabbitMQ scripts that run the node as the calling user; /usr/sbin's wrappers would
# switch to the rabbitmq user and its cookie, and detach (then the pid is not ours).
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
STATE_FILE = "state.json"
LOOPBACK = "127.0.0.1"
# Erlang's schedulers spin while idle by default: four VMs (the machine's node and ours) on a
# small machine would burn its cores doing nothing. Distribution on loopback only, like the
# machine's node (/etc/rabbitmq/rabbitmq-env.conf, which ours do not read).
ERL_ARGS = "+sbwt none +sbwtdcpu none +sbwtdio none -kernel inet_dist_use_interface {127,0,0,1}"


def default_workdir() -> Path:
    """``$MAILPIPE_CLUSTER_DIR``, else ``.cluster/`` under the current directory."""
    return Path(os.environ.get("MAILPIPE_CLUSTER_DIR") or Path.cwd() / ".cluster")


def rabbitmq_server() -> Path | None:
    binary = RABBIT_BIN / "rabbitmq-server"
    return binary if binary.exists() else None


def missing_binaries() -> list[str]:
    """What ``up`` needs and this machine lacks (empty: nothing)."""
    missing = [] if rabbitmq_server() else [f"{RABBIT_BIN}/rabbitmq-server (Debian package rabbitmq-server)"]
    if shutil.which("redis-server") is None:
        missing.append("redis-server (Debian package redis-server)")
    return missing


# -- processes ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Proc:
    """A process we started: its pid (also its process group) and the kernel's start time of
    that pid, which tells our process from a later one given the same pid."""

    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> Proc:
        return cls(pid, _start_time(pid) or 0)

    def alive(self) -> bool:
        return _start_time(self.pid) == self.started and not _zombie(self.pid)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name, in parentheses, may hold spaces: split after its closing one.
    return stat[stat.rfind(")") + 2:].split()


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


def _processes() -> dict[int, tuple[int, int, int]]:
    """Every live process: pid -> (parent pid, process group, start time)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and fields[0] not in ("Z", "X"):
                table[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[19]))
    return table


def group_tree(pgid: int) -> dict[int, int]:
    """Live processes of process group ``pgid`` and all their descendants, pid -> start time.
    Descendants too: the Erlang VM's helpers (erl_child_setup, inet_gethost) call setsid, so a
    RabbitMQ node is more than its process group."""
    table = _processes()
    found = {pid for pid, (_ppid, pgrp, _start) in table.items() if pgrp == pgid}
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, (ppid, _pgrp, _start) in table.items() if ppid in frontier} - found
        found |= frontier
    return {pid: table[pid][2] for pid in found}


def _still_alive(tree: dict[int, int]) -> list[int]:
    return [pid for pid, started in tree.items() if _start_time(pid) == started and not _zombie(pid)]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    """Poll ``condition`` until it holds; ClusterError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all bound at once, so none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        # As the servers bind: connections of a cluster just stopped, in TIME_WAIT, do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def port_answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.5):
        return True
    return False


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# -- the cluster ----------------------------------------------------------------------------------

class LocalCluster:
    """Three RabbitMQ nodes (``mailpipe-<amqp port>@localhost``) and Redis with Sentinel.

    Indexes of RabbitMQ nodes are 0-based, in the order of ``rabbit_ports`` and ``amqp_urls()``.
    """

    def __init__(self, workdir: Path, *, rabbit_ports: Sequence[int] = (5701, 5702, 5703),
                 redis_ports: Sequence[int] = (6401, 6402), sentinel_ports: Sequence[int] = (26401, 26402, 26403),
                 master: str = "mailpipe", dist_ports: Sequence[int] | None = None,
                 down_after_ms: int = 1500, failover_timeout_ms: int = 6000) -> None:
        self.workdir = Path(workdir).absolute()
        self.rabbit_ports = tuple(rabbit_ports)
        # RabbitMQ's own default: the Erlang distribution port is the AMQP port + 20000.
        self.dist_ports = tuple(dist_ports) if dist_ports is not None else tuple(p + 20000 for p in rabbit_ports)
        self.redis_ports = tuple(redis_ports)
        self.sentinel_ports = tuple(sentinel_ports)
        self.master = master
        # Short, so that a failover takes a few seconds; not so short that a busy machine's
        # late PING reply starts one.
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self._validate()
        self.home = self.workdir / "home"  # HOME of every node and rabbitmqctl: the shared cookie
        self._children: dict[str, subprocess.Popen[bytes]] = {}  # what this process started
        self._procs: dict[str, Proc] = {}
        self._load_procs()

    def _validate(self) -> None:
        ports = [*self.rabbit_ports, *self.dist_ports, *self.redis_ports, *self.sentinel_ports]
        if len(set(ports)) != len(ports):
            raise ConfigError(f"cluster ports must all differ: {ports}")
        if bad := [p for p in ports if not 1024 <= p <= 65535]:
            raise ConfigError(f"cluster ports must be in 1024..65535: {bad} (dist_ports default to AMQP + 20000)")
        if len(self.dist_ports) != len(self.rabbit_ports) or not self.rabbit_ports:
            raise ConfigError("give one Erlang distribution port per RabbitMQ node")
        if len(self.redis_ports) < 2 or len(self.sentinel_ports) < 1:
            raise ConfigError("the cluster needs a Redis primary, a replica and a Sentinel at least")
        if not self.master.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"master name {self.master!r}: letters, digits, - and _ only")

    @classmethod
    def from_workdir(cls, workdir: Path | None = None) -> LocalCluster:
        """The cluster recorded in ``workdir`` (its ports), or a default one if none is."""
        workdir = workdir or default_workdir()
        try:
            state = json.loads((workdir / STATE_FILE).read_text())
        except FileNotFoundError:
            return cls(workdir)
        except (OSError, ValueError) as exc:
            raise ClusterError(f"{workdir / STATE_FILE} is unreadable: {exc}") from exc
        return cls(workdir, rabbit_ports=state["rabbit_ports"], dist_ports=state["dist_ports"],
                   redis_ports=state["redis_ports"], sentinel_ports=state["sentinel_ports"],
                   master=state["master"], down_after_ms=state["down_after_ms"],
                   failover_timeout_ms=state["failover_timeout_ms"])

    # -- names and addresses

    def rabbit_node(self, i: int) -> str:
        # Named by its AMQP port: unique on this machine, so clusters on other ports never clash.
        return f"mailpipe-{self.rabbit_ports[i]}@localhost"

    def amqp_urls(self) -> list[str]:
        # guest may log in over loopback (RabbitMQ's loopback_users default).
        return [f"amqp://guest:guest@{LOOPBACK}:{p}/" for p in self.rabbit_ports]

    def sentinels(self) -> list[tuple[str, int]]:
        return [(LOOPBACK, p) for p in self.sentinel_ports]

    def env(self) -> dict[str, str]:
        """Settings that point the stages at this cluster. MAILPIPE_AMQP_URL and MAILPIPE_REDIS_URL
        are set too (the first node, the primary now), so that nothing falls back to the machine's
        own RabbitMQ and Redis by default; with Sentinel the Redis URL gives only the database."""
        try:
            primary = self.redis_primary()
        except ClusterError:
            primary = self.redis_ports[0]
        return {
            "MAILPIPE_AMQP_URLS": ",".join(self.amqp_urls()),
            "MAILPIPE_AMQP_URL": self.amqp_urls()[0],
            "MAILPIPE_REDIS_SENTINELS": ",".join(f"{h}:{p}" for h, p in self.sentinels()),
            "MAILPIPE_REDIS_MASTER": self.master,
            "MAILPIPE_REDIS_URL": f"redis://{LOOPBACK}:{primary}/0",
            "MAILPIPE_QUORUM_GROUP_SIZE": str(len(self.rabbit_ports)),
            "MAILPIPE_REDIS_WAIT_REPLICAS": "1",
        }

    def _name(self, kind: str, port: int) -> str:
        return f"{kind}-{port}"

    def _rabbit_dir(self, i: int) -> Path:
        return self.workdir / f"rabbit-{self.rabbit_ports[i]}"

    def _redis_dir(self, port: int) -> Path:
        return self.workdir / f"redis-{port}"

    def _sentinel_dir(self, port: int) -> Path:
        return self.workdir / f"sentinel-{port}"

    # -- state

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One ``up`` or ``down`` at a time on a workdir, whichever process runs it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load_procs(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
            state = json.loads((self.workdir / STATE_FILE).read_text())
            self._procs = {name: Proc(int(p["pid"]), int(p["started"])) for name, p in state["procs"].items()}

    def _save(self) -> None:
        state = {"rabbit_ports": self.rabbit_ports, "dist_ports": self.dist_ports,
                 "redis_ports": self.redis_ports, "sentinel_ports": self.sentinel_ports,
                 "master": self.master, "down_after_ms": self.down_after_ms,
                 "failover_timeout_ms": self.failover_timeout_ms,
                 "procs": {n: {"pid": p.pid, "started": p.started} for n, p in self._procs.items()}}
        tmp = self.workdir / f"{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.workdir / STATE_FILE)  # a reader never sees half a file

    def _all_names(self) -> list[str]:
        return ([self._name("rabbit", p) for p in self.rabbit_ports]
                + [self._name("redis", p) for p in self.redis_ports]
                + [self._name("sentinel", p) for p in self.sentinel_ports])

    def alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.alive()

    def pids(self) -> list[int]:
        """Every live process of every process group this cluster started."""
        return sorted(pid for p in self._procs.values() if p.alive() for pid in group_tree(p.pid))

    # -- starting and stopping processes

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None, log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:  # the child keeps its own copy of the descriptor
            child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._children[name] = child
        self._procs[name] = Proc.of(child.pid)
        self._save()

    def _kill(self, name: str) -> None:
        """kill -9 the process group ``name`` started, and wait until it is gone."""
        proc = self._procs.pop(name, None)
        child = self._children.pop(name, None)
        # Only while its leader is the process we started: once it is gone, the group's number
        # may be some other program's.
        if proc is not None and proc.alive():
            tree = group_tree(proc.pid)  # before the kill: orphans are the init process's children
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for pid in _still_alive(tree):  # those in sessions of their own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not _still_alive(tree), 30, f"{name} to exit", 0.05)
        if child is not None:
            child.wait(30)  # reap it: our own child would stay a zombie otherwise
        self._save()

    # -- up and down

    def running(self) -> bool:
        """Every member's process is alive (not: answering)."""
        return all(self.alive(n) for n in self._all_names())

    def up(self, timeout_s: float = 180.0, say: Callable[[str], None] | None = None) -> bool:
        """Start the cluster and wait until it works; False (and nothing done) if it runs already.
        On a failure everything started is killed and ClusterError says what did not come up."""
        report = say or (lambda _msg: None)
        with self._locked():
            self._load_procs()
            live = [n for n in self._all_names() if self.alive(n)]
            if live and len(live) == len(self._all_names()):
                return False
            if live:
                raise ClusterError(f"the cluster in {self.workdir} runs in part ({', '.join(live)} alive): "
                                   "run `mailpipe cluster down` first")
            if missing := missing_binaries():
                raise ConfigError(f"not installed: {', '.join(missing)}")
            ports = [*self.rabbit_ports, *self.dist_ports, *self.redis_ports, *self.sentinel_ports]
            if busy := [p for p in ports if not port_free(p)]:
                raise ConfigError(f"ports in use on {LOOPBACK}: {busy}")
            self._procs = {}
            report(f"starting in {self.workdir}")
            try:
                self._up(timeout_s, report)
            except BaseException:
                self._down()
                raise
        return True

    def _up(self, timeout_s: float, report: Callable[[str], None]) -> None:
        deadline = time.monotonic() + timeout_s

        def left() -> float:
            return max(1.0, deadline - time.monotonic())

        self._prepare()
        # The nodes boot in parallel (the slow part), Redis meanwhile.
        for i in range(len(self.rabbit_ports)):
            self._start_rabbit(i)
        primary, *replicas = self.redis_ports
        self._start_redis(primary, None)
        for port in replicas:
            self._start_redis(port, primary)
        for port in replicas:
            self._wait_replica(port, primary, left())
        for port in self.sentinel_ports:
            self._start_sentinel(port, primary)
        for i in range(len(self.rabbit_ports)):
            self._wait_rabbit_ready(i, left())
        report(f"{len(self.rabbit_ports)} RabbitMQ nodes answer; joining them")
        for i in range(1, len(self.rabbit_ports)):
            for action in (["stop_app"], ["reset"], ["join_cluster", self.rabbit_node(0)], ["start_app"]):
                self.ctl(i, *action, timeout_s=left())
        wait_for(lambda: len(self.running_nodes(0)) == len(self.rabbit_ports), left(),
                 f"{len(self.rabbit_ports)} running nodes in cluster_status")
        report("RabbitMQ cluster formed; waiting for the Sentinels")
        wait_for(lambda: self._sentinels_agree(primary), left(),
                 f"the Sentinels to agree on Redis {primary} and see its replicas and each other")

    def _prepare(self) -> None:
        """Fresh data folders, the shared cookie, no plugins."""
        for path in [*(self._rabbit_dir(i) for i in range(len(self.rabbit_ports))),
                     *(self._redis_dir(p) for p in self.redis_ports),
                     *(self._sentinel_dir(p) for p in self.sentinel_ports)]:
            shutil.rmtree(path, ignore_errors=True)
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            # Erlang refuses a cookie file others can read; every node and rabbitmqctl run with
            # this HOME, so they share it (and not the machine's node's, in /var/lib/rabbitmq).
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as out:
                out.write("".join(secrets.choice(string.ascii_uppercase) for _ in range(32)))
        (self.home / "enabled_plugins").write_text("[].\n")
        # Read instead of /etc/rabbitmq/rabbitmq-env.conf, which names the machine's node.
        (self.home / "rabbitmq-env.conf").write_text("# mailpipe's local cluster: settings come from the environment\n")

    def down(self) -> list[str]:
        """kill -9 every process the cluster started (recorded in the workdir, whichever process
        started it); returns their names. Data folders are left as they are."""
        with self._locked():
            self._load_procs()
            return self._down()

    def _down(self) -> list[str]:
        names = [n for n in self._procs if self.alive(n)]
        for name in list(self._procs):
            self._kill(name)
        return names

    # -- RabbitMQ

    def rabbit_env(self, i: int) -> dict[str, str]:
        """The environment of node ``i`` and of ``rabbitmqctl`` calls to it."""
        # Nothing of the caller's RabbitMQ or Erlang settings leaks in (a RABBITMQ_NODENAME
        # exported in a shell would rename our node).
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        folder = self._rabbit_dir(i)
        return {**base, "HOME": str(self.home),
                "RABBITMQ_NODENAME": self.rabbit_node(i),
                "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
                "RABBITMQ_NODE_PORT": str(self.rabbit_ports[i]),
                "RABBITMQ_DIST_PORT": str(self.dist_ports[i]),
                "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
                "RABBITMQ_LOG_BASE": str(folder / "log"),
                "RABBITMQ_PID_FILE": str(folder / "node.pid"),
                "RABBITMQ_CONF_ENV_FILE": str(self.home / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": ERL_ARGS}

    def _start_rabbit(self, i: int) -> None:
        folder = self._rabbit_dir(i)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.local = {LOOPBACK}:{self.rabbit_ports[i]}\n")
        server = rabbitmq_server()
        if server is None:
            raise ConfigError(f"{RABBIT_BIN}/rabbitmq-server is not installed")
        self._spawn(self._name("rabbit", self.rabbit_ports[i]), [str(server)], self.rabbit_env(i),
                    folder / "console.log")

    def _amqp_ready(self, i: int) -> bool:
        """The port opens before the node accepts logins: try a real one."""
        try:
            pika.BlockingConnection(pika.URLParameters(self.amqp_urls()[i] + "?connection_attempts=1")).close()
        except (pika.exceptions.AMQPError, OSError):
            return False
        return True

    def _wait_rabbit_ready(self, i: int, timeout_s: float) -> None:
        name = self._name("rabbit", self.rabbit_ports[i])

        def ready() -> bool:
            if not self.alive(name):
                raise ClusterError(f"RabbitMQ node {self.rabbit_node(i)} exited while starting:\n"
                                   f"{_tail(self._rabbit_dir(i) / 'console.log')}")
            return port_answers(self.rabbit_ports[i]) and self._amqp_ready(i)

        wait_for(ready, timeout_s, f"RabbitMQ node {self.rabbit_node(i)} to accept AMQP logins", 0.25)

    def ctl(self, i: int, *args: str, timeout_s: float = 60.0) -> str:
        """``rabbitmqctl -n <node i> args...``; its standard output, or ClusterError."""
        argv = [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.rabbit_node(i), *args]
        try:
            out = subprocess.run(argv, env=self.rabbit_env(i), capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"rabbitmqctl {' '.join(args)} on {self.rabbit_node(i)}: no answer in "
                               f"{timeout_s:.0f} s") from exc
        if out.returncode != 0:
            raise ClusterError(f"rabbitmqctl {' '.join(args)} on {self.rabbit_node(i)} failed "
                               f"({out.returncode}): {(out.stderr or out.stdout).strip()[-800:]}")
        return out.stdout

    def cluster_status(self, i: int = 0) -> dict[str, Any]:
        """``rabbitmqctl cluster_status`` as node ``i`` sees it (JSON)."""
        status: dict[str, Any] = json.loads(self.ctl(i, "cluster_status", "--formatter", "json", timeout_s=30))
        return status

    def running_nodes(self, i: int = 0) -> list[str]:
        """The cluster's running nodes as node ``i`` sees them; [] while it does not answer."""
        try:
            return list(self.cluster_status(i).get("running_nodes", []))
        except (ClusterError, ValueError):
            return []

    def kill_rabbit(self, i: int) -> None:
        """kill -9 node ``i`` (the shell, the Erlang VM and its helpers: its process group)."""
        self._kill(self._name("rabbit", self.rabbit_ports[i]))

    def stop_rabbit(self, i: int, timeout_s: float = 60.0) -> None:
        """Stop node ``i`` cleanly (``rabbitmqctl stop``); it stays a member of the cluster."""
        name = self._name("rabbit", self.rabbit_ports[i])
        if not self.alive(name):
            raise ClusterError(f"RabbitMQ node {self.rabbit_node(i)} is not running")
        tree = group_tree(self._procs[name].pid)
        self.ctl(i, "stop", timeout_s=timeout_s)
        wait_for(lambda: not _still_alive(tree), timeout_s, f"{self.rabbit_node(i)} to exit")
        self._kill(name)  # reaps it, and forgets its pid

    def start_rabbit(self, i: int, timeout_s: float = 120.0) -> None:
        """Start node ``i`` again (after ``kill_rabbit`` or ``stop_rabbit``) and wait until it
        runs in the cluster again. Its data folder says which cluster it belongs to."""
        name = self._name("rabbit", self.rabbit_ports[i])
        if self.alive(name):
            raise ClusterError(f"RabbitMQ node {self.rabbit_node(i)} is running already")
        deadline = time.monotonic() + timeout_s
        self._start_rabbit(i)
        self._wait_rabbit_ready(i, timeout_s)
        wait_for(lambda: self.rabbit_node(i) in self.running_nodes(i), max(1.0, deadline - time.monotonic()),
                 f"{self.rabbit_node(i)} to run in the cluster again")

    # -- Redis and Sentinel

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=port, socket_timeout=2, socket_connect_timeout=1)

    def _query(self, port: int, *command: str) -> Any:
        """One command to the Redis or Sentinel at ``port``; None if it does not answer."""
        client = self._client(port)
        try:
            return client.execute_command(*command)  # type: ignore[no-untyped-call]
        except (redis.RedisError, OSError):
            return None
        finally:
            client.close()

    def _start_redis(self, port: int, replica_of: int | None) -> None:
        folder = self._redis_dir(port)
        folder.mkdir(parents=True, exist_ok=True)
        argv = [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", LOOPBACK,
                "--save", "", "--appendonly", "no", "--dir", str(folder),
                # What the primary reports to the Sentinels for this replica: its loopback address.
                "--replica-announce-ip", LOOPBACK,
                # A primary waits 5 s by default for more replicas before a diskless full sync;
                # ours has one, and a replica restarted after a failover should sync at once.
                "--repl-diskless-sync-delay", "0"]
        if replica_of is not None:
            argv += ["--replicaof", LOOPBACK, str(replica_of)]
        self._spawn(self._name("redis", port), argv, None, folder / "redis.log")
        wait_for(lambda: self._query(port, "PING") is not None, 30, f"Redis {port} to answer")

    def _start_sentinel(self, port: int, primary: int) -> None:
        folder = self._sentinel_dir(port)
        folder.mkdir(parents=True, exist_ok=True)
        # Written afresh on every start: a Sentinel rewrites its file with what it learnt.
        conf = folder / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind {LOOPBACK}\ndir {folder}\n"
            f"sentinel announce-ip {LOOPBACK}\nsentinel announce-port {port}\n"
            f"sentinel monitor {self.master} {LOOPBACK} {primary} {len(self.sentinel_ports) // 2 + 1}\n"
            f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.master} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.master} 1\n")
        argv = [shutil.which("redis-server") or "redis-server", str(conf), "--sentinel"]
        self._spawn(self._name("sentinel", port), argv, None, folder / "sentinel.log")
        wait_for(lambda: self._query(port, "PING") is not None, 30, f"Sentinel {port} to answer")

    def _info(self, port: int) -> dict[str, str]:
        raw = self._query(port, "INFO", "replication")
        if raw is None:
            return {}
        if isinstance(raw, dict):  # redis-py parses INFO into a dict
            return {str(k): str(v) for k, v in raw.items()}
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def redis_role(self, port: int) -> str | None:
        """Redis ``port``'s role ("master" or "slave"); None if it does not answer."""
        return self._info(port).get("role")

    def _wait_replica(self, port: int, primary: int, timeout_s: float) -> None:
        def linked() -> bool:
            info = self._info(port)
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        wait_for(linked, timeout_s, f"Redis {port} to replicate Redis {primary}")

    def sentinel_primary(self, sentinel_port: int) -> int | None:
        """The primary's port as one Sentinel names it; None if it does not answer."""
        reply = self._query(sentinel_port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master)
        if not reply or len(reply) != 2:
            return None
        return int(reply[1])

    def _sentinel_table(self, sentinel_port: int, what: str) -> list[dict[str, str]]:
        """``SENTINEL REPLICAS|SENTINELS <master>`` as dicts of strings."""
        reply = self._query(sentinel_port, "SENTINEL", what, self.master) or []
        rows = []
        for flat in reply:
            items = [x.decode() if isinstance(x, bytes) else str(x) for x in flat]
            rows.append(dict(zip(items[::2], items[1::2], strict=False)))
        return rows

    def _sentinels_agree(self, primary: int) -> bool:
        """Every Sentinel names ``primary``, sees every replica up and knows every other Sentinel:
        only then can a failover find its quorum and a replica to promote."""
        replicas = {str(p) for p in self.redis_ports if p != primary}
        for port in self.sentinel_ports:
            if self.sentinel_primary(port) != primary:
                return False
            seen = {r.get("port") for r in self._sentinel_table(port, "REPLICAS")
                    if "down" not in r.get("flags", "") and "disconnected" not in r.get("flags", "")}
            if not replicas <= seen:
                return False
            if len(self._sentinel_table(port, "SENTINELS")) < len(self.sentinel_ports) - 1:
                return False
        return True

    def redis_primary(self) -> int:
        """The port a majority of the Sentinels name as primary now; ClusterError if none has one
        (they do not answer, or disagree in the middle of a failover)."""
        named = Counter(p for p in (self.sentinel_primary(s) for s in self.sentinel_ports) if p is not None)
        if named:
            port, votes = named.most_common(1)[0]
            if votes > len(self.sentinel_ports) // 2:
                return port
        raise ClusterError(f"no majority of the Sentinels names a primary for {self.master}: {dict(named)}")

    def kill_redis_primary(self) -> int:
        """kill -9 the Redis the Sentinels name as primary; returns its port."""
        port = self.redis_primary()
        self._kill(self._name("redis", port))
        return port

    def kill_redis(self, port: int) -> None:
        """kill -9 the Redis on ``port``."""
        self._kill(self._name("redis", port))

    def wait_for_new_primary(self, old_port: int, timeout_s: float = 30.0) -> int:
        """Wait until the Sentinels name a primary other than ``old_port`` and it says it is one;
        returns its port."""
        found: list[int] = []

        def promoted() -> bool:
            try:
                port = self.redis_primary()
            except ClusterError:
                return False
            if port != old_port and self.redis_role(port) == "master":
                found.append(port)
                return True
            return False

        wait_for(promoted, timeout_s, f"the Sentinels to promote a replica of Redis {old_port}", 0.1)
        return found[0]

    def start_redis(self, port: int, timeout_s: float = 30.0) -> None:
        """Start the (killed) Redis on ``port`` again, as a replica of the current primary, and
        wait until it replicates."""
        if port not in self.redis_ports:
            raise ClusterError(f"{port} is not one of the cluster's Redis ports {self.redis_ports}")
        if self.alive(self._name("redis", port)):
            raise ClusterError(f"Redis {port} is running already")
        primary = self.redis_primary()
        if primary == port:
            raise ClusterError(f"the Sentinels still name Redis {port} primary: wait_for_new_primary first")
        self._start_redis(port, primary)
        self._wait_replica(port, primary, timeout_s)

    # -- status

    def status(self) -> dict[str, Any]:
        """What runs and what it says, for ``mailpipe cluster status``."""
        self._load_procs()
        rabbits = []
        running: list[str] = []
        for i, port in enumerate(self.rabbit_ports):
            name = self._name("rabbit", port)
            alive = self.alive(name)
            if alive and not running:
                running = self.running_nodes(i)
            rabbits.append({"node": self.rabbit_node(i), "amqp_port": port, "alive": alive,
                            "pid": self._procs[name].pid if alive else None})
        for row in rabbits:
            row["running"] = row["node"] in running
        redises = [{"port": p, "alive": self.alive(self._name("redis", p)), "role": self.redis_role(p),
                    "pid": self._procs[self._name("redis", p)].pid if self.alive(self._name("redis", p)) else None}
                   for p in self.redis_ports]
        sentinels = [{"port": p, "alive": self.alive(self._name("sentinel", p)), "primary": self.sentinel_primary(p),
                      "pid": self._procs[self._name("sentinel", p)].pid if self.alive(self._name("sentinel", p))
                      else None} for p in self.sentinel_ports]
        try:
            primary: int | None = self.redis_primary()
        except ClusterError:
            primary = None
        return {"workdir": str(self.workdir), "running": self.running(), "rabbitmq": rabbits,
                "running_nodes": running, "redis": redises, "sentinels": sentinels, "redis_primary": primary,
                "master": self.master}


# -- the command line -----------------------------------------------------------------------------

def _print_status(status: dict[str, Any]) -> None:
    print(f"cluster in {status['workdir']}: {'running' if status['running'] else 'not (fully) running'}")
    for row in status["rabbitmq"]:
        state = "running in cluster" if row["running"] else ("process alive" if row["alive"] else "down")
        print(f"  rabbitmq  {row['node']:28} amqp {row['amqp_port']:<6} pid {row['pid'] or '-':<8} {state}")
    for row in status["redis"]:
        state = row["role"] or ("not answering" if row["alive"] else "down")
        print(f"  redis     port {row['port']:<6} pid {row['pid'] or '-':<8} {state}")
    for row in status["sentinels"]:
        state = f"primary {row['primary']}" if row["primary"] else ("not answering" if row["alive"] else "down")
        print(f"  sentinel  port {row['port']:<6} pid {row['pid'] or '-':<8} {state}")


def command(action: str, *, as_json: bool = False) -> int:
    """``mailpipe cluster up|down|status|env`` on ``default_workdir()``."""
    cluster = LocalCluster.from_workdir(default_workdir())
    if action == "up":
        started = time.monotonic()

        def say(msg: str) -> None:
            print(f"cluster: {msg}", file=sys.stderr, flush=True)

        if not cluster.up(say=say):
            print(f"cluster: already running in {cluster.workdir} (mailpipe cluster status)")
            return 0
        print(f"cluster: up in {time.monotonic() - started:.1f} s; point the stages at it with "
              f'eval "$(mailpipe cluster env)"')
        return 0
    if action == "down":
        stopped = cluster.down()
        print(f"cluster: stopped {len(stopped)} process group(s)" + (f": {', '.join(stopped)}" if stopped else ""))
        return 0
    if action == "status":
        status = cluster.status()
        if as_json:
            print(json.dumps(status, indent=2))
        else:
            _print_status(status)
        return 0 if status["running"] else 1
    if not cluster.running():
        raise ClusterError(f"no cluster runs in {cluster.workdir}: start one with `mailpipe cluster up`")
    for key, value in cluster.env().items():
        print(f"export {key}={shlex.quote(value)}")
    return 0
