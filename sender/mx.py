"""Where to connect for a server address, as Postfix does it.

``[host]`` (or an IP address) means that host, no MX lookup. A bare ``host`` may be a mail
domain: its MX records are looked up and tried by preference (equal preferences in random
order, RFC 5321 5.1); with no MX record the host itself is used. A "null MX" (RFC 7505: one
record for ".") says the domain accepts no mail.
"""

from __future__ import annotations

import random

import dns.asyncresolver
import dns.exception
import dns.rdtypes.ANY.MX
import dns.resolver

from mailpipe.errors import SmtpPermanent, SmtpTransient
from mailpipe.servers import Address
from sender.replies import ReplyCategory


class MxResolver:
    """MX lookups with dnspython; ``nameservers``/``port`` point it at a test server."""

    def __init__(self, nameservers: list[str] | None = None, port: int = 53, timeout_s: float = 5.0) -> None:
        if nameservers is None:
            self.resolver = dns.asyncresolver.Resolver()
        else:
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            self.resolver.nameservers = nameservers
            self.resolver.port = port
        self.resolver.lifetime = timeout_s

    async def hosts(self, address: Address) -> list[str]:
        """The hosts to try, in order."""
        if not address.mx_lookup:
            return [address.host]
        try:
            answer = await self.resolver.resolve(address.host, "MX")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [address.host]  # no MX: the name is the host itself
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise SmtpTransient(f"DNS: MX lookup for {address.host} failed: {exc}",
                                text=f"MX lookup for {address.host} failed", category=ReplyCategory.CONNECTION) from exc
        records = [r for r in answer if isinstance(r, dns.rdtypes.ANY.MX.MX)]
        return order(address.host, [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in records])


def order(domain: str, records: list[tuple[int, str]]) -> list[str]:
    """MX hosts by preference, shuffled within a preference; a null MX refuses the domain."""
    if any(host in ("", ".") for _, host in records):
        raise SmtpPermanent(f"{domain} publishes a null MX: it accepts no mail", code=556,
                            text=f"5.1.10 {domain} does not accept mail (null MX)", category=ReplyCategory.OTHER)
    if not records:
        return [domain]
    shuffled = list(records)
    random.shuffle(shuffled)
    shuffled.sort(key=lambda r: r[0])  # stable: equal preferences keep their random order
    hosts: list[str] = []
    for _, host in shuffled:
        if host.lower() not in hosts:
            hosts.append(host.lower())
    return hosts
