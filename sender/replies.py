"""What an SMTP reply means for a mail: pure functions, no I/O.

Every reply is classified into an outcome (2xx sent, 4xx deferred, 5xx failed) and a category
that says why, with advice the tenant can act on. The categories come from the replies the
seeds quote (seed 003):

    553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)   -> relay_denied
    5.7.1 Unable to relay                                                    -> relay_denied
    550 High probability of spam                                             -> spam_rejected

and from RFC 3463's enhanced status codes: 5.1.x is a bad address, 5.3.4 / 552 a message
too large, 535 / 5.7.8 failed authentication.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from mailpipe.model import Outcome

SENT, DEFERRED, FAILED = Outcome.SENT, Outcome.DEFERRED, Outcome.FAILED



class ReplyCategory(StrEnum):
    """Why a server refused: a dead letter's category, and the advice its tenant gets. A new
    category is a member here, its rule in ``category_for`` and its line in ``ADVICE``."""

    RELAY_DENIED = "relay_denied"
    SPAM_REJECTED = "spam_rejected"
    BAD_RECIPIENT = "bad_recipient"
    TOO_LARGE = "too_large"
    AUTH_FAILED = "auth_failed"
    TLS_FAILED = "tls_failed"
    CONNECTION = "connection"
    OTHER = "other"


# RFC 3463: class.subject.detail, at the start of the text ("5.7.1 Unable to relay") or, as
# qmail writes it, at the end in parentheses ("... rcpthosts (#5.7.1)").
_ENHANCED_START = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
_ENHANCED_ANYWHERE = re.compile(r"\(?#?\b([245])\.(\d{1,3})\.(\d{1,3})\b\)?")

_SPAM = re.compile(r"spam|junk|blacklist|blocklist|block ?list|\bblocked\b|\blisted\b|reputation"
                   r"|\bspf\b|dmarc|dkim|content (rejected|refused)|policy (rejection|violation)",
                   re.IGNORECASE)
_RELAY = re.compile(r"relay|rcpthosts|not permitted to send|not allowed to send|sender not allowed"
                    r"|sender address rejected|not authorized to send|access denied", re.IGNORECASE)
_BAD_RECIPIENT = re.compile(r"user unknown|unknown user|no such (user|mailbox|recipient)|mailbox "
                            r"(unavailable|not found|does not exist)|does not exist|invalid recipient"
                            r"|recipient (address )?rejected|address rejected|bad destination",
                            re.IGNORECASE)
_TOO_LARGE = re.compile(r"too (large|big)|size (limit|exceeded)|exceeds.*size|message size",
                        re.IGNORECASE)
_AUTH = re.compile(r"authenticat|auth\b|credentials|password|login", re.IGNORECASE)

_OWN_SERVER = ("Send this tenant's mail through its own organisation's SMTP server (add it as a server "
               "with its \"username password\"), and add that server to the sender domain's SPF "
               "record, so that receivers accept mail from the sender's own domain.")

ADVICE: dict[str, str] = {
    ReplyCategory.RELAY_DENIED: "The server refused to relay this mail for the sender's domain. " + _OWN_SERVER,
    ReplyCategory.SPAM_REJECTED: "The receiving server took this mail for spam. " + _OWN_SERVER
                   + " If that does not help, fix the message: a subject, tidy HTML, more text than "
                     "images, no suspicious attachments or script links.",
    ReplyCategory.BAD_RECIPIENT: "The receiving server says this address does not exist: check it with the recipient.",
    ReplyCategory.TOO_LARGE: "The message is larger than the server accepts: send smaller attachments, or a link.",
    ReplyCategory.AUTH_FAILED: "The SMTP server refused the login: check the server's credentials "
                 "(\"username password\", one space between) and that the account may send mail.",
    ReplyCategory.TLS_FAILED: "TLS with the SMTP server failed: port 465 needs implicit TLS (SSL), 587 needs "
                "STARTTLS (TLS); check the port, and give the server's CA in ca_file if its "
                "certificate is not publicly trusted. Credentials are sent only over TLS: a server "
                "with a \"username password\" must offer STARTTLS or implicit TLS (port 465), "
                "and tls = \"none\" cannot be used with credentials.",
    ReplyCategory.CONNECTION: "The SMTP server could not be reached or dropped the connection; the mail is retried "
                "automatically. Check the server's address and port if this persists.",
    ReplyCategory.OTHER: "",
}


@dataclass(frozen=True)
class Reply:
    """An SMTP reply (or a connection failure, ``code`` 0) and what it means for the mail."""

    code: int
    text: str
    enhanced: str | None
    outcome: str
    category: str

    @property
    def advice(self) -> str:
        return ADVICE.get(self.category, "")

    @property
    def transient(self) -> bool:
        return self.outcome == DEFERRED

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.code else self.text


def enhanced_code(text: str) -> str | None:
    """The RFC 3463 status code in a reply's text, like ``"5.7.1"``, or None."""
    match = _ENHANCED_START.match(text) or _ENHANCED_ANYWHERE.search(text)
    if match is None:
        return None
    return ".".join(match.groups())


def outcome_for(code: int) -> str:
    """2xx sent, 5xx failed; 4xx and anything unexpected are deferred (a retry is cheap, loss is not)."""
    if 200 <= code < 300:
        return SENT
    if 500 <= code < 600:
        return FAILED
    return DEFERRED


def category_for(code: int, text: str, enhanced: str | None = None) -> str:
    """Why a non-2xx reply was given. The order matters: the most specific signal wins."""
    if 200 <= code < 300:
        return ""
    enhanced = enhanced if enhanced is not None else enhanced_code(text)
    subject = enhanced.split(".", 1)[1] if enhanced else ""
    if (code in (530, 534, 535, 454) and (_AUTH.search(text) or code == 535)) or subject in ("7.8", "7.9"):
        return ReplyCategory.AUTH_FAILED
    if (code == 552 and subject != "2.2") or subject in ("3.4", "2.3") or _TOO_LARGE.search(text):
        return ReplyCategory.TOO_LARGE
    if _SPAM.search(text):
        return ReplyCategory.SPAM_REJECTED
    if _RELAY.search(text):
        return ReplyCategory.RELAY_DENIED
    if subject.startswith("1.") or _BAD_RECIPIENT.search(text):
        return ReplyCategory.BAD_RECIPIENT
    if code == 553 or subject == "7.1":
        # "553 5.7.1" without more words: in practice a relay (or sender) refusal, as in seed 003.
        return ReplyCategory.RELAY_DENIED
    return ReplyCategory.OTHER


def classify(code: int, text: str) -> Reply:
    """Classify a server's reply ``code text``."""
    text = " ".join(text.split())  # one line: multi-line replies are joined by aiosmtplib with \n
    enhanced = enhanced_code(text)
    return Reply(code=code, text=text, enhanced=enhanced, outcome=outcome_for(code),
                 category=category_for(code, text, enhanced))


def connection_failure(text: str, category: str = ReplyCategory.CONNECTION) -> Reply:
    """A failure without a reply (refused, timeout, dropped, TLS): always deferred."""
    return Reply(code=0, text=" ".join(text.split()), enhanced=None, outcome=DEFERRED, category=category)


SENT_REPLY = Reply(code=250, text="OK", enhanced=None, outcome=SENT, category="")
