"""Deliverability lint, one rule at a time (seed 003's reasons for the spam folder)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mailpipe.model import Attachment, IntakeRequest
from mailpipe.servers import ServerConfig, parse_address
from producer.lint import lint, text_from_html

OWN_SERVER = ServerConfig(name="own", address=parse_address("[smtp.acme.example]:587"), tls="starttls")
PLATFORM = ServerConfig(name="platform", address=parse_address("mail.platform.example"), tls="opportunistic")
WORDS = " ".join(["word"] * 60)
CLEAN = IntakeRequest(id="a" * 32, tenant="acme", sender="hr@acme.example", created_ms=0,
                      to=("ann@example.com",), subject="Interview on Monday", text=WORDS)


def rules(req: IntakeRequest, server: ServerConfig = OWN_SERVER) -> list[str]:
    return [f.rule for f in lint(req, server)]


def test_a_clean_mail_through_its_own_server_has_no_findings() -> None:
    assert rules(CLEAN) == []


@pytest.mark.parametrize("subject", [None, "", "   "])
def test_missing_subject(subject: str | None) -> None:
    assert rules(replace(CLEAN, subject=subject)) == ["missing_subject"]


def test_sender_domain_not_aligned_with_the_server_says_what_to_do() -> None:
    (finding,) = lint(CLEAN, PLATFORM)
    assert finding.rule == "from_domain_misaligned"
    assert "SPF" in finding.message and "include:platform.example" in finding.message


def test_a_server_given_by_ip_is_not_judged() -> None:
    server = replace(OWN_SERVER, address=parse_address("[192.0.2.1]:587"))
    assert rules(CLEAN, server) == []


def test_untidy_html() -> None:
    html = "<div><p>" + WORDS + "<b>bold</div>"
    assert "html_untidy" in rules(replace(CLEAN, html=html))


def test_tidy_html_with_optional_end_tags_is_fine() -> None:
    html = "<html><body><ul><li>one<li>two</ul><p>" + WORDS + "</body></html>"
    assert rules(replace(CLEAN, html=html)) == []


def test_html_without_text_part_is_flagged_and_a_text_part_can_be_made() -> None:
    html = "<h1>Hello</h1><p>Your <b>interview</b> is on Monday.</p><script>x()</script>"
    assert "no_text_part" in rules(replace(CLEAN, text=None, html=html))
    assert text_from_html(html) == "Hello\n\nYour interview is on Monday.\n"


def test_image_heavy_mail_with_little_text() -> None:
    html = '<p>Hi</p><img src="a.png"><img src="b.png">'
    assert "image_heavy" in rules(replace(CLEAN, text="Hi", html=html))


@pytest.mark.parametrize("html", ["<script>alert(1)</script>", '<a href="javascript:go()">x</a>',
                                  '<a href=" JavaScript:go()">x</a>'])
def test_scripts_and_javascript_links(html: str) -> None:
    assert "script" in rules(replace(CLEAN, html=html + WORDS))


@pytest.mark.parametrize(("filename", "flagged"), [
    ("setup.exe", True), ("invoice.PDF.js", True), ("budget.xlsm", True), ("run.vbs", True),
    ("cv.pdf", False), ("photo.jpg", False), ("noextension", False)])
def test_executable_and_macro_attachments(filename: str, flagged: bool) -> None:
    req = replace(CLEAN, attachments=(Attachment(filename, "application/octet-stream", b"x"),))
    assert ("executable_attachment" in rules(req)) is flagged
