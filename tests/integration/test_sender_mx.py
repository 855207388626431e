"""MX lookups for a bare server host name, against a small DNS server of the test's own on loopback."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from mailpipe.errors import SmtpPermanent
from mailpipe.servers import ServerConfig, parse_address, parse_config
from sender.mx import MxResolver, order
from sender.smtp import open_connection
from tests.smtp_peer import SmtpPeer

pytestmark = pytest.mark.integration


class TinyDns:
    """Answers MX queries from ``records`` (name -> [(preference, host)]); other names: NXDOMAIN."""

    def __init__(self, records: dict[str, list[tuple[int, str]]]) -> None:
        self.records = {name.rstrip(".").lower(): mx for name, mx in records.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)  # so that the thread notices the stop flag
        self._stop = threading.Event()
        self.port: int = self.sock.getsockname()[1]
        self.queries: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            name = question.name.to_text(omit_final_dot=True).lower()
            self.queries.append(name)
            if name not in self.records:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif self.records[name]:
                rrset = dns.rrset.from_text(question.name, 60, dns.rdataclass.IN, dns.rdatatype.MX,
                                            *(f"{pref} {host}" for pref, host in self.records[name]))
                response.answer.append(rrset)
            self.sock.sendto(response.to_wire(), peer)

    def __enter__(self) -> TinyDns:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def peer() -> Iterator[SmtpPeer]:
    with SmtpPeer() as p:
        yield p


def server(address: str) -> ServerConfig:
    return parse_config({"servers": {"s": {"address": address, "tls": "none"}}}, "t", {}).servers["s"]


def connect(srv: ServerConfig, dns_port: int) -> None:
    async def go() -> None:
        conn = await open_connection(srv, timeout_s=5, resolver=MxResolver(["127.0.0.1"], dns_port))
        await conn.quit()
    asyncio.run(go())


def test_bare_host_uses_its_mx_records_by_preference(peer: SmtpPeer) -> None:
    # The preferred MX cannot be reached (its name does not resolve); the next, "localhost", is the peer.
    with TinyDns({"acme.test": [(20, "localhost."), (10, "nowhere.invalid.")]}) as dns_server:
        connect(server(f"acme.test:{peer.port}"), dns_server.port)
    assert dns_server.queries == ["acme.test"]
    assert peer.connections == 1


def test_bare_host_without_mx_is_the_host_itself(peer: SmtpPeer) -> None:
    with TinyDns({}) as dns_server:
        connect(server(f"localhost:{peer.port}"), dns_server.port)
    assert dns_server.queries == ["localhost"]
    assert peer.connections == 1


def test_bracketed_host_is_not_looked_up(peer: SmtpPeer) -> None:
    with TinyDns({"localhost": [(10, "nowhere.invalid.")]}) as dns_server:
        connect(server(f"[localhost]:{peer.port}"), dns_server.port)
    assert dns_server.queries == []
    assert peer.connections == 1


def test_null_mx_refuses_the_domain() -> None:
    with TinyDns({"nomail.test": [(0, ".")]}) as dns_server, pytest.raises(SmtpPermanent) as info:
        connect(server("nomail.test:25"), dns_server.port)
    assert "null MX" in info.value.reason


def test_order_shuffles_only_within_a_preference() -> None:
    seen = set()
    for _ in range(50):
        hosts = order("d", [(10, "a"), (10, "b"), (5, "first"), (20, "last")])
        assert hosts[0] == "first" and hosts[-1] == "last"
        seen.add(tuple(hosts[1:3]))
    assert seen == {("a", "b"), ("b", "a")}
    assert order("d", []) == ["d"]
    assert parse_address("acme.test").mx_lookup and not parse_address("[acme.test]").mx_lookup
