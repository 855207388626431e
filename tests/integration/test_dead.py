"""``mailpipe dead list|show ID|replay``: failed mail is visible with its reason, filterable by
reason and tenant, and sent again once the tenant's server accepts it."""

from __future__ import annotations

from pathlib import Path

import pika
import pytest

from mailpipe import cli, dead
from mailpipe.model import IntakeRequest, new_id, now_ms
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from tests.faults.harness import LedgerPeer, Pipeline, ledger, publish, wait_until
from tests.stages import settings_env

pytestmark = pytest.mark.integration


def servers(settings: Settings, port: int) -> None:
    Path(settings.servers_file).write_text(
        f'[servers.tenant-smtp]\naddress = "[127.0.0.1]:{port}"\ntls = "none"\nunlimited = true\n'
        '[tenants.acme]\nserver = "tenant-smtp"\n[tenants.globex]\nserver = "tenant-smtp"\n', encoding="utf-8")


def request(tenant: str, to: str) -> IntakeRequest:
    return IntakeRequest(id=new_id(), tenant=tenant, sender=f"hr@{tenant}.example", created_ms=now_ms(),
                         to=(to,), subject="Interview", text="See you on Monday.\n")


def dead_count(settings: Settings) -> int:
    with dead.DeadQueue(settings) as queue:
        return queue.count()


def reasons(settings: Settings) -> list[str]:
    with dead.DeadQueue(settings) as queue:
        return ["msgpack" if "msgpack" in d.reason else "relaying denied" if "Relaying" in d.reason else d.reason
                for d in queue.letters()]


def test_list_show_and_replay_by_tenant_after_the_server_is_fixed(
        settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in settings_env(settings).items():
        if key.startswith("MAILPIPE_"):
            monkeypatch.setenv(key, value)  # the command line reads its settings from the environment
    with LedgerPeer() as peer:
        servers(settings, peer.port)
        peer.refuse(lambda address: address.startswith("blocked"), 550, "5.7.1 Relaying denied")
        with Pipeline(settings, tmp_path) as pipeline:
            acme = publish(settings, [request("acme", "blocked1@example.com"),
                                      request("acme", "blocked2@example.com")])
            globex = publish(settings, [request("globex", "blocked3@example.com")])
            ok = publish(settings, [request("acme", "fine@example.com")])
            # Garbage on the intake queue: dead-lettered by the producer, no job id in it.
            conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
            conn.channel().basic_publish("", Topology(settings.namespace).intake, b"\xc1not msgpack")
            conn.close()
            wait_until(lambda: dead_count(settings) >= 4, 60, "four dead letters", pipeline)

            assert cli.main(["dead", "list"]) == 0
            out = capsys.readouterr().out
            assert out.startswith("4 dead letter(s)")
            for job in (*acme, *globex):
                assert job in out
            assert "Relaying denied" in out and "not valid msgpack" in out

            assert cli.main(["dead", "list", "--tenant", "globex"]) == 0
            out = capsys.readouterr().out
            assert globex[0] in out and acme[0] not in out and acme[1] not in out

            assert cli.main(["dead", "list", "--reason", "msgpack"]) == 0
            out = capsys.readouterr().out
            assert "showing 1:" in out and "Relaying" not in out

            assert cli.main(["dead", "show", acme[0][:10]]) == 0
            out = capsys.readouterr().out
            assert f"ID          {acme[0]}" in out
            assert "550" in out and "5.7.1 Relaying denied" in out
            assert "blocked1@example.com" in out and "tenant      acme" in out
            assert "replays to  " + Topology(settings.namespace).jobs in out
            assert cli.main(["dead", "show", "0000000000"]) == 1

            # The tenant fixed their server: replay acme's mail only.
            peer.reset()
            assert cli.main(["dead", "replay", "--tenant", "acme"]) == 0
            wait_until(lambda: set(acme) <= peer.accepted_jobs(), 60, "the replayed mail", pipeline)
            assert dead_count(settings) == 2, "globex's mail and the garbage stay dead"
            assert cli.main(["dead", "replay", "--reason", "msgpack"]) == 0
            assert "replayed 1 dead letter(s)" in capsys.readouterr().err
            # Replayed to the intake queue, the garbage is refused again: dead, not lost.
            wait_until(lambda: sorted(reasons(settings)) == ["msgpack", "relaying denied"], 30,
                       "the garbage back in the dead-letter queue", pipeline)
        report = ledger(settings, peer, [*acme, *globex, *ok])
    assert sorted(report.failed) == globex, report.summary()
    assert not report.lost and not report.duplicated and not report.unexpected, report.summary()
