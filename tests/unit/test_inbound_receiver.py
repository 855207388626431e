"""The inbound receiver without a server (inbound/receiver.py): its own reading of MAIL and RCPT
addresses (``_SMTP``) gives aiosmtpd's answer for every input, the plain addresses it reads
itself and the rest; a look-alike of a return path is refused at RCPT."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import example, given, settings
from hypothesis import strategies as st

from inbound.publisher import Publisher
from inbound.receiver import _SMTP, Handler
from mailpipe.settings import Settings
from mailpipe.topology import Topology
from mailpipe.verp import Signer, Token

PIECES = st.sampled_from([*"abcXYZ019.-_+=!#$%&'*/?^`{|}~", "@", "<", ">", "(", ")", "[", "]", '"', "\\", " ", "\t",
                          "\x0c", "\xa0", "\u3000", "ü", ":", ",", ";", "\n", "\r", "\x00", "SIZE=100", "<>",
                          "bounces.example.net", "bbeae7tmcfmz23rms6fpigp2vr6z6w62kkmhcdnjg76wfzgb3v5uwfpbme4"])
TEXT = st.lists(PIECES, max_size=12).map("".join)
ATEXT = st.text(alphabet="abcXYZ019-_+=!#$%&'*/?^`{|}~....", max_size=8)
REST = st.lists(st.sampled_from([" ", "\t", "SIZE=1", "(", ")", "\x0c", "\n", "\xa0", "x", "<", ">"]), max_size=4)
ADDRESSES = st.one_of(TEXT, st.builds(lambda a, b, c, d: f"{a}<{b}@{c}>{d}", TEXT, TEXT, TEXT, TEXT),
                      st.builds(lambda b, c, d: f"<{b}@{c}>{d}", TEXT, TEXT, TEXT),
                      st.builds(lambda b, c, d: f"<{b}@{c}>{''.join(d)}", ATEXT, ATEXT, REST))  # near the plain


def read(reader: type[SMTP], limit: int, arg: str) -> object:
    """What ``_getaddr`` answers, or the type of what it raises (the email package's parser
    trips over some inputs, '"' for one: aiosmtpd then answers 500, and so do we)."""
    smtp = reader.__new__(reader)
    smtp.local_part_limit = limit
    try:
        return smtp._getaddr(arg)
    except Exception as exc:
        return type(exc)


@pytest.mark.parametrize("limit", [0, 3, 64])
@settings(max_examples=600, deadline=None)
@given(arg=ADDRESSES)
@example(arg="<bbeae7tmcfmz23rms6fpigp2vr6z6w62kkmhcdnjg76wfzgb3v5uwfpbme4@bounces.example.net>")
@example(arg="<a@b.example> SIZE=100 BODY=8BITMIME")
@example(arg="<a@b.example> \x0cX")
@example(arg="<a@b.example> \n")
@example(arg="<a@b.example> (comment) SIZE=1")
@example(arg="<>  ")
@example(arg='"')
@example(arg=f"<{'a' * 65}@b.example>")
def test_an_address_is_read_as_aiosmtpd_reads_it(limit: int, arg: str) -> None:
    assert read(_SMTP, limit, arg) == read(SMTP, limit, arg)


def test_a_return_path_or_its_look_alike_at_rcpt(tmp_path: Path) -> None:
    """A valid return path is taken; the same with a dotless i in place of an i (which upper-cases
    to I, and verified as the token under another id, past its replay mark) is refused."""
    servers = tmp_path / "servers.toml"
    servers.write_text('[servers.p]\naddress = "[127.0.0.1]:2"\nplatform = true\n\n[tenants.acme]\n', encoding="utf-8")
    settings = Settings(servers_file=str(servers), return_path_domain="bounces.example.net",
                        verp_keys="1:the receiver test's own key")
    signer = Signer.from_settings(settings)
    assert signer is not None
    topology = Topology.from_settings(settings)
    handler = Handler(settings, topology, signer, Publisher(settings, topology))
    local = next(lp for n in range(100) if "i" in (lp := signer.local_part("b", "acme", f"job-{n}", "ann@example.net")))
    token = signer.verify(local, ("acme",))
    assert isinstance(token, Token)
    assert handler.refusal(f"<{local}@bounces.example.net>") == ("", token.id)
    at = local.index("i")
    refused, none = handler.refusal(f"<{local[:at]}\u0131{local[at + 1:]}@bounces.example.net>")
    assert refused.startswith("550 5.1.1") and "not base32" in refused and none is None
