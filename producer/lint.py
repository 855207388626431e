"""Deliverability lint: what seed 003 says gets mail marked as spam, caught before it is queued.

Each rule yields a ``Finding``; the enqueue stage refuses the mail when a finding's rule is in
``Settings.lint_refuse`` and otherwise lets it travel with the job as a warning (it appears
in the job's events). Pure functions, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser

from mailpipe.model import IntakeRequest
from mailpipe.servers import ServerConfig

RULES = ("missing_subject", "from_domain_misaligned", "html_untidy", "no_text_part",
         "image_heavy", "executable_attachment", "script")

EXECUTABLE_EXTENSIONS = frozenset({
    "exe", "com", "scr", "pif", "bat", "cmd", "msi", "js", "jse", "vbs", "vbe", "wsf", "wsh",
    "hta", "ps1", "jar", "lnk", "cpl", "reg", "docm", "xlsm", "pptm", "dotm", "xltm",
})
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                   "param", "source", "track", "wbr"})
_BLOCK = frozenset({"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "table", "ul", "ol"})
_OPTIONAL_CLOSE = frozenset({"p", "li", "td", "th", "tr", "thead", "tbody", "tfoot", "option",
                             "dt", "dd", "html", "head", "body", "colgroup"})


@dataclass(frozen=True)
class Finding:
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.message}"


class _HtmlScan(HTMLParser):
    """Collects what the rules need: text, images, scripts, and tags left open."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.images = 0
        self.scripts = 0
        self.javascript_links = 0
        self.open: list[str] = []
        self.mismatched = 0
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images += 1
        if tag == "script":
            self.scripts += 1
        if tag in ("script", "style"):
            self._skip += 1
        if any((v or "").strip().lower().startswith("javascript:") for _, v in attrs):
            self.javascript_links += 1
        if tag in _BLOCK:
            self.text.append("\n")
        if tag not in _VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK:
            self.text.append("\n")
        if tag in ("script", "style") and self._skip:
            self._skip -= 1
        if tag in _VOID:
            return
        if tag in self.open:
            while self.open and self.open[-1] != tag:
                if self.open.pop() not in _OPTIONAL_CLOSE:
                    self.mismatched += 1
            self.open.pop()
        else:
            self.mismatched += 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)

    @property
    def unclosed(self) -> int:
        return sum(1 for tag in self.open if tag not in _OPTIONAL_CLOSE)


def scan_html(html: str) -> _HtmlScan:
    scan = _HtmlScan()
    scan.feed(html)
    scan.close()
    return scan


def text_from_html(html: str) -> str:
    """A plain-text part for a mail that only has HTML (multipart/alternative wants both)."""
    text = "".join(scan_html(html).text)
    lines = [re.sub(r"[ \t\xa0]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def registered_domain(host: str) -> str:
    """The last two labels: good enough to compare a sender with its server without a PSL."""
    labels = host.lower().rstrip(".").split(".")
    return ".".join(labels[-2:])


def lint(req: IntakeRequest, server: ServerConfig) -> list[Finding]:
    findings: list[Finding] = []
    if not req.is_raw and not (req.subject or "").strip():
        findings.append(Finding("missing_subject", "the mail has no subject; spam filters score that"))
    sender_domain = req.sender.rpartition("@")[2].lower()
    if not _is_ip(server.address.host):  # an IP address names no domain to align with
        server_domain = registered_domain(server.address.host)
        if server_domain and registered_domain(sender_domain) != server_domain:
            findings.append(Finding(
                "from_domain_misaligned",
                f"sender domain {sender_domain} is sent through {server.address.host}: send through "
                f"{sender_domain}'s own SMTP server, or add {server_domain} to {sender_domain}'s SPF "
                f"record (include:{server_domain})"))
    if req.html is not None:
        scan = scan_html(req.html)
        if scan.unclosed or scan.mismatched:
            findings.append(Finding("html_untidy", f"the HTML has {scan.unclosed} unclosed and "
                                                   f"{scan.mismatched} mismatched tag(s)"))
        if req.text is None:
            findings.append(Finding("no_text_part", "HTML without a text part: a text part was "
                                                    "generated from the HTML"))
        words = len("".join(scan.text).split()) + len((req.text or "").split())
        if scan.images and words < 25 * scan.images:
            findings.append(Finding("image_heavy", f"{scan.images} image(s) and only {words} words of text"))
        if scan.scripts or scan.javascript_links:
            findings.append(Finding("script", f"{scan.scripts} <script> tag(s) and "
                                              f"{scan.javascript_links} javascript: link(s)"))
    for attachment in req.attachments:
        extension = attachment.filename.rsplit(".", 1)[-1].lower() if "." in attachment.filename else ""
        if extension in EXECUTABLE_EXTENSIONS:
            findings.append(Finding("executable_attachment",
                                    f"attachment {attachment.filename!r} is an executable or macro file"))
    return findings


def _is_ip(host: str) -> bool:
    return ":" in host or host.replace(".", "").isdigit()
