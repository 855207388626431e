"""deploy/ as ops use it: the Kubernetes manifests parse and carry probes, resources, a grace
period that covers the drain, KEDA on the send queue's full depth, and SMTP secrets; the
compose file validates (docker-compose config); promtool accepts the Prometheus config and
rules; the dashboard and ``mailpipe report`` draw the same expressions.

Beyond one machine, in both deployments: RabbitMQ is a three-node cluster (one Erlang cookie,
classic-config peer discovery in compose, the Cluster Operator's RabbitmqCluster in Kubernetes),
Redis is a primary with replicas under three Sentinels, and every stage is given every node and
every Sentinel. The Redis start scripts are run here against stand-ins for redis-cli and the
image's entrypoint, to see which role a server takes from what the Sentinels answer.

No services: docker-compose and promtool only read files. Each is installed from Debian's
packages if missing (this machine runs as root); in CI a missing one fails the test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from mailpipe import report, stages
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from tests.tools import require_tool

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
REDIS_SCRIPTS = ("redis-start.sh", "sentinel-start.sh")
STAGES = stages.NAMES
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
    refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    host = find("Secret", refs["host"]["name"])["stringData"][refs["host"]["key"]]
    assert host.startswith(("http://", "https://")), "protocol http needs the management API's URL"
    # The cluster's client Service (any ready node), with the operator's credentials: the user
    # the stages use, which exists once the operator has made the cluster.
    cluster = rabbitmq_cluster()
    assert urlsplit(host).hostname == f"{cluster['metadata']['name']}.mailpipe.svc"
    for parameter in ("username", "password"):
        assert (refs[parameter]["name"], refs[parameter]["key"]) == (default_user_secret(cluster), parameter)


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


# -- Kubernetes: the RabbitMQ cluster and Redis with Sentinel ------------------------------------

def rabbitmq_cluster() -> dict[str, Any]:
    (cluster,) = [d for d in manifests() if d["kind"] == "RabbitmqCluster"]
    return cluster


def default_user_secret(cluster: dict[str, Any]) -> str:
    """The Secret the Cluster Operator creates for the cluster's default user (username, password)."""
    return f"{cluster['metadata']['name']}-default-user"


def rabbitmq_pod_hosts(cluster: dict[str, Any]) -> set[str]:
    """Each node's stable name: the operator's StatefulSet <name>-server behind its headless
    Service <name>-nodes."""
    name, namespace = cluster["metadata"]["name"], cluster["metadata"]["namespace"]
    return {f"{name}-server-{i}.{name}-nodes.{namespace}.svc" for i in range(cluster["spec"]["replicas"])}


def statefulset_pod_hosts(statefulset: dict[str, Any]) -> list[str]:
    """Each pod's stable name behind the StatefulSet's headless Service, in ordinal order."""
    name, namespace = statefulset["metadata"]["name"], statefulset["metadata"]["namespace"]
    service = statefulset["spec"]["serviceName"]
    return [f"{name}-{i}.{service}.{namespace}.svc" for i in range(statefulset["spec"]["replicas"])]


def plain_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Variable -> (secret, key), for the variables the container takes from a Secret."""
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def reference(text: str | None) -> str:
    """The variable a URL's user or password part refers to, as $(NAME)."""
    match = re.fullmatch(r"\$\((\w+)\)", text or "")
    assert match, f"{text!r} is not a $(VARIABLE) reference"
    return match[1]


def endpoints(value: str) -> list[tuple[str, int]]:
    """host:port,host:port,... as MAILPIPE_REDIS_SENTINELS and REDIS_SENTINELS write them."""
    return [(host, int(port)) for host, _, port in (item.strip().rpartition(":") for item in value.split(","))]


def rabbitmq_conf(text: str) -> dict[str, str]:
    """rabbitmq.conf (sysctl format): every line a comment, blank, or one "key = value"."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, equals, value = line.partition("=")
        assert equals and key.strip() and value.strip(), f"line {number} is not key = value: {line!r}"
        assert key.strip() not in values, f"line {number}: {key.strip()} given twice"
        values[key.strip()] = value.strip()
    return values


def sentinel_monitor(template: str) -> tuple[str, str, int, int]:
    """The template's monitored group (name, host, port, quorum). A host given by name is
    accepted only after "sentinel resolve-hostnames yes": Sentinel refuses the line otherwise."""
    lines = [line.split() for line in template.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    (monitor,) = [i for i, words in enumerate(lines) if words[:2] == ["sentinel", "monitor"]]
    name, host, port, quorum = lines[monitor][2:]
    if not re.fullmatch(r"[\d.]+", host):
        assert ["sentinel", "resolve-hostnames", "yes"] in lines[:monitor], "resolve-hostnames must come first"
        assert ["sentinel", "announce-hostnames", "yes"] in lines, "the clients are handed names, not addresses"
    return name, host, int(port), int(quorum)


def sentinel_port(template: str) -> int:
    (port,) = [line.split()[1] for line in template.splitlines() if line.split()[:1] == ["port"]]
    return int(port)


def test_the_rabbitmq_cluster_has_three_nodes_and_every_queue_a_member_on_each() -> None:
    cluster = rabbitmq_cluster()
    assert cluster["apiVersion"] == "rabbitmq.com/v1beta1"
    replicas = cluster["spec"]["replicas"]
    assert replicas == 3, "a quorum queue keeps its majority with one node of three down, none of two"
    assert cluster["spec"]["image"].startswith("rabbitmq:3.") and "management" in cluster["spec"]["image"]
    config = rabbitmq_conf(cluster["spec"]["rabbitmq"]["additionalConfig"])
    assert int(config["max_message_size"]) >= Settings().max_batch_bytes, "a batch is one message"
    assert config["cluster_partition_handling"] == "pause_minority", "a node without a majority stops serving"
    budget = find("PodDisruptionBudget", cluster["metadata"]["name"])
    assert budget["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": cluster["metadata"]["name"]}
    assert budget["spec"]["maxUnavailable"] <= (replicas - 1) // 2, "a drain never takes a queue's majority"
    for stage in STAGES:
        settings = Settings.from_env(env_of(find("Deployment", f"mailpipe-{stage}")))
        assert settings.quorum_group_size == replicas, stage


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_is_given_every_rabbitmq_node_and_every_sentinel(stage: str) -> None:
    deployment = find("Deployment", f"mailpipe-{stage}")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    settings = Settings.from_env(env_of(deployment))
    cluster = rabbitmq_cluster()

    urls = settings.amqp_endpoints
    assert len(urls) == cluster["spec"]["replicas"]
    assert {urlsplit(url).hostname for url in urls} == rabbitmq_pod_hosts(cluster)
    assert urlsplit(settings.amqp_url).hostname == f"{cluster['metadata']['name']}.mailpipe.svc"
    secrets = secret_refs(container)
    for url in (*urls, settings.amqp_url, settings.rabbitmq_api_url):
        parts = urlsplit(url)
        assert secrets[reference(parts.username)] == (default_user_secret(cluster), "username"), url
        assert secrets[reference(parts.password)] == (default_user_secret(cluster), "password"), url

    sentinels = find("StatefulSet", "mailpipe-sentinel")
    assert endpoints(settings.redis_sentinels) == [(host, 26379) for host in statefulset_pod_hosts(sentinels)]
    assert settings.redis_wait_replicas >= 1, "a failover must not forget a grant"
    redis_container = find("StatefulSet", "mailpipe-redis")["spec"]["template"]["spec"]["containers"][0]
    password = secrets[reference(urlsplit(settings.redis_url).password)]
    assert password == secret_refs(redis_container)["REDIS_PASSWORD"], "the servers' password"


def test_every_variable_a_container_refers_to_is_defined_before_it() -> None:
    """Kubernetes expands $(NAME) only from what is defined before it (envFrom, then the env
    entries above); any other reference is left in the value as it is, a URL with "$(...)" in it."""
    for doc in manifests():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            defined: set[str] = set()
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    defined |= set(find("ConfigMap", source["configMapRef"]["name"])["data"])
                if "secretRef" in source:
                    defined |= set(find("Secret", source["secretRef"]["name"])["stringData"])
            for entry in container.get("env", []):
                for name in re.findall(r"\$\((\w+)\)", entry.get("value", "")):
                    assert name in defined, f"{doc['metadata']['name']}: {entry['name']} uses {name} before it is set"
                defined.add(entry["name"])


def test_redis_is_a_primary_with_replicas_enough_to_wait_for_under_three_sentinels() -> None:
    redis = find("StatefulSet", "mailpipe-redis")
    sentinels = find("StatefulSet", "mailpipe-sentinel")
    settings = Settings.from_env(env_of(find("Deployment", "mailpipe-limiter")))
    assert sentinels["spec"]["replicas"] == 3
    # A grant is used once redis_wait_replicas replicas hold it: with any one server down (the
    # primary being replaced, or a replica) that many replicas must still be there.
    assert redis["spec"]["replicas"] - 2 >= settings.redis_wait_replicas >= 1
    for statefulset in (redis, sentinels):
        labels = statefulset["spec"]["template"]["metadata"]["labels"]
        service = find("Service", statefulset["spec"]["serviceName"])
        assert service["spec"]["clusterIP"] == "None", "headless: a stable name per pod"
        assert service["spec"]["publishNotReadyAddresses"] is True, "names resolve while pods start"
        assert service["spec"]["selector"].items() <= labels.items()
        budget = find("PodDisruptionBudget", statefulset["metadata"]["name"])
        assert budget["spec"]["maxUnavailable"] == 1
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()

    hosts = statefulset_pod_hosts(redis)
    server = redis["spec"]["template"]["spec"]["containers"][0]
    env = plain_env(server)
    assert env["REDIS_SENTINELS"] == settings.redis_sentinels, "the servers ask the Sentinels the stages ask"
    assert env["REDIS_MASTER_NAME"] == settings.redis_master
    assert env["REDIS_INITIAL_PRIMARY"] == hosts[0]
    assert env["REDIS_SELF"] == f"$(POD_NAME).{redis['spec']['serviceName']}.mailpipe.svc"
    pod_name = next(e for e in server["env"] if e["name"] == "POD_NAME")
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    template = find("ConfigMap", "mailpipe-redis")["data"]["sentinel.conf"]
    name, host, port, quorum = sentinel_monitor(template)
    assert (name, host, port) == (settings.redis_master, hosts[0], 6379)
    assert quorum == sentinels["spec"]["replicas"] // 2 + 1, "a majority of the Sentinels"
    assert {p for _, p in endpoints(settings.redis_sentinels)} == {sentinel_port(template)}
    sentinel = sentinels["spec"]["template"]["spec"]["containers"][0]
    assert plain_env(sentinel)["REDIS_MASTER_NAME"] == settings.redis_master
    assert plain_env(sentinel)["SENTINEL_SELF"] == f"$(POD_NAME).{sentinels['spec']['serviceName']}.mailpipe.svc"
    assert secret_refs(sentinel)["REDIS_PASSWORD"] == secret_refs(server)["REDIS_PASSWORD"]


def test_the_redis_configmap_holds_the_scripts_of_deploy_redis() -> None:
    """One text for compose and Kubernetes; a change to deploy/redis/*.sh is copied into
    k8s/redis.yaml (kubectl apply -f deploy/k8s/ cannot read files beside it)."""
    config_map = find("ConfigMap", "mailpipe-redis")
    for script in REDIS_SCRIPTS:
        assert config_map["data"][script] == (DEPLOY / "redis" / script).read_text(), script
    for name in ("mailpipe-redis", "mailpipe-sentinel"):
        pod = find("StatefulSet", name)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        command = Path(container["command"][-1])
        (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "mailpipe-redis"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert str(command.parent) == mount["mountPath"] and command.name in config_map["data"], name


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
    assert {"rabbitmq-1", "rabbitmq-2", "rabbitmq-3", "redis-1", "redis-2", "sentinel-1", "sentinel-2",
            "sentinel-3", "prometheus", "grafana", *STAGES} <= set(services)
    for node in rabbitmq_services(compose):
        assert "management" in services[node]["image"], "queue depth and KEDA use the management API"
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


def rabbitmq_services(compose: dict[str, Any]) -> list[str]:
    return sorted(name for name, s in compose["services"].items() if s["image"].startswith("rabbitmq:"))


def scripted_services(compose: dict[str, Any], script: str) -> list[str]:
    return sorted(name for name, s in compose["services"].items() if script in " ".join(s.get("command") or []))


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Target -> (source, mode) of a service's volumes, as docker-compose config writes them."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *mode = str(volume).split(":")
        found[target] = (source, mode[0] if mode else "rw")
    return found


def test_compose_runs_three_rabbitmq_nodes_as_one_cluster_with_one_cookie(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nodes = rabbitmq_services(compose)
    assert len(nodes) == 3
    # The node name is rabbit@<hostname>: fixed, and the name the other containers resolve.
    assert [services[node].get("hostname") for node in nodes] == nodes

    configs = {source for node in nodes for target, (source, _) in mounts(services[node]).items()
               if target.startswith("/etc/rabbitmq/conf.d/")}
    (config,) = configs
    conf = rabbitmq_conf(Path(config).read_text())
    assert conf["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = {v for k, v in conf.items() if k.startswith("cluster_formation.classic_config.nodes.")}
    assert listed == {f"rabbit@{node}" for node in nodes}
    assert conf["cluster_partition_handling"] == "pause_minority"
    assert int(conf["max_message_size"]) >= Settings().max_batch_bytes, "a batch is one message"

    # One cookie, from one secret, installed where the node and its CLI read it.
    cookies = {tuple(s["source"] for s in services[node].get("secrets", [])) for node in nodes}
    ((cookie,),) = cookies
    assert Path(compose["secrets"][cookie]["file"]).read_text().strip()
    for node in nodes:
        command = " ".join(services[node]["command"])
        assert f"/run/secrets/{cookie} /var/lib/rabbitmq/.erlang.cookie" in command, node
        assert command.rstrip().endswith("exec docker-entrypoint.sh rabbitmq-server"), node
        # Started together: a node that was not the last to stop waits for its peers.
        assert not set(services[node].get("depends_on", {})) & set(nodes), node
    data = [mounts(services[node])["/var/lib/rabbitmq"][0] for node in nodes]
    assert len(set(data)) == 3 and set(data) <= set(compose["volumes"]), "a volume per node"


def test_compose_runs_redis_as_a_primary_and_a_replica_under_three_sentinels(compose: dict[str, Any]) -> None:
    services = compose["services"]
    servers = scripted_services(compose, "redis-start.sh")
    sentinels = scripted_services(compose, "sentinel-start.sh")
    assert len(servers) == 2 and len(sentinels) == 3
    for name in servers:
        env = services[name]["environment"]
        assert env["REDIS_SELF"] == name and env["REDIS_INITIAL_PRIMARY"] in servers
        assert endpoints(env["REDIS_SENTINELS"]) == [(sentinel, 26379) for sentinel in sentinels]
        script, _ = mounts(services[name])[services[name]["command"][-1]]
        assert Path(script) == DEPLOY / "redis" / "redis-start.sh"
    masters = {services[name]["environment"]["REDIS_MASTER_NAME"] for name in servers + sentinels}
    (master,) = masters
    for name in sentinels:
        env = services[name]["environment"]
        assert env["SENTINEL_SELF"] == name
        # The template is mounted read-only; Sentinel rewrites a copy elsewhere.
        template, mode = mounts(services[name])[env["SENTINEL_TEMPLATE"]]
        assert mode == "ro" and env.get("SENTINEL_CONF", "/data/sentinel.conf") != env["SENTINEL_TEMPLATE"]
        monitor = sentinel_monitor(Path(template).read_text())
        initial = services[servers[0]]["environment"]["REDIS_INITIAL_PRIMARY"]
        assert monitor == (master, initial, 6379, len(sentinels) // 2 + 1), name
        assert sentinel_port(Path(template).read_text()) == 26379


@pytest.mark.parametrize("stage", STAGES)
def test_compose_stages_are_given_every_node_and_every_sentinel(compose: dict[str, Any], stage: str) -> None:
    services = compose["services"]
    service = services[stage]
    settings = Settings.from_env(service["environment"])
    nodes = rabbitmq_services(compose)
    assert sorted(urlsplit(url).hostname or "" for url in settings.amqp_endpoints) == nodes
    assert settings.quorum_group_size == len(nodes)
    sentinels = scripted_services(compose, "sentinel-start.sh")
    servers = scripted_services(compose, "redis-start.sh")
    assert endpoints(settings.redis_sentinels) == [(sentinel, 26379) for sentinel in sentinels]
    assert settings.redis_master == services[sentinels[0]]["environment"]["REDIS_MASTER_NAME"]
    assert 1 <= settings.redis_wait_replicas <= len(servers) - 1
    assert {*nodes, *servers, *sentinels} <= set(service["depends_on"])


# -- the Redis start scripts, against stand-ins ---------------------------------------------------

SENTINEL_NAMES = ("sentinel-1", "sentinel-2", "sentinel-3")


@pytest.fixture
def stand_ins(tmp_path: Path) -> Path:
    """A PATH directory with a redis-cli that answers SENTINEL get-master-addr-by-name from
    answers/<host> (no file: that Sentinel does not answer) and records how it was asked, and a
    docker-entrypoint.sh that records what it was to start."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "answers").mkdir()
    (tmp_path / "data").mkdir()
    (bin_dir / "redis-cli").write_text(
        '#!/bin/sh\n'
        'echo "$*|auth=${REDISCLI_AUTH-unset}" >> "$STAND_INS/asked"\n'
        'host=$3\n'
        '[ -f "$STAND_INS/answers/$host" ] || exit 1\n'
        'cat "$STAND_INS/answers/$host"\n')
    (bin_dir / "docker-entrypoint.sh").write_text('#!/bin/sh\necho "$*" > "$STAND_INS/started"\n')
    for stand_in in bin_dir.iterdir():
        stand_in.chmod(0o755)
    return tmp_path


def run_script(stand_ins: Path, script: str, env: dict[str, str]) -> str:
    done = subprocess.run(["sh", str(DEPLOY / "redis" / script)], capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{stand_ins / 'bin'}:{os.environ['PATH']}", "STAND_INS": str(stand_ins), **env})
    assert done.returncode == 0, done.stderr
    return (stand_ins / "started").read_text().strip()


def start_redis(stand_ins: Path, self_name: str, answers: dict[str, str], **env: str) -> list[str]:
    for host, reply in answers.items():
        (stand_ins / "answers" / host).write_text(reply)
    conf = stand_ins / "data" / "redis.conf"
    started = run_script(stand_ins, "redis-start.sh", {
        "REDIS_SELF": self_name, "REDIS_INITIAL_PRIMARY": "redis-1", "REDIS_MASTER_NAME": "mailpipe",
        "REDIS_SENTINELS": ",".join(f"{host}:26379" for host in SENTINEL_NAMES), "REDIS_CONF": str(conf),
        "REDISCLI_AUTH": "the-probes-password", **env})
    assert started == f"redis-server {conf}"
    return conf.read_text().splitlines()


@pytest.mark.parametrize(("self_name", "answers", "replica_of"), [
    pytest.param("redis-1", {}, None, id="first start: the initial primary"),
    pytest.param("redis-2", {}, "redis-1 6379", id="first start: a replica of the initial primary"),
    pytest.param("redis-1", {"sentinel-2": "redis-2\n6379\n"}, "redis-2 6379",
                 id="after a failover: a replica of the promoted one, not a second primary"),
    pytest.param("redis-1", {"sentinel-1": "redis-1\n6379\n", "sentinel-2": "redis-2\n6379\n",
                             "sentinel-3": "redis-2\n6379\n"}, "redis-2 6379",
                 id="most Sentinels win over one still on its template"),
    pytest.param("redis-1", {"sentinel-1": "redis-1\n6379\n"}, None, id="restarted, and still the primary"),
    pytest.param("redis-2", {"sentinel-1": "ERR No such master with that name\n"}, "redis-1 6379",
                 id="an error is not an answer"),
])
def test_a_redis_server_takes_the_role_the_sentinels_give_it(stand_ins: Path, self_name: str,
                                                             answers: dict[str, str], replica_of: str | None) -> None:
    conf = start_redis(stand_ins, self_name, answers)
    replicaof = [line.split(" ", 1)[1] for line in conf if line.startswith("replicaof ")]
    assert replicaof == ([replica_of] if replica_of else [])
    for line in (f"replica-announce-ip {self_name}", "appendfsync always", "maxmemory-policy noeviction"):
        assert line in conf
    asked = (stand_ins / "asked").read_text().splitlines()
    assert [line.split()[2] for line in asked] == list(SENTINEL_NAMES), "every Sentinel is asked"
    assert all(line.endswith("|auth=unset") for line in asked), "the Sentinels have no password"


def test_a_redis_server_with_a_password_keeps_it_to_its_owner(stand_ins: Path) -> None:
    conf = start_redis(stand_ins, "redis-2", {}, REDIS_PASSWORD="0123abcd", REDIS_MAXMEMORY="1gb")
    assert {"requirepass 0123abcd", "masterauth 0123abcd", "maxmemory 1gb"} <= set(conf)
    assert (stand_ins / "data" / "redis.conf").stat().st_mode & 0o077 == 0


def test_a_sentinel_starts_from_the_template_once_and_keeps_what_it_learned(stand_ins: Path) -> None:
    template = stand_ins / "sentinel.conf"
    # The compose template, monitoring a name this machine resolves.
    template.write_text((DEPLOY / "redis" / "sentinel.conf").read_text().replace(" redis-1 ", " localhost "))
    conf = stand_ins / "data" / "sentinel.conf"
    env = {"SENTINEL_TEMPLATE": str(template), "SENTINEL_CONF": str(conf), "SENTINEL_SELF": "sentinel-1",
           "REDIS_MASTER_NAME": "mailpipe", "REDIS_PASSWORD": "0123abcd"}
    assert run_script(stand_ins, "sentinel-start.sh", env) == f"redis-server {conf} --sentinel"
    added = "sentinel announce-ip sentinel-1\nsentinel auth-pass mailpipe 0123abcd\n"
    assert conf.read_text() == template.read_text() + added
    assert conf.stat().st_mode & 0o077 == 0
    learned = conf.read_text().replace("localhost 6379", "redis-2 6379")  # as after a failover
    conf.write_text(learned)
    assert run_script(stand_ins, "sentinel-start.sh", env) == f"redis-server {conf} --sentinel"
    assert conf.read_text() == learned, "a restarted Sentinel keeps its rewritten config"


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


def test_the_send_rate_alert_measures_against_the_effective_rate(tmp_path: Path) -> None:
    """A server that pushed back is sent at its effective rate: no "below its limit" alert for
    that (MailpipeServerSlowedDown says it), nor while it is paused; below 80% of the effective
    rate while batches wait, the alert fires. promtool's rule unit tests, on series written here."""
    promtool = require_tool("promtool", "prometheus")
    sent_per_min = {"slow": 50, "cut": 50, "paused": 0}  # mails a minute, counter steps
    series = []
    for server, per_min in sent_per_min.items():
        series += [
            {"series": f'mailpipe_sender_mails_total{{server="{server}",outcome="sent"}}',
             "values": f"0+{per_min}x40"},
            {"series": f'mailpipe_server_limit_mails_per_hour{{server="{server}"}}', "values": "36000x40"},
            {"series": f'mailpipe_limiter_held_batches{{server="{server}"}}', "values": "3x40"},
            {"series": f'mailpipe_server_effective_rate_mails_per_hour{{server="{server}"}}',
             "values": f"{3000 if server == 'cut' else 36000}x40"},
            {"series": f'mailpipe_server_paused{{server="{server}"}}', "values": f"{int(server == 'paused')}x40"},
        ]
    tests = {"rule_files": [str(DEPLOY / "prometheus" / "rules.yml")], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": [{
                 "eval_time": "35m", "alertname": "MailpipeSendRateBelowLimit",
                 "exp_alerts": [{"exp_labels": {"server": "slow", "severity": "warning"}, "exp_annotations": {
                     "summary": "slow sends 3k mails/h, under 80 % of its limit, while batches wait",
                     "description": "See the dashboard's failures, refunds and grant-wait panels for why."}}]}]}]}
    path = tmp_path / "tests.yml"
    path.write_text(yaml.safe_dump(tests), encoding="utf-8")
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


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


def test_issue_23_is_seen_alerts_at_the_pause_thresholds_and_panels() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    exprs = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert "mailpipe_reputation_paused_tenants" in exprs["MailpipeTenantPaused"]
    defaults = Settings()
    assert str(defaults.reputation_warn_bounce_ratio) in exprs["MailpipeTenantBounceRateHigh"]
    assert str(defaults.reputation_warn_complaint_ratio) in exprs["MailpipeTenantComplaintRateHigh"]
    text = (DEPLOY / "grafana" / "mailpipe.json").read_text()
    for metric in ("mailpipe_bounces_total", "mailpipe_complaints_total", "mailpipe_unsubscribes_total",
                   "mailpipe_suppressions_total", "mailpipe_tenant_bounce_ratio", "mailpipe_inbound_reports_total"):
        assert metric in text, metric
