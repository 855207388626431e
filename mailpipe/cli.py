"""The ``mailpipe`` command: the only place that reaches into every stage, to start it."""

from __future__ import annotations

import argparse
import importlib
import sys

from mailpipe import stages
from mailpipe.errors import ConfigError, MailpipeError
from mailpipe.settings import Settings


def cmd_run(args: argparse.Namespace) -> int:
    from mailpipe.stage import main as stage_main

    argv = ["--metrics-port", str(args.metrics_port)] if args.metrics_port else []
    if args.burst:
        argv.append("--burst")
    return stage_main(stages.load(args.stage), argv)


def cmd_topology(args: argparse.Namespace) -> int:
    from mailpipe.amqp import Broker
    from mailpipe.topology import Topology

    settings = Settings.from_env()
    topology = Topology.from_settings(settings)
    broker = Broker(settings.amqp_endpoints, client_name="mailpipe-topology").connect()
    try:
        topology.declare(broker.channel())
    finally:
        broker.close()
    print(f"declared {len(topology.all_queues)} queues and the {topology.events} exchange")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mailpipe.demo import run_demo

    return run_demo(args.mails, args.size, args.rate, args.json)


def cmd_servers_check(args: argparse.Namespace) -> int:
    from mailpipe.servers import load_config

    config = load_config(Settings.from_env().servers_path)
    check = importlib.import_module("sender.check")
    return check.check_servers(config, args.names)  # type: ignore[no-any-return]


def cmd_servers_pace(args: argparse.Namespace) -> int:
    """``mailpipe servers pause NAME`` / ``resume NAME``: in Redis, for every replica at once."""
    from mailpipe import pushback, redis_client
    from mailpipe.servers import load_config

    settings = Settings.from_env()
    config = load_config(settings.servers_path)
    if args.name not in config.servers:
        print(f"mailpipe: unknown server {args.name!r}: the servers file names {', '.join(sorted(config.servers))}",
              file=sys.stderr)
        return 2
    client = redis_client.connect(settings)
    try:
        pace = pushback.Pushback(client, settings.namespace)
        policy = pushback.Policy.of(config.servers[args.name], settings)
        reason = args.reason or f"by hand ({args.servers_command})"
        changes = (pace.pause if args.servers_command == "pause" else pace.resume)(args.name, policy, reason)
    finally:
        client.close()
    if changes:
        _tell_tenants(settings, args.name, [t.name for t in config.tenants.values() if args.name in t.servers],
                      changes[0].kind)
    if args.servers_command == "pause":
        print(f"{args.name}: paused: its mail waits in its lanes until `mailpipe servers resume {args.name}`")
    elif changes:
        print(f"{args.name}: resumed at {changes[0].after:g} mails/hour")
    else:
        print(f"{args.name}: was not paused")
    return 0


def _tell_tenants(settings: Settings, server: str, tenants: list[str], what: str) -> None:
    """The same ``paused.<tenant>`` / ``resumed.<tenant>`` events as a change the senders make."""
    from mailpipe.amqp import Broker
    from mailpipe.errors import BrokerUnavailable
    from mailpipe.pushback import tenant_events
    from mailpipe.topology import Topology

    if not tenants:
        return
    events = tenant_events(Topology.from_settings(settings).events, server, tenants, what, "")
    try:
        broker = Broker(settings.amqp_url, client_name="mailpipe-servers").connect()
        try:
            broker.publish(events)
        finally:
            broker.close()
    except BrokerUnavailable as exc:
        print(f"mailpipe: {server} was {what}, but its tenants could not be told: {exc.reason}", file=sys.stderr)


def cmd_status(args: argparse.Namespace) -> int:
    import redis

    from mailpipe import redis_client, reputation
    from mailpipe.lanes import known_queues
    from mailpipe.servers import load_config
    from mailpipe.status import show_status

    settings = Settings.from_env()
    limiter_status = importlib.import_module("limiter.status")
    client = redis_client.connect(settings)
    try:
        config = load_config(settings.servers_path)
        limits = limiter_status.snapshot(client, settings.namespace, config, settings=settings)
        limits += limiter_status.fair_rows(client, settings.namespace, config)
        paused = {p.tenant: p.reason for p in reputation.paused_tenants(client, settings.namespace).values()}
        lanes = known_queues(client, settings.namespace)
    except (redis.RedisError, MailpipeError) as exc:
        why = exc.reason if isinstance(exc, MailpipeError) else f"Redis unreachable: {type(exc).__name__}"
        limits = [{"limiter": why}]
        paused, lanes = {}, set()
    finally:
        client.close()
    return show_status(settings, limits, as_json=args.json, paused=paused, lanes=lanes, all_queues=args.queues)


def cmd_status_watch(args: argparse.Namespace) -> int:
    """``status --watch``: the same table, redrawn until Ctrl-C."""
    import time

    if args.watch is None:
        return cmd_status(args)
    try:
        while True:
            if not args.json:
                print("\033[H\033[2J" + time.strftime("%H:%M:%S"), flush=True)  # clear the terminal
            cmd_status(args)
            time.sleep(max(0.5, args.watch))
    except KeyboardInterrupt:
        return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mailpipe.report import report

    drawn = report(args.prometheus, Path(args.out), minutes=args.minutes,
                   scrape_interval_s=args.scrape_interval_s)
    print(f"wrote {args.out}: {drawn['send_rate_series']} send-rate series, "
          f"{drawn['queue_series']} queue series")
    return 0


def cmd_dead(args: argparse.Namespace) -> int:
    from mailpipe import dead

    settings = Settings.from_env()
    if args.action == "list":
        return dead.list_dead(settings, limit=args.limit, reason=args.reason, tenant=args.tenant)
    if args.action == "show":
        if not args.id:
            print("mailpipe: dead show needs an ID (from `mailpipe dead list`)", file=sys.stderr)
            return 2
        return dead.show(settings, args.id)
    return dead.replay(settings, reason=args.reason, tenant=args.tenant, id=args.id)


def cmd_suppression(args: argparse.Namespace) -> int:
    from mailpipe import redis_client, suppression

    settings = Settings.from_env()
    client = redis_client.connect(settings)
    try:
        if args.action in ("add", "remove"):
            if not (args.tenant and args.recipient):
                print(f"mailpipe suppression {args.action}: give --tenant and the RECIPIENT", file=sys.stderr)
                return 2
            if args.action == "add":
                added = suppression.add(client, settings.namespace, args.tenant, args.recipient, args.reason or "")
                print(f"{args.recipient}: {'suppressed until lifted' if added else 'was suppressed already'}")
                return 0
            removed = suppression.remove(client, settings.namespace, args.tenant, args.recipient)
            print(f"{args.recipient}: {'no longer suppressed' if removed else 'was not suppressed'}")
            return 0
        rows = suppression.list_suppressed(client, settings.namespace, args.tenant)
    finally:
        client.close()
    print(f"{len(rows)} suppressed recipient(s)")
    for row in rows:
        left = "until lifted" if row.expires_in_s < 0 else f"{row.expires_in_s // 86400:>3} d left"
        print(f"{row.tenant:16} {row.recipient:40} {row.kind:12} {left:>12}  {row.reason}")
    return 0


def cmd_tenants(args: argparse.Namespace) -> int:
    """``mailpipe tenants list|resume|pause``: the tenants paused for hurting everyone's deliverability."""
    from mailpipe import redis_client, reputation
    from mailpipe.model import now_ms

    settings = Settings.from_env()
    client = redis_client.connect(settings)
    try:
        if args.action in ("resume", "pause") and not args.name:
            print(f"mailpipe tenants {args.action}: give the tenant's NAME", file=sys.stderr)
            return 2
        if args.action == "resume":
            was = reputation.resume(client, settings.namespace, args.name)
            print(f"{args.name}: {'resumed' if was else 'was not paused'} (its bounce and complaint window starts "
                  "afresh)")
            return 0
        if args.action == "pause":
            reputation.pause(client, settings.namespace, args.name, args.reason or "paused by hand", now_ms())
            print(f"{args.name}: bulk mail to shared servers paused until `mailpipe tenants resume {args.name}`")
            return 0
        paused = reputation.paused_tenants(client, settings.namespace)
    finally:
        client.close()
    print(f"{len(paused)} paused tenant(s)")
    for pause in paused.values():
        print(f"{pause.tenant:16} {pause.reason}")
    return 0


def cmd_reports(args: argparse.Namespace) -> int:
    """``mailpipe reports list|show``: the raw reports the inbound stage kept (30 days)."""
    import time

    from mailpipe import archive

    settings = Settings.from_env()
    if args.action == "show":
        if not args.id:
            print("mailpipe reports show: give the report's ID (from `mailpipe reports list` or an event)",
                  file=sys.stderr)
            return 2
        rows = archive.read(settings, report_id=args.id, limit=1)
        if not rows:
            print(f"no report {args.id} in the last {settings.reports_keep_days} days", file=sys.stderr)
            return 1
        sys.stdout.write(rows[0].data.decode("utf-8", "replace"))
        return 0
    rows = archive.read(settings, tenant=args.tenant, since_s=args.days * 86400, limit=args.limit)
    print(f"{len(rows)} report(s)")
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row.received_ms / 1000))
        print(f"{when}  {row.id}  {row.tenant or '-':16} {row.kind:10} from {row.mail_from or '<>'} ({row.peer})")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from mailpipe.devcluster import command

    return command(args.action, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one stage (any number of replicas may run)")
    run.add_argument("stage", choices=stages.NAMES)
    run.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz, /readyz on this port")
    run.add_argument("--burst", action="store_true", help="exit once the input queue is drained")
    run.set_defaults(func=cmd_run)

    sub.add_parser("topology", help="declare every queue and exchange (idempotent)").set_defaults(
        func=cmd_topology)

    demo = sub.add_parser("demo", help="run the whole pipeline locally, end to end")
    demo.add_argument("--mails", type=int, default=1000, help="how many mails to send (default 1000)")
    demo.add_argument("--size", type=int, default=2048, help="body size of each mail in bytes")
    demo.add_argument("--rate", type=int, default=None, metavar="PER_HOUR",
                      help="enforce this rate (default: lifted for the demo)")
    demo.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    demo.set_defaults(func=cmd_demo)

    servers = sub.add_parser("servers", help="SMTP servers of the servers file")
    servers_sub = servers.add_subparsers(dest="servers_command", required=True)
    check = servers_sub.add_parser("check", help="connect, negotiate TLS, authenticate, now")
    check.add_argument("names", nargs="*", metavar="NAME", help="servers to check (default: all)")
    check.set_defaults(func=cmd_servers_check)
    for action, text in (("pause", "stop releasing mail to a server (its mail waits; no probe resumes it)"),
                         ("resume", "release mail to a paused server again, at once (its password fixed, say)")):
        command = servers_sub.add_parser(action, help=text)
        command.add_argument("name", metavar="NAME")
        command.add_argument("--reason", help="why, for the status and the logs")
        command.set_defaults(func=cmd_servers_pace)

    status = sub.add_parser("status", help="servers (state, effective rate, backlog), tenants, queues at a glance")
    status.add_argument("--json", action="store_true")
    status.add_argument("--queues", action="store_true",
                        help="every queue on its own line (the retry, scheduled and lane queues are folded otherwise)")
    status.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                        help="redraw every SECONDS (default 2) until Ctrl-C")
    status.set_defaults(func=cmd_status_watch)

    report = sub.add_parser("report", help="draw the send rate and queue depths of a Prometheus into a PNG")
    report.add_argument("prometheus", metavar="PROMETHEUS_URL", help="e.g. http://127.0.0.1:9090")
    report.add_argument("--out", default="mailpipe-report.png", help="the PNG to write")
    report.add_argument("--minutes", type=float, default=60.0, help="how far back (default 60)")
    report.add_argument("--scrape-interval-s", type=float, default=15.0,
                        help="Prometheus's scrape interval, for the rate window (default 15)")
    report.set_defaults(func=cmd_report)

    dead = sub.add_parser("dead", help="mail that failed: list it, show one, replay it")
    dead.add_argument("action", choices=("list", "show", "replay"))
    dead.add_argument("id", nargs="?", metavar="ID", help="show/replay: a dead letter's ID or job id")
    dead.add_argument("--limit", type=int, default=50)
    dead.add_argument("--reason", help="only mail whose reason or category contains this")
    dead.add_argument("--tenant", help="only this tenant's mail")
    dead.set_defaults(func=cmd_dead)

    supp = sub.add_parser("suppression", help="recipients suppressed for a tenant (bounces, complaints, "
                          "unsubscribes, by hand)")
    supp.add_argument("action", choices=("list", "add", "remove"))
    supp.add_argument("recipient", nargs="?", help="the address to add or remove")
    supp.add_argument("--tenant", help="only this tenant (required for add and remove)")
    supp.add_argument("--reason", help="add: why (shown in the list and the intake's refusal)")
    supp.set_defaults(func=cmd_suppression)

    tenants = sub.add_parser("tenants", help="tenants paused for their bounce or complaint rate on shared servers")
    tenants.add_argument("action", choices=("list", "resume", "pause"))
    tenants.add_argument("name", nargs="?", metavar="NAME", help="the tenant to resume or pause")
    tenants.add_argument("--reason", help="pause: why")
    tenants.set_defaults(func=cmd_tenants)

    reports = sub.add_parser("reports", help="the raw bounce, complaint and unsubscribe reports the inbound stage kept")
    reports.add_argument("action", choices=("list", "show"))
    reports.add_argument("id", nargs="?", metavar="ID", help="show: the report's id")
    reports.add_argument("--tenant", help="list: only this tenant's")
    reports.add_argument("--days", type=float, default=30.0, help="list: how far back (default 30)")
    reports.add_argument("--limit", type=int, default=200)
    reports.set_defaults(func=cmd_reports)

    cluster = sub.add_parser("cluster", help="a local 3-node RabbitMQ cluster and Redis with Sentinel, for "
                             "development (in $MAILPIPE_CLUSTER_DIR, default .cluster/)")
    cluster.add_argument("action", choices=("up", "down", "status", "env"),
                         help="env: export lines for a shell, eval \"$(mailpipe cluster env)\"")
    cluster.add_argument("--json", action="store_true", help="status as one JSON object")
    cluster.set_defaults(func=cmd_cluster)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"mailpipe: {exc.reason}", file=sys.stderr)
        return 2
    except MailpipeError as exc:
        print(f"mailpipe: {exc.reason}", file=sys.stderr)
        return 1
    return code
