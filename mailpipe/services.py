"""Make sure RabbitMQ and Redis answer; start them if they are installed and stopped.

``python -m mailpipe.services`` is what ``make demo`` and ``make test`` run first.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

from mailpipe.settings import Settings, redact_url

START = {
    "RabbitMQ": ("rabbitmq-server", ["rabbitmq-server", "-detached"]),
    "Redis": ("redis-server", ["redis-server", "--daemonize", "yes", "--port", "6379", "--save", "",
                               "--appendonly", "no"]),
}


def reachable(url: str, timeout_s: float = 1.0) -> bool:
    parts = urlsplit(url)
    default = 5672 if parts.scheme.startswith("amqp") else 6379
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default), timeout_s):
            return True
    except OSError:
        return False


def _amqp_ready(url: str) -> bool:
    """The port opens before RabbitMQ accepts logins: try a real connection."""
    import pika
    import pika.exceptions
    from pika.adapters.utils.connection_workflow import AMQPConnectorException

    try:
        pika.BlockingConnection(pika.URLParameters(url)).close()
    except (pika.exceptions.AMQPError, AMQPConnectorException, OSError):
        # AMQPConnectorException: the handshake timed out (a broker still starting, or busy)
        return False
    return True


def ensure(settings: Settings, wait_s: float = 90.0, say: bool = True) -> list[str]:
    """Return the problems left (empty: both services answer)."""
    problems = []
    for name, url in (("RabbitMQ", settings.amqp_url), ("Redis", settings.redis_url)):
        if reachable(url):
            continue
        binary, command = START[name]
        if shutil.which(binary) is None:
            problems.append(f"{name} does not answer at {redact_url(url)} and {binary} is not installed")
            continue
        if say:
            print(f"{name} does not answer at {redact_url(url)}: starting it ({' '.join(command)})",
                  file=sys.stderr)
        subprocess.run(command, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + wait_s
        while not reachable(url) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not reachable(url):
            problems.append(f"{name} did not start within {wait_s:.0f} s")
    deadline = time.monotonic() + wait_s
    while reachable(settings.amqp_url) and not _amqp_ready(settings.amqp_url):
        if time.monotonic() > deadline:
            problems.append("RabbitMQ listens but does not accept connections")
            break
        time.sleep(1)
    return problems


def main() -> int:
    problems = ensure(Settings.from_env())
    for problem in problems:
        print(f"mailpipe: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
