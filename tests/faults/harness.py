"""What the fault tests share: stage processes that can be killed and restarted one by one, an
SMTP peer that remembers which connection carried each accepted mail, private RabbitMQ and
Redis servers a test may stop at will, and the ledger run at the end of every test.

The shared RabbitMQ and Redis are never stopped: a test that takes a service away starts its
own on another port and kills only that one (by the pid it started).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import pika
import pika.exceptions
import pytest
import redis
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailpipe.amqp import Broker
from mailpipe.dead import contents
from mailpipe.model import IntakeRequest, new_id, now_ms
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from producer import Producer
from tests.faults.checker import Dead, claim_held
from tests.faults.ledger import Acceptance, Cut, Report, job_id_of, read_dead, reconcile
from tests.smtp_peer import SmtpPeer, _Handler, _PeerSMTP
from tests.stages import settings_env

ALL_STAGES = ("producer", "packer", "limiter", "sender")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        time.sleep(0.1)
    return False


# -- the SMTP peer ------------------------------------------------------------------------------

class _LedgerHandler(_Handler):
    peer: LedgerPeer

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        if reply.startswith("250"):
            job = job_id_of(envelope.original_content or b"")
            port = session.peer[1] if isinstance(session.peer, tuple) else 0
            if job is not None:
                self.peer.record_acceptance(Acceptance(job, tuple(envelope.rcpt_tos), time.time(), port))
        return reply


class LedgerPeer(SmtpPeer):
    """The test peer, also noting for each accepted mail the client port it came from. With
    ``tarpit_s`` set, it holds every 354 (DATA's go-ahead) that long, as a tarpitting server does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accepted: list[Acceptance] = []
        self.tarpit_s = 0.0
        self.tarpitted = 0  # 354s held so far

    def _make_smtp(self, authenticator: Any) -> _PeerSMTP:
        smtp = super()._make_smtp(authenticator)
        # aiosmtpd binds the handler's hooks when the session is made: rebind DATA's.
        smtp.event_handler = _LedgerHandler(self)
        smtp._handle_hooks["DATA"] = smtp.event_handler.handle_DATA
        push = smtp.push

        async def tarpit(status: str) -> None:
            hold_s = self.tarpit_s
            if hold_s > 0 and status.startswith("354"):
                with self._lock:
                    self.tarpitted += 1
                await asyncio.sleep(hold_s)
            await push(status)

        smtp.push = tarpit  # type: ignore[method-assign]  # aiosmtpd's DATA calls self.push("354 ...")
        return smtp

    def __enter__(self) -> LedgerPeer:
        self.start()
        return self

    def record_acceptance(self, acceptance: Acceptance) -> None:
        with self._lock:
            self.accepted.append(acceptance)

    def accepted_jobs(self) -> set[str]:
        with self._lock:
            return {a.job_id for a in self.accepted}


# -- stage processes ----------------------------------------------------------------------------

def tcp_client_ports(pid: int, remote_port: int) -> list[int]:
    """Local ports of the TCP connections process ``pid`` holds to 127.0.0.1:``remote_port``."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = []
    with contextlib.suppress(OSError), open(f"/proc/{pid}/net/tcp") as table:
        next(table)
        for line in table:
            cols = line.split()
            local, remote, inode = cols[1], cols[2], cols[9]
            if inode in inodes and int(remote.split(":")[1], 16) == remote_port:
                ports.append(int(local.split(":")[1], 16))
    return ports


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class Pipeline:
    """``with Pipeline(settings, log_dir, replicas=2) as p:`` runs each stage as ``python -m
    mailpipe run STAGE`` processes named ``<stage>-<n>``; any one can be killed, stopped or
    restarted. Logs of every incarnation are appended to ``<log_dir>/<name>.log``."""

    def __init__(self, settings: Settings, log_dir: Path, stages: Iterable[str] = ALL_STAGES,
                 replicas: int = 1, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.names = [f"{s}-{r}" for s in stages for r in range(replicas)]
        self.env = {**settings_env(settings), **(env or {})}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.exits: dict[str, list[int]] = {}  # every exit code each replica returned

    def __enter__(self) -> Pipeline:
        broker = Broker(self.settings.amqp_url, client_name="fault-tests").connect()
        Topology.from_settings(self.settings).declare(broker.channel())
        broker.close()
        for name in self.names:
            self.start(name)
        return self

    def __exit__(self, *_exc: object) -> None:
        for name in self.procs:
            self.signal(name, signal.SIGTERM)
        for name in self.procs:
            self.wait(name, 30)

    def start(self, name: str) -> None:
        stage = name.rsplit("-", 1)[0]
        with (self.log_dir / f"{name}.log").open("ab") as log:  # the child keeps its own copy
            self.procs[name] = subprocess.Popen([sys.executable, "-m", "mailpipe", "run", stage],
                                                env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def signal(self, name: str, signum: int) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signum)

    def wait(self, name: str, timeout_s: float) -> int:
        proc = self.procs[name]
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            self.exits.setdefault(name, []).append(-999)  # did not stop in time
            return -999
        self.exits.setdefault(name, []).append(code)
        return code

    def kill(self, name: str, smtp_port: int = 0) -> list[Cut]:
        """kill -9 ``name``. Frozen first (SIGSTOP), so that the SMTP connections it holds, which
        the kill cuts, are known exactly: they explain a mail accepted but never marked sent."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.02)  # the stop is delivered asynchronously
        ports = tcp_client_ports(proc.pid, smtp_port) if smtp_port else []
        at = time.time()
        proc.kill()
        proc.wait()
        self.exits.setdefault(name, []).append(proc.returncode)
        return [Cut(p, at, f"{name} killed") for p in ports]

    def terminate(self, name: str, timeout_s: float | None = None) -> int:
        self.signal(name, signal.SIGTERM)
        return self.wait(name, timeout_s if timeout_s is not None else self.settings.shutdown_timeout_s + 5)

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.log_dir.glob("*.log")))


def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of a stage's HTTP ``path`` (/metrics, /readyz); (0, "") when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def stage_gauge(port: int, stage: str, name: str) -> float | None:
    """The stage's ``name`` on its /metrics; None when it is not there."""
    _, text = http_get(port, "/metrics")
    for line in text.splitlines():
        if line.startswith(f'{name}{{stage="{stage}"}}'):
            return float(line.split()[-1])
    return None


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, pipeline: Pipeline | None = None,
               expect_dead: Iterable[str] = ()) -> None:
    """Poll ``condition``; fail with the logs on timeout or when a stage died unasked."""
    deadline = time.monotonic() + timeout_s
    allowed = set(expect_dead)
    while not condition():
        logs = pipeline.logs() if pipeline else ""
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{logs}")
        if pipeline is not None:
            died = [n for n in pipeline.dead() if n not in allowed]
            if died:
                pytest.fail(f"{died} died while waiting for {what}\n{logs}")
        time.sleep(0.1)


# -- mails and the ledger ------------------------------------------------------------------------

def write_servers(settings: Settings, port: int, *, extra: str = "", server: str = "") -> None:
    Path(settings.servers_file).write_text(
        server or f'[servers.tenant-smtp]\naddress = "[127.0.0.1]:{port}"\ntls = "none"\nunlimited = true\n'
        f'{extra}\n[tenants.acme]\nserver = "tenant-smtp"\ndaily_limit = 1000000\n', encoding="utf-8")


def mails(n: int, *, tenant: str = "acme", body: str = "Hello from the fault tests.\n") -> list[IntakeRequest]:
    return [IntakeRequest(id=new_id(), tenant=tenant, sender="hr@acme.example", created_ms=now_ms(),
                          to=(f"user{i}@example.com",), subject=f"Mail {i}", text=body) for i in range(n)]


def publish(settings: Settings, requests: list[IntakeRequest], chunk: int = 250) -> list[str]:
    """Publish through the client library; returns the ids whose confirm arrived."""
    ids: list[str] = []
    with Producer(settings.amqp_url, settings.namespace) as producer:
        for i in range(0, len(requests), chunk):
            ids += producer.publish_requests(requests[i:i + chunk])
    return ids


def ledger(settings: Settings, peer: LedgerPeer, published: Iterable[str], cuts: Iterable[Cut] = ()) -> Report:
    with peer._lock:
        accepted = list(peer.accepted)
    return reconcile(published, accepted, read_dead(settings.amqp_url, settings.namespace), cuts)


def in_flight(settings: Settings, client: redis.Redis, rabbit: PrivateRabbit | None = None) -> str:
    """What is still in flight in the namespace, "" when nothing: a queue not empty, ready or
    unacked (the dead letters aside; what a stage holds is unacked in its input queue), or a
    claim held in Redis."""
    depths = queue_depths(settings.namespace, rabbit)
    if depths is None:
        return "RabbitMQ does not answer"
    dead = Topology(settings.namespace).dead
    busy = {q: d for q, d in depths.items() if q != dead and d != (0, 0)}
    try:
        claims = held_claims(client, settings.namespace)
    except redis.RedisError as exc:
        return f"Redis: {exc}"
    return f"queues (ready, unacked) {busy}, {claims} claims held" if busy or claims else ""


def settle(peer: LedgerPeer, published: list[str], timeout_s: float, pipeline: Pipeline, *,
                   rabbit: PrivateRabbit | None = None, expect_dead: Iterable[str] = ()) -> None:
    """Wait until every published job reached the peer, then until the run has drained: nothing in
    flight (see ``in_flight``), seen twice in a row. Only then can no further copy of a mail reach
    the peer, so the ledger read after it is final (a fixed pause only made that likely)."""
    wanted = set(published)
    wait_until(lambda: wanted <= peer.accepted_jobs(), timeout_s,
               f"{len(wanted)} mails at the SMTP peer", pipeline, expect_dead)
    allowed = set(expect_dead)
    client = redis.Redis.from_url(pipeline.settings.redis_url, socket_timeout=5)
    deadline = time.monotonic() + timeout_s
    in_a_row, why = 0, ""
    try:
        while in_a_row < 2:
            if time.monotonic() > deadline:
                pytest.fail(f"not drained {timeout_s} s after the last mail reached the peer: {why}\n"
                            f"{pipeline.logs()}")
            died = [n for n in pipeline.dead() if n not in allowed]
            if died:
                pytest.fail(f"{died} died while the run drained\n{pipeline.logs()}")
            why = in_flight(pipeline.settings, client, rabbit)
            in_a_row = 0 if why else in_a_row + 1
            time.sleep(0.2)
    finally:
        client.close()


# -- private servers ------------------------------------------------------------------------------

def _unavailable(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI is set: a test that needs it must not be skipped)")
    pytest.skip(what)


class PrivateRedis:
    """A redis-server of our own on a free port, without persistence, to stop and start."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            _unavailable("redis-server is not installed: the Redis fault test needs a private one")
        assert binary is not None
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_port(self.port, 10):
            self.stop()
            pytest.fail(f"private redis-server on port {self.port} did not start")
        return self

    def require_password(self, password: str) -> None:
        client = redis.Redis(port=self.port)
        client.config_set("requirepass", password)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def shut_down_saving(self) -> None:
        """``SHUTDOWN SAVE``: connections are refused until ``start()``, which loads what was
        saved: an outage that keeps Redis's state (claims, marks, the limiter's buckets)."""
        # A bare socket: redis-py would retry the command on the connection the server closes.
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(b"SHUTDOWN SAVE\r\n")
            with contextlib.suppress(OSError):
                sock.recv(1024)  # nothing: the server closes the connection as it exits
        if self.proc is not None:
            self.proc.wait(30)
        self.proc = None

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


class PrivateRabbit:
    """A RabbitMQ node of our own (``mpfaults<port>@localhost``), its data in ``workdir``.

    Run as a child in its own process group (the Debian wrapper would switch user and detach),
    so that stopping it kills exactly the processes it started.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.node = f"mpfaults{self.port}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        plugins = workdir / "enabled_plugins"
        plugins.write_text("[].\n")
        self.env = {**os.environ, "HOME": str(workdir), "RABBITMQ_NODENAME": self.node,
                    "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(free_port()),
                    "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"), "RABBITMQ_LOG_BASE": str(workdir / "log"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
                    "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq")}

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self, timeout_s: float = 60) -> PrivateRabbit:
        if not (RABBIT_BIN / "rabbitmq-server").exists():
            _unavailable(f"{RABBIT_BIN}/rabbitmq-server is not installed: this test needs a private node")
        with (self.workdir / "server.log").open("ab") as log:
            self.proc = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        if not self._amqp_ready(timeout_s):
            log_text = (self.workdir / "server.log").read_text(errors="replace")[-2000:]
            self.kill()
            pytest.fail(f"private RabbitMQ node {self.node} did not start:\n{log_text}")
        return self

    def _amqp_ready(self, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                pika.BlockingConnection(pika.URLParameters(self.url)).close()
                return True
            except (pika.exceptions.AMQPError, OSError):
                time.sleep(0.25)
        return False

    def ctl(self, *args: str) -> None:
        subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args], env=self.env,
                       check=True, capture_output=True, timeout=60)

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        if not self._amqp_ready(60):
            pytest.fail(f"private RabbitMQ node {self.node} did not come back after start_app")

    def kill(self) -> None:
        """kill -9 the node (its whole process group: the shell wrapper and the Erlang VM)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> PrivateRabbit:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.kill()


@contextlib.contextmanager
def stopped(service: PrivateRedis, seconds: float) -> Iterator[None]:
    """Stop ``service`` for ``seconds`` (the body runs while it is down), then start it again."""
    service.stop()
    started = time.monotonic()
    try:
        yield
    finally:
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        service.start()


# -- what is still in flight (the fault campaign's drain) ----------------------------------------

def queue_depths(namespace: str, rabbit: PrivateRabbit | None = None) -> dict[str, tuple[int, int]] | None:
    """Every queue of ``namespace`` with its (ready, unacked) counts, by ``rabbitmqctl`` (the
    shared node's, as root; or the private node's, with its ``-n``); None while the node does not
    answer."""
    if rabbit is not None:
        args = [str(RABBIT_BIN / "rabbitmqctl"), "-n", rabbit.node]
    else:  # the system's wrapper, which runs the CLI as the node's user (its Erlang cookie)
        args = [shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"]
    args += ["list_queues", "-q", "--no-table-headers", "-p", "/", "name", "messages_ready",
             "messages_unacknowledged"]
    try:
        out = subprocess.run(args, env=rabbit.env if rabbit is not None else None, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return parse_depths(out.stdout, namespace)


def parse_depths(listing: str, namespace: str) -> dict[str, tuple[int, int]]:
    """``rabbitmqctl list_queues name messages_ready messages_unacknowledged`` output, for the
    queues of ``namespace``."""
    depths: dict[str, tuple[int, int]] = {}
    for line in listing.splitlines():
        cols = line.split()
        if cols and cols[0].startswith(f"{namespace}."):
            counts = cols[1:]
            # A queue whose counts the node cannot give (a quorum queue without its leader) is busy.
            known = len(counts) == 2 and all(c.isdigit() for c in counts)
            depths[cols[0]] = (int(counts[0]), int(counts[1])) if known else (-1, -1)
    return depths


def held_claims(redis_client: redis.Redis, namespace: str) -> int:
    """Claims of ``namespace`` still held: hashes ``{<namespace>:<server>}:claim:*`` with a field
    ``h <owner> <until_us> <grant>`` whose lease runs past Redis ``TIME``."""
    seconds, micros = cast(tuple[int, int], redis_client.time())
    now_us = int(seconds) * 1_000_000 + int(micros)
    held = 0
    for key in redis_client.scan_iter(match=f"{{{namespace}:*}}:claim:*", count=1000):
        values: list[bytes] = redis_client.hvals(key)  # type: ignore[assignment]
        held += claim_held(values, now_us)
    return held


def dead_for_check(settings: Settings) -> list[Dead]:
    """The dead-letter queue as the checker counts it: each job's recipients and its reason."""
    return [Dead(job, c.recipients if c.kind == "job" else (), entry.reason or entry.first_death_reason)
            for entry in read_dead(settings.amqp_url, settings.namespace)
            for c in [contents(entry.body)] for job in entry.job_ids]
