"""The local cluster of ``mailpipe cluster up`` (mailpipe.devcluster), started on free ports: three
RabbitMQ nodes that form one cluster and replicate a quorum queue on all three, and Redis whose
Sentinels promote the replica when the primary is killed. ``down`` leaves no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pika
import pytest
import redis

from mailpipe.devcluster import RABBIT_BIN, LocalCluster, free_ports, missing_binaries

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

QUEUE = "devcluster-test"


def running(pid: int) -> bool:
    """``pid`` is a process that has not exited (a zombie waiting to be reaped has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


@pytest.fixture
def cluster(tmp_path: Path) -> LocalCluster:
    if missing := missing_binaries():
        what = f"not installed: {', '.join(missing)}: the local cluster cannot start"
        if os.environ.get("CI"):
            pytest.fail(f"{what} (CI is set: a test that needs it must not be skipped)")
        pytest.skip(what)
    ports = free_ports(11)
    return LocalCluster(tmp_path / "cluster", rabbit_ports=ports[0:3], dist_ports=ports[3:6],
                        redis_ports=ports[6:8], sentinel_ports=ports[8:11])


def quorum_members(cluster: LocalCluster, node: int) -> list[str]:
    out = subprocess.run([str(RABBIT_BIN / "rabbitmq-queues"), "-n", cluster.rabbit_node(node), "quorum_status",
                          QUEUE, "--formatter", "json"], env=cluster.rabbit_env(node), capture_output=True,
                         text=True, timeout=60, check=True)
    return sorted(row["Node Name"] for row in json.loads(out.stdout))


def test_cluster_forms_replicates_fails_over_and_goes_down(cluster: LocalCluster) -> None:
    started = time.monotonic()
    assert cluster.up()
    up_s = time.monotonic() - started
    print(f"LocalCluster.up() took {up_s:.1f} s")
    pids: list[int] = []
    try:
        pids = cluster.pids()
        assert not cluster.up(), "a second up on a running cluster must do nothing"

        # Three nodes, as the last one to join sees the cluster.
        nodes = sorted(cluster.rabbit_node(i) for i in range(3))
        assert sorted(cluster.cluster_status(2)["running_nodes"]) == nodes

        # A quorum queue declared on one node has a member on every node.
        conn = pika.BlockingConnection(pika.URLParameters(cluster.amqp_urls()[1]))
        try:
            conn.channel().queue_declare(QUEUE, durable=True, arguments={
                "x-queue-type": "quorum", "x-quorum-initial-group-size": 3})
        finally:
            conn.close()
        assert quorum_members(cluster, 0) == nodes

        # Every Sentinel names the primary; the replica holds what the primary was given.
        primary, replica = cluster.redis_ports
        assert cluster.redis_primary() == primary
        assert all(port == primary for port in (cluster.sentinel_primary(s) for _h, s in cluster.sentinels()))
        with redis.Redis(host="127.0.0.1", port=primary) as client:
            client.set("devcluster:key", "kept")
            assert client.wait(1, 5000) == 1  # the replica has it
        with redis.Redis(host="127.0.0.1", port=replica) as client:
            assert client.get("devcluster:key") == b"kept"

        # kill -9 the primary: the Sentinels promote the replica, which kept the key.
        killed_at = time.monotonic()
        assert cluster.kill_redis_primary() == primary
        assert cluster.wait_for_new_primary(primary, timeout_s=15) == replica
        print(f"Sentinel promoted Redis {replica} {time.monotonic() - killed_at:.1f} s after the kill")
        with redis.Redis(host="127.0.0.1", port=replica) as client:
            assert client.get("devcluster:key") == b"kept"

        env = cluster.env()
        assert env["MAILPIPE_AMQP_URLS"].split(",") == cluster.amqp_urls()
        assert env["MAILPIPE_QUORUM_GROUP_SIZE"] == "3"
    finally:
        cluster.down()
    left = [pid for pid in pids if running(pid)]
    assert pids and not left, f"processes left after down(): {left}"
    assert not cluster.running()
