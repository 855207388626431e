"""``Broker.abort()`` closes its TCP connection at once (issue 21, found by the fault campaign's
inbound test): after a dropped session, the deliveries it held unacked go back to their queue
within a second, for this replica's next session or another replica, and the dead session's
consumer takes no more messages.

Before, pika closed the socket only in a callback of the old connection's I/O loop, which never
ran again: the broker saw a live connection until the garbage collector got to it or the
heartbeat timed out (about 90 s at a 30 s heartbeat), holding the deliveries and taking new
ones into a socket nobody read. The test keeps a reference to the old connection, as anything
may (a traceback, a channel), so that it does not depend on when the collector runs.
"""

from __future__ import annotations

import time

import pika
import pytest

from mailpipe.amqp import Broker, Delivery, Outgoing
from mailpipe.settings import Settings
from mailpipe.topology import Topology

pytestmark = pytest.mark.integration

MESSAGES = 10
TAKEN_OVER_S = 2.0


def test_abort_gives_the_unacked_deliveries_back_at_once(settings: Settings) -> None:
    topology = Topology.from_settings(settings)
    first = Broker(settings.amqp_url, client_name="test-aborted").connect()
    topology.declare(first.channel())
    first.publish([Outgoing(topology.jobs, f"m{i}".encode(), message_id=f"m{i}") for i in range(MESSAGES)])
    first.consume(topology.jobs, MESSAGES)
    held: list[Delivery] = []
    deadline = time.monotonic() + 10
    while len(held) < MESSAGES and time.monotonic() < deadline:
        held += first.poll(0.2)
    assert len(held) == MESSAGES, "the first consumer did not get every message"

    old = first._conn  # as a traceback or a channel may hold it: no help from the garbage collector
    first.abort()
    aborted = time.monotonic()

    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = conn.channel()
    taken: list[bytes] = []
    while len(taken) < MESSAGES and time.monotonic() - aborted < TAKEN_OVER_S:
        method, _props, body = channel.basic_get(topology.jobs, auto_ack=True)
        if method is None:
            time.sleep(0.05)
        else:
            taken.append(body)
    # A new message goes to the live consumer, not into the aborted session's socket.
    channel.basic_publish("", topology.jobs, b"later")
    time.sleep(0.2)
    method, _props, body = channel.basic_get(topology.jobs, auto_ack=True)
    conn.close()
    assert old is not None
    assert sorted(taken) == sorted(d.body for d in held), \
        f"{len(taken)} of {MESSAGES} unacked deliveries back within {TAKEN_OVER_S} s of abort()"
    assert body == b"later", "the aborted session's consumer still took messages"
