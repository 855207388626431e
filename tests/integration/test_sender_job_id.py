"""A reused job id (issue 21, item 7): a tenant that reuses an id (an order number) for a second
mail to the same recipient got it skipped as sent, with a "sent" event. A mail is named by its
tenant, id and created_ms (docs/wire-format.md, 2.8): a second mail under an old id is its own
mail; the same request again (the same id and created_ms: a publisher's retry, or a request the
enqueue stage read twice and rendered twice, with another MIME boundary or DKIM timestamp) is
the same mail, sent once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mailpipe.settings import Settings
from tests.integration.test_sender import Bus, by_outcome, granted, make_job, run_sender, write_servers
from tests.smtp_peer import SmtpPeer

pytestmark = pytest.mark.integration

RECIPIENT = "buyer@example.com"


@pytest.fixture
def bus(settings: Settings) -> Iterator[Bus]:
    b = Bus(settings)
    yield b
    b.conn.close()


def test_a_second_mail_under_a_reused_id_is_delivered(settings: Settings, bus: Bus) -> None:
    confirmed = make_job(RECIPIENT, id="order-1234", created_ms=1_767_225_600_000, body=b"Order confirmed.\r\n")
    shipped = make_job(RECIPIENT, id="order-1234", created_ms=1_767_312_000_000, body=b"Order shipped.\r\n")
    with SmtpPeer() as peer:
        write_servers(settings, peer.port)
        bus.send(granted([confirmed]))
        run_sender(settings)
        bus.send(granted([shipped]))
        run_sender(settings)
        bodies = [m.content.split(b"\r\n\r\n", 1)[1] for m in peer.messages]
    assert bodies == [b"Order confirmed.\r\n", b"Order shipped.\r\n"], "the second mail was skipped as sent"
    events = bus.events()
    assert by_outcome(events) == {"sent": [RECIPIENT, RECIPIENT]}
    assert sorted(e.created_ms for e in events) == [confirmed.created_ms, shipped.created_ms]


def test_the_same_request_rendered_twice_is_sent_once(settings: Settings, bus: Bus) -> None:
    first = make_job(RECIPIENT, id="r-1", created_ms=1_767_225_600_000, body=b"--=_boundary_one\r\n")
    again = make_job(RECIPIENT, id="r-1", created_ms=1_767_225_600_000, body=b"--=_boundary_two\r\n")
    with SmtpPeer() as peer:
        write_servers(settings, peer.port)
        bus.send(granted([first]))
        run_sender(settings)
        bus.send(granted([again]))
        run_sender(settings)
        assert peer.recipients() == [RECIPIENT]
