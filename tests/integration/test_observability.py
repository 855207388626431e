"""Operability, proven against real services: a real Prometheus (Debian's ``prometheus``)
scrapes every stage of a real pipeline run once a second; then every PromQL expression of the
Grafana dashboard must return data, every alert rule must parse and evaluate, the stages
answer /healthz and /readyz, log JSON lines without secrets, and ``mailpipe report`` draws
the run into a PNG. What comes back after the 250 is part of the run: a DSN and a feedback-loop
complaint by SMTP to the inbound stage, and a one-click unsubscribe by HTTP.

The first tests need no service: they check the pure parts of the queue-depth collector.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from mailpipe import report
from mailpipe.model import IntakeRequest, new_id, now_ms
from mailpipe.queue_metrics import QueueDepth, QueueDepthCollector, api_request, families, parse_api_queues
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from producer import Producer
from tests.smtp_peer import Received, SmtpPeer, make_test_ca
from tests.stages import StageProcesses, settings_env
from tests.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "mailpipe.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
STAGES = ("producer", "packer", "limiter", "sender", "inbound")
SMTP_USER, SMTP_PASSWORD = "obs-user", "Obs-S3cret-pw-7f2c"  # must appear in no log, no metric
VERP_SECRET = "obs-verp-S3cret-5d1e"  # signs the return paths and unsubscribe links: logged nowhere either
RETURN_PATH_DOMAIN = "bounces.obs.test"
FEEDBACK_ADDRESS = f"fbl@{RETURN_PATH_DOMAIN}"
# A limit that binds: 20 mails/s with bursts of 50, so batches wait at the limiter (and are
# split) for a few seconds, and the dashboard's limit and held-batches panels have data.
RATE_PER_HOUR = 72_000
BURST_MAILS = 50
SCRAPE_S = 1
API_URL = Settings().rabbitmq_api_url  # MAILPIPE_RABBITMQ_API_URL overrides, as for the stages


# -- no services ----------------------------------------------------------------------------------

def test_api_answer_keeps_the_namespace_queues_only() -> None:
    payload = [
        {"name": "ns.send", "messages_ready": 3, "messages_unacknowledged": 2},
        {"name": "ns.park.60s", "messages_ready": 1, "messages_unacknowledged": 0},
        {"name": "ns.jobs"},  # just declared: no stats yet
        {"name": "other.send", "messages_ready": 9, "messages_unacknowledged": 9},
        {"name": "ns-send", "messages_ready": 9},
    ]
    assert parse_api_queues(payload, "ns") == [
        QueueDepth("ns.jobs", 0, 0), QueueDepth("ns.park.60s", 1, 0), QueueDepth("ns.send", 3, 2)]
    with pytest.raises(ValueError):
        parse_api_queues({"error": "not_authorised"}, "ns")


def test_api_request_uses_the_amqp_vhost_and_credentials() -> None:
    request = api_request("http://127.0.0.1:15672", "amqp://ops:p%40ss@rabbit:5672/mail")
    assert request.full_url == ("http://127.0.0.1:15672/api/queues/mail"
                                "?columns=name,messages_ready,messages_unacknowledged")
    import base64
    assert request.get_header("Authorization") == "Basic " + base64.b64encode(b"ops:p@ss").decode()
    default = api_request("http://api:pw@10.0.0.1:15672/rabbit/", "amqp://guest:guest@127.0.0.1:5672/")
    assert default.full_url.startswith("http://10.0.0.1:15672/rabbit/api/queues/%2F?")
    assert default.get_header("Authorization") == "Basic " + base64.b64encode(b"api:pw").decode()


def test_passive_declares_give_ready_only() -> None:
    messages, source = families([QueueDepth("ns.send", 4, None), QueueDepth("ns.jobs", 1, 7)], "amqp")
    assert [(s.labels, s.value) for s in messages.samples] == [
        ({"queue": "ns.send", "state": "ready"}, 4), ({"queue": "ns.jobs", "state": "ready"}, 1),
        ({"queue": "ns.jobs", "state": "unacked"}, 7)]
    assert [(s.labels, s.value) for s in source.samples] == [({"source": "amqp"}, 1)]


# -- helpers ---------------------------------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def prom_api(url: str, path: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    status, body = http_get(f"{url}/api/v1/{path}?{query}")
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", f"{path} {params}: {answer}"
    return answer["data"]


def wait_for(condition: Any, timeout_s: float, what: str, logs: Any = lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except (OSError, ValueError, KeyError, AssertionError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{logs()}")
        time.sleep(0.25)


def dashboard_targets() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(f"{panel['title']} / {target['refId']}", target["expr"])
            for panel in board["panels"] for target in panel.get("targets", [])]


def rule_exprs() -> list[tuple[str, str]]:
    import yaml

    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(rule.get("alert") or rule["record"], rule["expr"]) for g in groups for rule in g["rules"]]


def instant(url: str, expr: str) -> float:
    result = prom_api(url, "query", query=expr)["result"]
    return sum(float(r["value"][1]) for r in result) if result else 0.0


class Prometheus:
    """Prometheus on loopback, with a storage dir of its own; never the Debian service."""

    def __init__(self, binary: str, workdir: Path, targets: dict[str, int]) -> None:
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
            "rule_files": [str(RULES)],
            # The job names of deploy/prometheus/prometheus.yml: mailpipe-<stage>.
            "scrape_configs": [{"job_name": f"mailpipe-{stage}",
                                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                               for stage, port in targets.items()],
        }
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: http_get(f"{self.url}/-/ready")[0] == 200, 30, "Prometheus to be ready",
                 lambda: self.log.read_text(errors="replace"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return require_tool("prometheus", "prometheus")


def write_servers(settings: Settings, port: int, ca_file: Path) -> None:
    # Credentials go only over TLS: STARTTLS to the test peer, with the test CA. A platform
    # (shared) server: its mail leaves with signed return paths, and its sends and reports weigh
    # in the tenant's ratios.
    Path(settings.servers_file).write_text(
        f'[servers.tenant-smtp]\naddress = "[127.0.0.1]:{port}"\ntls = "starttls"\nca_file = "{ca_file}"\n'
        f'rate_per_hour = {RATE_PER_HOUR}\ncredentials_env = "OBS_SMTP_CREDENTIALS"\nplatform = true\n\n'
        '[tenants.acme]\nserver = "tenant-smtp"\ndaily_limit = 100000\n', encoding="utf-8")


def mails(n: int, to: str = "user{i}@example.com", bulk: bool = False) -> list[IntakeRequest]:
    return [IntakeRequest(id=new_id(), tenant="acme", sender="hr@acme.example", created_ms=now_ms(),
                          to=(to.format(i=i),), subject=f"Mail {i}", text="Hello from mailpipe.\n", bulk=bulk)
            for i in range(n)]


def received(peer: SmtpPeer, recipient: str) -> Received:
    (mail,) = [m for m in peer.messages if m.recipients == (recipient,)]
    return mail


def dsn_for(mail: Received) -> bytes:
    """The receiving side's later bounce of ``mail`` (RFC 3464), to its return path."""
    (recipient,) = mail.recipients
    return multipart_report(
        "delivery-status", f"From: MAILER-DAEMON@mx.example.com\r\nTo: {mail.sender}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nAuto-Submitted: auto-replied\r\n",
        f"<{recipient}>: the mailbox does not exist.",
        f"Reporting-MTA: dns; mx.example.com\r\n\r\nFinal-Recipient: rfc822; {recipient}\r\n"
        f"Original-Recipient: rfc822;{recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: User unknown\r\n", mail)


def complaint_about(mail: Received) -> bytes:
    """A feedback loop's report (RFC 5965) of the recipient's "this is spam" on ``mail``."""
    (recipient,) = mail.recipients
    return multipart_report(
        "feedback-report", f"From: feedback@fbl.example.com\r\nTo: {FEEDBACK_ADDRESS}\r\nSubject: Abuse report\r\n",
        "This is an email abuse report.",
        f"Feedback-Type: abuse\r\nUser-Agent: fbl/1.0\r\nVersion: 1\r\nOriginal-Rcpt-To: <{recipient}>\r\n", mail)


def multipart_report(report_type: str, headers: str, text: str, fields: str, mail: Received) -> bytes:
    """A report with ``mail`` attached as its receiver kept it (the Return-Path of its envelope on top)."""
    boundary = f"report-{new_id()}"
    return (f'{headers}MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type={report_type}; '
            f'boundary="{boundary}"\r\n\r\n--{boundary}\r\nContent-Type: text/plain\r\n\r\n{text}\r\n'
            f"--{boundary}\r\nContent-Type: message/{report_type}\r\n\r\n{fields}\r\n"
            f"--{boundary}\r\nContent-Type: message/rfc822\r\n\r\nReturn-Path: <{mail.sender}>\r\n").encode() + \
        mail.content + f"\r\n--{boundary}--\r\n".encode()


def one_click_link(mail: Received, http_port: int) -> str:
    """The HTTPS link of ``mail``'s List-Unsubscribe, pointed at the inbound stage's port."""
    headers = mail.content.split(b"\r\n\r\n", 1)[0].decode()
    link = re.search(r"(?im)^List-Unsubscribe:\s*<(https://[^>]+)>", headers)
    assert link is not None and "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in headers, headers
    return f"http://127.0.0.1:{http_port}{urllib.parse.urlsplit(link[1]).path}"


def talk_back(peer: SmtpPeer, smtp_port: int, http_port: int) -> None:
    """After the 250, as the others would: the receiving side bounces one mail (a DSN to its
    return path), a feedback loop reports a recipient's complaint about another (to the
    feedback address), and a recipient of the bulk mail presses unsubscribe (a one-click POST)."""
    gone, complained, reader = (received(peer, f"{who}@example.com") for who in ("user7", "user8", "reader"))
    assert gone.sender.endswith(f"@{RETURN_PATH_DOMAIN}"), gone.sender
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
        smtp.sendmail("", [gone.sender], dsn_for(gone))
        smtp.sendmail("feedback@fbl.example.com", [FEEDBACK_ADDRESS], complaint_about(complained))
    post = urllib.request.Request(one_click_link(reader, http_port), data=b"List-Unsubscribe=One-Click",
                                  method="POST")
    with urllib.request.urlopen(post, timeout=30) as answer:
        assert answer.status == 202


# -- a real pipeline, a real Prometheus -----------------------------------------------------------

@pytest.fixture
def observed_run(settings: Settings, tmp_path: Path, prometheus_binary: str,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Run every stage with a metrics port each, scraped by Prometheus, through mail that is
    sent, refused (550), deferred then sent (451 once), and an intake message that does not
    decode; then a DSN for one mail, a complaint about another and a one-click unsubscribe from
    a third come back to the inbound stage; so every panel of the dashboard has something to show."""
    # A 1 s window keeps 20 of the burst back at this rate (see limiter/gcra.py).
    # Per-tenant series on: the fair-share panels have data too. Fewer sends than the minimum
    # to judge a tenant: the complaint warns nobody (1 in 202 would), so the ratio panels show
    # what the inbound stage exports for every tenant it has a report for, warned or not.
    certs = make_test_ca(tmp_path / "ca")
    with SmtpPeer(auth={SMTP_USER: SMTP_PASSWORD}, starttls_context=certs.server_context()) as peer:
        # The ports after the peer's: a port free_ports saw free may be the one the peer's
        # listener is given next (seen: a stage's /readyz answered by the peer's SMTP banner).
        *metrics_ports, smtp_port, http_port = free_ports(len(STAGES) + 2)
        settings = settings.replace(log_format="json", metrics_tenant_label=True, burst_mails=BURST_MAILS,
                                    window_s=1.0, send_margin_s=0.2,
                                    rabbitmq_api_url=os.environ.get("MAILPIPE_RABBITMQ_API_URL", API_URL),
                                    verp_keys=f"7:{VERP_SECRET}", return_path_domain=RETURN_PATH_DOMAIN,
                                    inbound_smtp_host="127.0.0.1", inbound_smtp_port=smtp_port,
                                    inbound_http_port=http_port, inbound_feedback_addresses=FEEDBACK_ADDRESS,
                                    unsubscribe_url="https://mail.obs.test/unsubscribe", reputation_min_sends=1000)
        monkeypatch.setenv("OBS_SMTP_CREDENTIALS", f"{SMTP_USER} {SMTP_PASSWORD}")
        ports = dict(zip(STAGES, metrics_ports, strict=True))
        prom_dir = tmp_path / "prometheus"
        prom_dir.mkdir()
        log_dir = tmp_path / "logs"
        log_dir.mkdir()
        peer.refuse("spam-trap@example.com", 550, "5.7.1 High probability of spam")
        peer.refuse("busy@example.com", 451, "4.7.1 Try again later", times=1)
        write_servers(settings, peer.port, certs.ca_file)
        prometheus = Prometheus(prometheus_binary, prom_dir, ports)
        started = time.time()
        try:
            with StageProcesses(settings, log_dir, *STAGES, metrics_ports=ports) as stages:
                def logs() -> str:
                    return stages.logs() + "\n--- prometheus\n" + prometheus.log.read_text(errors="replace")

                wait_for(lambda: all(http_get(f"http://127.0.0.1:{p}/readyz")[0] == 200
                                     for p in ports.values()), 30, "every stage to be ready", logs)
                garbage = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
                garbage.channel().basic_publish("", Topology.from_settings(settings).intake,
                                                b"\xc1 not msgpack")
                garbage.close()
                with Producer(settings.amqp_url, settings.namespace) as producer:
                    producer.publish_requests([*mails(200), *mails(1, to="spam-trap@example.com"),
                                               *mails(1, to="busy@example.com"),
                                               *mails(1, to="reader@example.com", bulk=True)])
                wait_for(lambda: len(peer.messages) >= 202, 60, "202 mails at the SMTP peer", logs)
                talk_back(peer, smtp_port, http_port)
                # Until Prometheus has scraped the end of the run, and its rules were evaluated.
                wait_for(lambda: instant(prometheus.url,
                                         'sum(mailpipe_sender_mails_total{outcome="sent"})') >= 202
                         and instant(prometheus.url, 'sum(mailpipe_sender_mails_total{outcome="failed"})') >= 1
                         and instant(prometheus.url, "sum(mailpipe_intake_rejects_total)") >= 1
                         and instant(prometheus.url, 'sum(mailpipe_inbound_reports_total{result="applied"})') >= 3
                         and instant(prometheus.url, "sum(mailpipe_suppressions_total)") >= 3
                         and instant(prometheus.url, 'min(mailpipe_tenant_bounce_ratio{tenant="acme"})') > 0
                         and instant(prometheus.url, 'min(mailpipe_tenant_complaint_ratio{tenant="acme"})') > 0,
                         30, "Prometheus to scrape the whole run", logs)
                health = {stage: (http_get(f"http://127.0.0.1:{port}/healthz"),
                                  http_get(f"http://127.0.0.1:{port}/readyz"),
                                  http_get(f"http://127.0.0.1:{port}/metrics")[1].decode())
                          for stage, port in ports.items()}
                targets = prom_api(prometheus.url, "targets")["activeTargets"]
                running_at = time.time()  # every stage still runs: their series are not stale
                time.sleep(2 * SCRAPE_S)  # one more evaluation of every rule, on complete data
                exit_codes = stages.stop()
            yield {"settings": settings, "prometheus": prometheus, "started": started, "health": health,
                   "exit_codes": exit_codes, "targets": targets, "running_at": running_at,
                   "log_dir": log_dir, "logs": logs, "ports": ports}
        finally:
            prometheus.stop()


@pytest.mark.integration
def test_a_real_prometheus_answers_every_dashboard_and_alert_expression(
        observed_run: dict[str, Any], tmp_path: Path) -> None:
    prom: Prometheus = observed_run["prometheus"]
    settings: Settings = observed_run["settings"]
    assert observed_run["exit_codes"] == {f"{s}-0": 0 for s in STAGES}, observed_run["logs"]()
    start, end = observed_run["started"], time.time()
    window = report.rate_window_s(SCRAPE_S, SCRAPE_S)

    # Every stage was scraped, and every one exports the queue depths and the servers' limits.
    targets = observed_run["targets"]  # as they were while the stages ran
    assert sorted(t["labels"]["job"] for t in targets) == sorted(f"mailpipe-{s}" for s in STAGES)
    assert [t["scrapeUrl"] for t in targets if t["health"] != "up"] == []
    send_queue = Topology.from_settings(settings).send
    at = f"{observed_run['running_at']:.3f}"
    exporters = prom_api(prom.url, "query", query=f'mailpipe_queue_messages{{queue="{send_queue}"}}', time=at)
    assert {r["metric"]["job"] for r in exporters["result"]} == {f"mailpipe-{s}" for s in STAGES}
    states = {r["metric"]["state"] for r in exporters["result"]}
    sources = prom_api(prom.url, "query", query="mailpipe_queue_metrics_source == 1", time=at)["result"]
    (source,) = {r["metric"]["source"] for r in sources}
    assert states == ({"ready", "unacked"} if source == "api" else {"ready"}), (source, states)
    limit = prom_api(prom.url, "query", query='mailpipe_server_limit_mails_per_hour{server="tenant-smtp"}',
                     time=at)["result"]
    assert {float(r["value"][1]) for r in limit} == {RATE_PER_HOUR}

    # The dashboard: each expression, with Grafana's variables filled in, has data in the run.
    empty = []
    for title, expr in dashboard_targets():
        filled = report.grafana_vars(expr, window)
        assert "$" not in filled, f"{title}: a Grafana variable the test does not know: {filled}"
        series = report.query_range(prom.url, filled, start, end, 1.0)
        if not any(math.isfinite(float(v)) for s in series for _, v in s["values"]):
            empty.append(f"{title}: {filled}")
    assert empty == [], "dashboard expressions without data:\n" + "\n".join(empty)

    # The alert rules: each expression parses and evaluates, and Prometheus evaluated every
    # rule of the file without an error.
    for _name, expr in rule_exprs():
        report.query_range(prom.url, expr, start, end, 1.0)  # raises on a refused expression
        prom_api(prom.url, "query", query=expr)
    loaded = [rule for g in prom_api(prom.url, "rules")["groups"] for rule in g["rules"]]
    assert sorted(r["name"] for r in loaded) == sorted(name for name, _ in rule_exprs())
    assert [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"] == []
    # A healthy run fires no alert (overruns, dead letters: the 550 is one, see below).
    firing = {r["name"] for r in loaded if r["state"] == "firing"}
    assert firing <= {"MailpipeDeadLettersGrowing"}, firing

    # mailpipe report draws the same series into a PNG, through the command line.
    out = tmp_path / "report.png"
    done = subprocess.run(
        [sys.executable, "-m", "mailpipe", "report", prom.url, "--out", str(out),
         "--minutes", str(math.ceil((end - start) / 60 + 1)), "--scrape-interval-s", str(SCRAPE_S)],
        capture_output=True, text=True, timeout=120, env=settings_env(settings))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and out.stat().st_size > 20_000
    drawn = re.search(r"(\d+) send-rate series, (\d+) queue series", done.stdout)
    assert drawn, done.stdout
    assert int(drawn[1]) == 2, "sent and limit of the one server"
    assert int(drawn[2]) >= len(Topology.from_settings(settings).all_queues), done.stdout
    if os.environ.get("MAILPIPE_REPORT_COPY"):  # to look at it: MAILPIPE_REPORT_COPY=/tmp/x.png
        shutil.copy(out, os.environ["MAILPIPE_REPORT_COPY"])

    check_health_and_logs(observed_run)


def check_health_and_logs(observed_run: dict[str, Any]) -> None:
    """/healthz and /readyz answered 200 during the run; every log line is JSON, the dead
    letters name their job, and the SMTP password and the return paths' key show up nowhere."""
    for stage, ((health, _), (ready, _), metrics_text) in observed_run["health"].items():
        assert health == 200 and ready == 200, stage
        assert "mailpipe_queue_messages{" in metrics_text, stage
        assert SMTP_PASSWORD not in metrics_text and VERP_SECRET not in metrics_text
    lines = []
    for path in sorted(observed_run["log_dir"].glob("*.log")):
        text = path.read_text(errors="replace")
        assert SMTP_PASSWORD not in text, f"{path.name} logs the SMTP password"
        assert VERP_SECRET not in text, f"{path.name} logs the return paths' key"
        for line in text.splitlines():
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    pytest.fail(f"{path.name}: not a JSON line: {line!r}")
                assert {"ts", "level", "logger", "msg"} <= set(record), line
                lines.append(record)
    dead = [r for r in lines if r["msg"].startswith("dead-lettered") and r.get("stage") == "sender"]
    assert dead and dead[0]["job_id"] and dead[0]["category"], dead
    assert any(r.get("stage") == "producer" and r["msg"].startswith("dead-lettered") for r in lines)


@pytest.mark.integration
def test_readyz_is_503_while_redis_or_rabbitmq_is_unreachable(settings: Settings, tmp_path: Path) -> None:
    closed = free_ports(1)[0]  # nothing listens there
    Path(settings.servers_file).write_text('[servers.s]\naddress = "[127.0.0.1]:2525"\n'
                                           '[tenants.acme]\nserver = "s"\n', encoding="utf-8")
    cases = {
        "redis": settings.replace(redis_url=f"redis://127.0.0.1:{closed}/0"),
        "rabbitmq": settings.replace(amqp_url=f"amqp://guest:guest@127.0.0.1:{closed}/"),
    }
    procs = {}
    ports = dict(zip(cases, free_ports(len(cases)), strict=True))
    try:
        for name, case in cases.items():
            with (tmp_path / f"{name}.log").open("wb") as log:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "mailpipe", "run", "producer", "--metrics-port", str(ports[name])],
                    env=settings_env(case), stdout=log, stderr=subprocess.STDOUT)
        for name, port in ports.items():
            wait_for(lambda port=port: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200, 20,
                     f"/healthz with {name} down", lambda name=name: (tmp_path / f"{name}.log").read_text())
            assert http_get(f"http://127.0.0.1:{port}/readyz")[0] == 503, name
            assert "mailpipe_ready" in http_get(f"http://127.0.0.1:{port}/metrics")[1].decode()
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.integration
def test_collector_reads_queue_depth_from_the_broker(settings: Settings) -> None:
    # Without the management API (this machine's broker has it off) the collector falls back to
    # passive declares; with it, "unacked" appears as well. The API's numbers lag by up to its
    # statistics interval (5 s by default): wait for them.
    topology = Topology.from_settings(settings)
    settings = settings.replace(rabbitmq_api_url=os.environ.get("MAILPIPE_RABBITMQ_API_URL", API_URL))
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = conn.channel()
        topology.declare(channel)
        channel.confirm_delivery()
        for _ in range(3):
            channel.basic_publish("", topology.send, b"x")

        def read(collector: QueueDepthCollector) -> tuple[dict[tuple[str, str], float], str]:
            messages, source = list(collector.collect())
            (which,) = [s.labels["source"] for s in source.samples]
            return {(s.labels["queue"], s.labels["state"]): s.value for s in messages.samples}, which

        fresh = QueueDepthCollector(settings.replace(queue_metrics_cache_s=0.0))
        wait_for(lambda: read(fresh)[0][(topology.send, "ready")] == 3, 15, "3 ready in the send queue")
        depth, which = read(fresh)
        assert which in ("api", "amqp")
        assert depth[(topology.jobs, "ready")] == 0
        assert ((topology.send, "unacked") in depth) == (which == "api")

        cached = QueueDepthCollector(settings.replace(queue_metrics_cache_s=60.0))
        first, _ = read(cached)
        channel.basic_publish("", topology.send, b"x")
        assert read(cached)[0] == first, "a scrape within the cache time asks nobody"
        wait_for(lambda: read(fresh)[0][(topology.send, "ready")] == 4, 15, "the 4th message, uncached")
    finally:
        conn.close()
