"""deploy/ as ops use it: the Kubernetes manifests parse and carry probes, resources, a grace
period that covers the drain, KEDA on the send queue's full depth, and SMTP secrets; the
compose file validates (docker-compose config); promtool accepts the Prometheus config and
rules; the dashboard and ``mailpipe report`` draw the same expressions.

No services: docker-compose and promtool only read files. Each is installed from Debian's
packages if missing (this machine runs as root); in CI a missing one fails the test.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailpipe import report
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from tests.tools import require_tool

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
STAGES = ("producer", "packer", "limiter", "sender")
GRACE_MARGIN_S = 10  # SIGKILL must not come while the stage still drains


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"one {kind} {name}, found {len(matches)}"
    return matches[0]


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    """The container's MAILPIPE_* values: its env, over the ConfigMaps it loads."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            values.update(find("ConfigMap", source["configMapRef"]["name"])["data"])
    values.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return values


# -- Kubernetes ----------------------------------------------------------------------------------

def test_every_manifest_parses_with_kind_and_name() -> None:
    docs = manifests()
    assert docs
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc
        assert doc["metadata"].get("namespace") == "mailpipe", doc["metadata"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_deployment_per_stage_with_probes_resources_and_grace(stage: str) -> None:
    deployment = find("Deployment", f"mailpipe-{stage}")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert container["args"][:2] == ["run", stage]
    port = int(container["args"][container["args"].index("--metrics-port") + 1])
    assert {"name": "metrics", "containerPort": port} in container["ports"]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ("metrics", port), probe
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][bound]), bound
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)

    # SIGTERM, then the stage drains for shutdown_timeout_s: the kubelet must wait longer.
    shutdown_s = float(env_of(deployment).get("MAILPIPE_SHUTDOWN_TIMEOUT_S", Settings().shutdown_timeout_s))
    assert pod["spec"]["terminationGracePeriodSeconds"] >= shutdown_s + GRACE_MARGIN_S
    Settings.from_env(env_of(deployment))  # the settings it gives are valid


def test_a_sender_drains_a_whole_window_before_it_is_killed() -> None:
    sender = find("Deployment", "mailpipe-sender")
    shutdown_s = float(env_of(sender)["MAILPIPE_SHUTDOWN_TIMEOUT_S"])
    assert shutdown_s > Settings().window_s, "a batch in flight finishes its window"


def test_keda_scales_senders_on_the_send_queue_with_unacked_counted() -> None:
    scaled = find("ScaledObject", "mailpipe-sender")
    assert scaled["spec"]["scaleTargetRef"]["name"] == find("Deployment", "mailpipe-sender")["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] >= 1, "one sender always runs: granted batches never wait"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    meta = trigger["metadata"]
    # http: the management API's count includes unacked messages, so a sender holding a batch
    # counts, and scale-in does not take away the sender in the middle of that batch.
    assert meta["protocol"] == "http"
    assert meta["mode"] == "QueueLength" and int(meta["value"]) >= 1
    namespace = env_of(find("Deployment", "mailpipe-sender"))["MAILPIPE_NAMESPACE"]
    assert meta["queueName"] == Topology(namespace=namespace).send
    auth = find("TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "host"
    host = find("Secret", ref["name"])["stringData"][ref["key"]]
    assert host.startswith(("http://", "https://")), "protocol http needs the management API's URL"


def test_smtp_credentials_come_from_a_secret_mounted_where_the_servers_file_looks() -> None:
    sender = find("Deployment", "mailpipe-sender")
    pod = sender["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    secret_volume = next(name for name, v in volumes.items() if "secret" in v)
    secret = find("Secret", volumes[secret_volume]["secret"]["secretName"])
    servers_map = find("ConfigMap", "mailpipe-servers")
    servers = tomllib.loads(servers_map["data"]["servers.toml"])["servers"]
    assert servers, "the example names at least one server"
    for name, server in servers.items():
        path = Path(server["credentials_file"])
        assert str(path.parent) == mounts[secret_volume], name
        assert path.name in secret["stringData"], f"the secret holds {name}'s credentials"
    # The servers file is in the mounted ConfigMap directory (a subPath mount would never see
    # the ConfigMap's updates, and the stages re-read the file when it changes).
    servers_file = Path(env_of(sender)["MAILPIPE_SERVERS_FILE"])
    assert str(servers_file.parent) == mounts["servers"] and servers_file.name in servers_map["data"]
    assert all("subPath" not in m for m in pod["containers"][0]["volumeMounts"])


def test_no_password_in_a_configmap() -> None:
    for doc in manifests():
        if doc["kind"] == "ConfigMap":
            for key, value in doc["data"].items():
                assert "://" not in value or "@" not in value.split("://", 1)[1].split("/")[0], key
                assert "password" not in key.lower(), key


# -- compose ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    binary = require_tool("docker-compose", "docker-compose")
    done = subprocess.run([binary, "-f", str(DEPLOY / "compose.yaml"), "config"], capture_output=True,
                          text=True, timeout=60, cwd=DEPLOY.parent)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def test_compose_validates_with_every_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"rabbitmq", "redis", "prometheus", "grafana", *STAGES} <= set(services)
    assert "management" in services["rabbitmq"]["image"], "queue depth and KEDA use the management API"
    mounts = " ".join(str(v) for v in services["grafana"]["volumes"])
    assert "grafana/provisioning" in mounts and "mailpipe.json" in mounts, "the dashboard is provisioned"


@pytest.mark.parametrize("stage", STAGES)
def test_compose_stages_scale_and_drain(compose: dict[str, Any], stage: str) -> None:
    service = compose["services"][stage]
    # --scale sender=N: no fixed container name, no host port that two replicas would share.
    assert "container_name" not in service and "ports" not in service
    assert service["command"][:2] == ["run", stage] and "--metrics-port" in service["command"]
    grace_s = _seconds(service["stop_grace_period"])
    assert grace_s >= float(service["environment"]["MAILPIPE_SHUTDOWN_TIMEOUT_S"]) + GRACE_MARGIN_S


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    total, number = 0.0, ""
    for char in duration:
        if char.isdigit() or char == ".":
            number += char
        else:
            total, number = total + float(number) * units[char], ""
    return total + (float(number) if number else 0)


# -- Prometheus and Grafana ---------------------------------------------------------------------

def test_promtool_accepts_the_config_and_the_rules() -> None:
    promtool = require_tool("promtool", "prometheus")
    for args in (["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                 ["check", "rules", str(DEPLOY / "prometheus" / "rules.yml")]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_rules_alert_on_what_ops_asked_for() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    wanted = {
        "MailpipeSendRateBelowLimit": "mailpipe_server_limit_mails_per_hour",
        "MailpipeWindowOverruns": "mailpipe_sender_window_overruns_total",
        "MailpipeDeadLettersGrowing": "dead",
        "MailpipeStageNotReady": "mailpipe_ready",
        "MailpipeStageDown": "up{",
        "MailpipeLimiterFailingClosed": "mailpipe_limiter_failing_closed",
    }
    for alert, needle in wanted.items():
        assert needle in exprs[alert], alert


def test_the_dashboard_is_grafana_json_on_the_provisioned_datasource() -> None:
    board = json.loads((DEPLOY / "grafana" / "mailpipe.json").read_text())
    datasources = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
                                 .read_text())["datasources"]
    uid = datasources[0]["uid"]
    targets = [t for p in board["panels"] for t in p.get("targets", [])]
    assert len(targets) >= 20
    assert all(t["datasource"]["uid"] == uid and t["expr"].strip() for t in targets)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    text = json.dumps(board)
    for metric in ("mailpipe_sender_mails_total", "mailpipe_server_limit_mails_per_hour",
                   "mailpipe_queue_messages", "mailpipe_batch_mails_bucket", "mailpipe_batch_bytes_bucket",
                   "mailpipe_sender_window_used_seconds_bucket", "mailpipe_mail_latency_seconds_bucket",
                   "mailpipe_dead_letters_total", "mailpipe_limiter_grant_wait_seconds_bucket"):
        assert metric in text, metric


def test_the_per_tenant_panels_name_the_setting_their_series_need() -> None:
    board = json.loads((DEPLOY / "grafana" / "mailpipe.json").read_text())
    setting = "MAILPIPE_METRICS_TENANT_LABEL"
    assert Settings.from_env({setting: "true"}).metrics_tenant_label, "the setting the panels name exists"
    for metric in ("mailpipe_limiter_tenant_released_mails_total", "mailpipe_limiter_tenant_grant_wait_seconds_bucket"):
        (panel,) = [p for p in board["panels"] if any(metric in t["expr"] for t in p.get("targets", []))]
        assert f"{setting}=true" in panel["description"], panel["title"]
        assert all("by (server, tenant)" in t["expr"] or "by (le, server, tenant)" in t["expr"]
                   for t in panel["targets"]), panel["title"]


def test_the_report_draws_the_dashboards_expressions() -> None:
    board = json.loads((DEPLOY / "grafana" / "mailpipe.json").read_text())
    exprs = {t["expr"] for p in board["panels"] for t in p.get("targets", [])}
    for expr, _legend in (*report.SEND_RATE, *report.QUEUE_DEPTHS):
        assert expr in exprs, expr


def test_grafana_rate_interval_as_grafana_computes_it() -> None:
    assert report.rate_window_s(step_s=1, scrape_interval_s=15) == 60
    assert report.rate_window_s(step_s=120, scrape_interval_s=15) == 135
    assert report.grafana_vars('rate(x{server=~"$server"}[$__rate_interval])', 60) == 'rate(x{server=~".*"}[60s])'
