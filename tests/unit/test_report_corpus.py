"""The report corpus (tests/data/reports, written from the formats Postfix, Exim, Exchange, Gmail,
Yahoo, qmail, two feedback loops and mail clients' auto-replies publish): at least 95% read and
classified right, fewer than 2% unread, none misread as a hard bounce; and 10,000 random or
mutated reports crash nothing."""

from __future__ import annotations

import random
import time
import tomllib
from pathlib import Path

from inbound.reports import ARF, AUTO_REPLY, UNKNOWN, read, split_diagnostic
from inbound.resolve import COMPLAINT_TYPES, resolve
from mailpipe.replies import classify
from mailpipe.verp import Keys, Signer, Token

CORPUS = Path(__file__).resolve().parents[1] / "data" / "reports"
EXPECTED = tomllib.loads((CORPUS / "expected.toml").read_text())
SIGNER = Signer(Keys.parse("1:the corpus test's own key", "test"))


def observed(raw: bytes, recipient: str) -> str:
    """What mailpipe makes of a report for ``recipient``: the label expected.toml uses, or
    "unread" / "not named"."""
    report = read(raw)
    if report.kind == UNKNOWN:
        return "unread"
    if report.kind == AUTO_REPLY:
        return "ignored"
    if report.kind == ARF:
        return "complaint" if report.feedback_type in COMPLAINT_TYPES else "ignored"
    for failure in report.failures:
        if recipient in (failure.original, failure.final):
            if failure.action != "failed":
                return "delayed"
            code, text = split_diagnostic(failure.diagnostic, failure.status)
            return classify(code, text or failure.status, enhanced=failure.status or None).bounce
    return "not named"


def test_the_corpus_is_read_and_classified_right() -> None:
    results = {name: observed((CORPUS / name).read_bytes(), case["recipient"]) for name, case in EXPECTED.items()}
    wrong = {n: (EXPECTED[n]["label"], got) for n, got in results.items() if got != EXPECTED[n]["label"]}
    total = len(results)
    assert total >= 100, "the corpus covers every format several times"
    right = total - len(wrong)
    unread = sum(1 for got in results.values() if got == "unread")
    print(f"\ncorpus: {right}/{total} right ({right / total:.1%}), {unread} unread; wrong: {wrong}")
    assert right / total >= 0.95, wrong
    assert unread / total < 0.02, wrong
    misread_hard = {n: v for n, v in wrong.items() if v[1] == "hard"}
    assert misread_hard == {}, "never a hard bounce that is not one"
    kinds = {case["kind"] for case in EXPECTED.values()}
    assert kinds == {"dsn", "legacy", "arf", "auto_reply"}
    for name, case in EXPECTED.items():
        assert read((CORPUS / name).read_bytes()).kind == case["kind"], name


def test_a_feedback_report_names_its_recipient_and_the_return_path() -> None:
    report = read((CORPUS / "arf-cloudmark-0.eml").read_bytes())
    assert report.feedback_type == "abuse" and "fbl0@comcast.net" in report.original_recipients
    assert len(report.tokens) == 1 and report.tokens[0].startswith("b"), "the reported mail's Return-Path"
    assert report.message_ids == ("c592f15e833f558fb3eb7b4a530e21b5",)


def test_10000_random_and_mutated_reports_crash_nothing() -> None:
    rng = random.Random(23)
    seeds = [(CORPUS / name).read_bytes() for name in sorted(EXPECTED)]
    tokens = [SIGNER.verify(SIGNER.local_part("b", "acme", "c592f15e833f558fb3eb7b4a530e21b5", "user0@example.net"),
                            ("acme",))]
    assert all(isinstance(t, Token) for t in tokens)
    started = time.monotonic()
    kinds: dict[str, int] = {}
    for i in range(10_000):
        base = bytearray(rng.choice(seeds))
        mode = i % 4
        if mode == 0:  # random bytes, some of them header-like
            raw = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 400)))
        elif mode == 1:  # flipped bytes
            for _ in range(rng.randrange(1, 40)):
                base[rng.randrange(len(base))] = rng.getrandbits(8)
            raw = bytes(base)
        elif mode == 2:  # cut anywhere
            raw = bytes(base[:rng.randrange(len(base))])
        else:  # lines shuffled, duplicated, a boundary broken
            lines = bytes(base).split(b"\r\n")
            for _ in range(rng.randrange(1, 8)):
                j = rng.randrange(len(lines))
                lines.insert(rng.randrange(len(lines)), lines[j] if rng.random() < 0.5 else lines[j][::-1])
            raw = b"\r\n".join(lines)
        report = read(raw)
        kinds[report.kind] = kinds.get(report.kind, 0) + 1
        for failure in report.failures:
            code, text = split_diagnostic(failure.diagnostic, failure.status)
            classify(code, text, enhanced=failure.status or None)
        resolve(report, report_id="r", at_ms=0, rcpt_tokens=tokens, mail_from="", signer=SIGNER, tenants=("acme",))
    elapsed = time.monotonic() - started
    print(f"\n10,000 mutated reports in {elapsed:.1f} s: {kinds}")
    assert sum(kinds.values()) == 10_000
