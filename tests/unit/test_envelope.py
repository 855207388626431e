"""The sender's envelopes (sender/envelope.py): a signed VERP sender per recipient on a server
configured for it, with DSN parameters where the server announces DSN; the tenant's sender,
one transaction for all, anywhere else."""

from __future__ import annotations

from mailpipe.model import Job
from mailpipe.servers import parse_config
from mailpipe.settings import Settings
from mailpipe.verp import Token
from sender.envelope import Envelopes

SETTINGS = Settings(verp_keys="4:an envelope test key!!", return_path_domain="bounces.example.net")
CONFIG = parse_config({
    "servers": {"platform": {"address": "[smtp.example.com]:587", "platform": True},
                "own": {"address": "[smtp.acme.example]:587"},
                "own-rp": {"address": "[smtp.acme.example]:587", "return_path_domain": "rp.acme.example"}},
    "tenants": {"acme": {"servers": ["own", "own-rp"]}}}, "test", {})
JOB = Job(id="c592f15e833f558fb3eb7b4a530e21b5", tenant="acme", server="platform", sender="hr@acme.example",
          recipients=("ann@example.com", "bob+x=1@example.com"), message=b"x")


def test_a_platform_server_gets_a_verp_sender_per_recipient_with_dsn() -> None:
    envelopes = Envelopes(SETTINGS)
    plan = envelopes.planner(CONFIG.servers["platform"], CONFIG)(JOB, JOB.recipients, True)
    assert [t.recipients for t in plan] == [("ann@example.com",), ("bob+x=1@example.com",)]
    for transaction in plan:
        local, _, domain = transaction.sender.partition("@")
        assert domain == "bounces.example.net" and len(local) <= 64
        assert envelopes.signer is not None
        token = envelopes.signer.verify(local, ["acme"])
        assert isinstance(token, Token) and token.shared and token.job_id == JOB.id
        assert envelopes.signer.names_recipient(token, transaction.recipients[0])
        assert transaction.mail_params == f" RET=HDRS ENVID={JOB.id}".encode()
    assert plan[1].rcpt_params == {"bob+x=1@example.com": b" NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob+2Bx+3D1@example.com"}


def test_without_dsn_no_parameters_and_elsewhere_the_tenants_sender() -> None:
    envelopes = Envelopes(SETTINGS)
    (first, _) = envelopes.planner(CONFIG.servers["platform"], CONFIG)(JOB, JOB.recipients, False)
    assert first.sender.endswith("@bounces.example.net") and first.mail_params == b"" and first.rcpt_params is None
    (plain,) = envelopes.planner(CONFIG.servers["own"], CONFIG)(JOB, JOB.recipients, True)
    assert (plain.sender, plain.recipients) == ("hr@acme.example", JOB.recipients)
    own = envelopes.planner(CONFIG.servers["own-rp"], CONFIG)(JOB, JOB.recipients, False)
    assert own[0].sender.endswith("@rp.acme.example")
    assert not any(t.sender.endswith("bounces.example.net") for t in own)
    unsigned = Envelopes(Settings(return_path_domain="bounces.example.net"))
    (nokeys,) = unsigned.planner(CONFIG.servers["platform"], CONFIG)(JOB, JOB.recipients, True)
    assert nokeys.sender == "hr@acme.example", "no keys: no VERP"

