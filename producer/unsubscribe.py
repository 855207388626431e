"""One-click unsubscribe for bulk mail (RFC 8058; Gmail's and Yahoo's rule for bulk senders since
2024): ``List-Unsubscribe: <https://...>, <mailto:...>`` and ``List-Unsubscribe-Post:
List-Unsubscribe=One-Click``, added before the DKIM signature (which covers both). The link's
token holds the tenant, the job and the recipient, sealed and signed (mailpipe/verp.py); the
inbound stage serves it (inbound/unsubscribe.py) and takes the mailto address.
"""

from __future__ import annotations

import re

from mailpipe.verp import UNSUBSCRIBE, Signer

_HAS_LIST_UNSUBSCRIBE = re.compile(rb"(?im)^list-unsubscribe\s*:")


def headers(signer: Signer, tenant: str, job_id: str, recipient: str, *, url: str, mailto_domain: str) -> bytes:
    """The header lines (CRLF, folded) for one recipient's mail; b"" when there is nowhere to
    unsubscribe (neither an endpoint URL nor a return-path domain)."""
    targets = []
    if url:
        targets.append(f"<{url.rstrip('/')}/{signer.link_token(tenant, job_id, recipient)}>")
    if mailto_domain:
        local = signer.local_part(UNSUBSCRIBE, tenant, job_id, recipient)
        targets.append(f"<mailto:{local}@{mailto_domain}?subject=unsubscribe>")
    if not targets:
        return b""
    lines = "List-Unsubscribe: " + ",\r\n ".join(targets) + "\r\n"
    if url:  # one-click is an HTTPS POST: without the endpoint, the mailto only
        lines += "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    return lines.encode("ascii")


def has_list_unsubscribe(message: bytes) -> bool:
    """Whether a message's header section already has a List-Unsubscribe (a raw mail's own)."""
    end = message.find(b"\r\n\r\n")
    return _HAS_LIST_UNSUBSCRIBE.search(message[: end if end >= 0 else len(message)]) is not None
