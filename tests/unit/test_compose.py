"""Intake validation and rendering: each refusal names its field."""

from __future__ import annotations

import email
from email.policy import default

import pytest

from mailpipe.errors import InvalidMessage
from mailpipe.model import Attachment, IntakeRequest
from producer.compose import check_address, render, render_mime, render_plain, validate


def request(**fields: object) -> IntakeRequest:
    base: dict[str, object] = dict(id="a" * 32, tenant="acme", sender="hr@acme.example", created_ms=0,
                                   to=("ann@example.com",), subject="Hello", text="Hi Ann")
    base.update(fields)
    return IntakeRequest(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("address", [
    "ann@example.com", "a.b+tag@sub.example.co.uk", "x@xn--bcher-kva.example"])
def test_good_addresses(address: str) -> None:
    assert check_address(address, "to[0]") == address.lower()


@pytest.mark.parametrize(("address", "problem"), [
    ("ann", "must have an @-sign"), ("ann@", "something after the @-sign"),
    ("@example.com", "something before the @-sign"), ("ann@example", "should have a period"),
    ("a..b@example.com", "two periods in a row"),
    ("ann@example.com\r\nBcc: victim@example.com", "CR, LF or NUL"), ("ann@exa mple.com", "invalid characters"),
    ("Ann <ann@example.com>", "display name"), ("jörg@example.com", "Internationalized characters"),
])
def test_bad_addresses_are_named(address: str, problem: str) -> None:
    with pytest.raises(InvalidMessage, match=problem) as info:
        check_address(address, "to[0]")
    assert info.value.reason.startswith("to[0]:")


@pytest.mark.parametrize(("fields", "field"), [
    (dict(subject="Hi\r\nBcc: x@example.com"), "subject"),
    (dict(headers={"X-Campaign": "a\nb"}), "headers['X-Campaign']"),
    (dict(headers={"Bcc": "x@example.com"}), "headers['Bcc']"),
    (dict(headers={"Bad Name": "x"}), "headers['Bad Name']"),
    (dict(headers={"X-Bad\n": "1"}), "headers['X-Bad\\n']"),
    (dict(to=(), cc=(), bcc=()), "recipients"),
    (dict(text=None, html=None), "text, html"),
    (dict(sender="nobody"), "sender"),
    (dict(to=("ann@example.com", "bob@example")), "to[1]"),
    (dict(attachments=(Attachment("a.pdf", "pdf", b"x"),)), "attachments[0].content_type"),
])
def test_refusals_name_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        validate(request(**fields), max_message_bytes=1_000_000, max_recipients=10)
    assert info.value.reason.startswith(field), info.value.reason


def test_too_large_and_too_many_recipients() -> None:
    with pytest.raises(InvalidMessage, match="over the 100-byte limit"):
        validate(request(text="x" * 101), max_message_bytes=100, max_recipients=10)
    with pytest.raises(InvalidMessage, match="at most 2 per mail"):
        validate(request(to=("a@example.com", "b@example.com", "c@example.com")), 1000, max_recipients=2)


def test_envelope_holds_every_recipient_once_bcc_included() -> None:
    req = request(to=("ann@example.com", "ANN@example.com"), cc=("bob@example.com",),
                  bcc=("eve@example.com",))
    assert validate(req, 1_000_000, 10) == ("ann@example.com", "bob@example.com", "eve@example.com")


def test_rendered_message_is_rfc5322_with_crlf_and_no_bcc_header() -> None:
    req = request(cc=("bob@example.com",), bcc=("eve@example.com",), html="<p>Hi Ann</p>",
                  headers={"List-Unsubscribe": "<mailto:unsub@acme.example>"},
                  attachments=(Attachment("cv.pdf", "application/pdf", b"%PDF-1.4"),))
    raw = render(req, "f" * 32)
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw, policy=default)
    assert msg["Message-ID"] == f"<{'f' * 32}@acme.example>"
    assert msg["To"] == "ann@example.com" and msg["Cc"] == "bob@example.com"
    assert msg["Bcc"] is None, "Bcc recipients are in the envelope only"
    assert msg["List-Unsubscribe"] == "<mailto:unsub@acme.example>"
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None and body.get_content().strip() == "Hi Ann"
    assert [p.get_filename() for p in msg.iter_attachments()] == ["cv.pdf"]


def test_raw_message_is_passed_through() -> None:
    raw = b"From: hr@acme.example\r\nSubject: x\r\n\r\nbody\r\n"
    req = request(message=raw, recipients=("ann@example.com",), to=())
    assert validate(req, 1000, 10) == ("ann@example.com",)
    assert render(req, "id") == raw


@pytest.mark.parametrize("fields", [
    dict(text="Hi Ann,\nsee you on Monday.\n"),
    dict(text="Grüße aus Köln \u2013 bis Montag!\r\nZeile zwei"),
    dict(text="x" * 3000 + "\nshort"),  # a line longer than SMTP allows: quoted-printable
    dict(text=None, html="<p>Hi <b>Ann</b></p>"),
    dict(text="Hi Ann", html="<p>Hi <b>Ann</b> \u2013 à lundi</p>"),
    dict(to=tuple(f"person{i}@example.com" for i in range(12)), cc=("bob@example.com",)),
    dict(headers={"List-Unsubscribe": "<mailto:unsub@acme.example>", "X-Campaign": "spring"}),
])
def test_the_fast_renderer_says_what_the_standard_library_says(fields: dict[str, object]) -> None:
    req = request(**fields)
    fast = render(req, "c" * 32)
    assert fast == render_plain(req, "c" * 32), "this case takes the fast path"
    slow = render_mime(req, "c" * 32)
    assert all(len(line) <= 998 for line in fast.split(b"\r\n"))
    assert b"\n" not in fast.replace(b"\r\n", b"")
    ours, theirs = (email.message_from_bytes(raw, policy=default) for raw in (fast, slow))
    for name in ("From", "To", "Cc", "Subject", "Date", "Message-ID", "List-Unsubscribe", "X-Campaign"):
        assert ours[name] == theirs[name], name
    for kind in ("plain", "html"):
        part, expected = ours.get_body(preferencelist=(kind,)), theirs.get_body(preferencelist=(kind,))
        if expected is None or expected.get_content_subtype() != kind:
            continue
        assert part is not None and part.get_content_subtype() == kind
        assert part.get_content().replace("\r\n", "\n").rstrip("\n") == \
            expected.get_content().replace("\r\n", "\n").rstrip("\n")


@pytest.mark.parametrize("fields", [
    dict(attachments=(Attachment("cv.pdf", "application/pdf", b"%PDF"),)),
    dict(subject="Grüße"), dict(subject="x" * 100),
])
def test_what_the_fast_renderer_leaves_to_the_standard_library(fields: dict[str, object]) -> None:
    req = request(**fields)
    assert render_plain(req, "c" * 32) is None
    assert email.message_from_bytes(render(req, "c" * 32), policy=default)["Subject"] == req.subject


# -- every line break and control character refused (issue 13) --------------------------------

import unicodedata  # noqa: E402

from producer import compose  # noqa: E402

LINE_BREAKS = ["\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
CONTROLS = ["\0", "\t", "\x01", "\x1f", "\x7f", "\x9f"]


def test_the_forbidden_pattern_is_exactly_cc_zl_zp_cs() -> None:
    """The hand-written class matches what unicodedata says, for every code point."""
    wanted = {c for c in map(chr, range(0x110000)) if unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs")}
    found = {c for c in map(chr, range(0x110000)) if compose._FORBIDDEN_IN_TEXT.match(c)}
    assert found == wanted


@pytest.mark.parametrize("char", LINE_BREAKS + CONTROLS)
@pytest.mark.parametrize(("field", "make"), [
    ("subject", lambda c: request(subject=f"Hi{c}there")),
    ("headers['X-Tag'] value", lambda c: request(headers={"X-Tag": f"a{c}b"})),
    ("attachments[0].filename", lambda c: request(attachments=(Attachment(f"a{c}.pdf", "application/pdf", b"x"),))),
    ("tenant", lambda c: request(tenant=f"acme{c}")),
    ("idempotency_key", lambda c: request(idempotency_key=f"k{c}")),
    ("to[0]", lambda c: request(to=(f"ann@example.com{c}",))),
    ("sender", lambda c: request(sender=f"{c}hr@acme.example")),
    ("cc[0]", lambda c: request(cc=(f"c{c}c@example.com",))),
    ("bcc[0]", lambda c: request(bcc=(f"bcc@example.com{c}",))),
    ("recipients[0]", lambda c: request(message=b"x", recipients=(f"r@example.com{c}",))),
])
def test_line_breaks_and_controls_are_refused_with_field_and_character(
        field: str, make: object, char: str) -> None:
    req = make(char)  # type: ignore[operator]
    with pytest.raises(InvalidMessage) as info:
        validate(req, 1_000_000, 100)
    reason = info.value.reason
    assert reason.startswith(f"{field}: ")
    assert f"U+{ord(char):04X}" in reason


def test_the_reason_names_the_character() -> None:
    with pytest.raises(InvalidMessage, match=r"^subject: contains U\+2028 \(LINE SEPARATOR\)"):
        validate(request(subject="a\u2028b"), 1_000_000, 100)
    with pytest.raises(InvalidMessage, match=r"^subject: contains U\+0085 \(NEXT LINE\)"):
        validate(request(subject="a\x85b"), 1_000_000, 100)
    with pytest.raises(InvalidMessage, match=r"^subject: contains U\+000B \(LINE TABULATION\)"):
        validate(request(subject="a\x0bb"), 1_000_000, 100)
    # CR, LF and NUL keep the reason upstreams have always seen, with the character added.
    with pytest.raises(InvalidMessage, match=r"^subject: contains CR, LF or NUL: U\+000D \(CARRIAGE RETURN\)"):
        validate(request(subject="a\rb"), 1_000_000, 100)


@pytest.mark.parametrize("char", ["\u200b", "\u200e", "\ufeff", "\xa0", "\u3000"])
def test_format_characters_and_spaces_are_refused_in_addresses(char: str) -> None:
    with pytest.raises(InvalidMessage, match=rf"^to\[0\]: .*U\+{ord(char):04X}"):
        check_address(f"ann@example.com{char}", "to[0]")


def test_format_characters_are_allowed_in_values_and_render() -> None:
    """A zero-width joiner (emoji) and bidi marks break no line: allowed in subject and values."""
    req = request(subject="Family \U0001f468\u200d\U0001f469\u200d\U0001f467 \u200f\u05e9\u05dc\u05d5\u05dd\u200e",
                  headers={"X-Note": "zero\u200bwidth"})
    validate(req, 1_000_000, 100)
    parsed = email.message_from_bytes(render(req, "a" * 32), policy=default)
    assert parsed["Subject"] == req.subject


@pytest.mark.parametrize("name", ["X-A\u2028", "X-\x85", "X-T\tab", "X-\u00e9", "X:Y"])
def test_header_names_are_printable_ascii(name: str) -> None:
    with pytest.raises(InvalidMessage, match=r"not a valid header name \(contains U\+"):
        validate(request(headers={name: "v"}), 1_000_000, 100)


@pytest.mark.parametrize("job_id", ["", "a\r\nBcc: x@example.com", "a b", "<a>", 'a"b', "a@b", "é"])
def test_the_id_must_fit_a_message_id(job_id: str) -> None:
    with pytest.raises(InvalidMessage, match=r"^id: "):
        validate(request(id=job_id), 1_000_000, 100)


def test_created_ms_past_the_year_9999_is_refused() -> None:
    with pytest.raises(InvalidMessage, match=r"^created_ms: after the year 9999"):
        validate(request(created_ms=compose.MAX_CREATED_MS + 1), 1_000_000, 100)
    validate(request(created_ms=compose.MAX_CREATED_MS), 1_000_000, 100)
    render(request(created_ms=compose.MAX_CREATED_MS), "a" * 32)


def test_headers_the_library_parses_strictly_are_refused_not_crashed() -> None:
    """Two Sender headers (names differ in case): the standard library raises ValueError."""
    req = request(headers={"Sender": "a@example.com", "sender": "b@example.com"}, subject="é")
    validate(req, 1_000_000, 100)
    with pytest.raises(InvalidMessage, match=r"^message: cannot be rendered"):
        render(req, "a" * 32)
