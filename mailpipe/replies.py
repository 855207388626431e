"""What an SMTP reply means: one classifier for the sender's replies and the inbound stage's
late reports (a DSN's Status and Diagnostic-Code), driven by one versioned rules file,
``mailpipe/replies.toml``. Pure: no I/O but reading that file once.

Every reply gets an outcome (2xx sent, 4xx deferred, 5xx failed), a category that says why,
with advice the tenant can act on, and, from the rule that matched:

- a bounce class (issue 23): ``hard`` (recipient-caused, 5.1.x, 5.2.1: suppress the address),
  ``soft`` (4.x, mailbox full: count), ``reputation`` (sender- or reputation-caused, 5.7.x,
  blocklists, auth: never suppress the recipient), ``none``;
- a signal for the server's pace (issue 22): ``recipient``, ``rate``, ``connections``,
  ``server_broken``, ``none``;
- the rule's name, which events, logs and metrics carry.

The categories come from the replies the seeds quote (seed 003) and the providers' own texts:

    553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)   -> relay_denied
    5.7.1 Unable to relay                                                    -> relay_denied
    550 High probability of spam                                             -> spam_rejected

A new pattern is a rule in the TOML file (with a sample that the unit tests match); a new
category is a member of ``ReplyCategory`` and its line in ``ADVICE``.
"""

from __future__ import annotations

import functools
import logging
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from typing import Any

from mailpipe.errors import ConfigError
from mailpipe.model import Outcome

log = logging.getLogger(__name__)

SENT, DEFERRED, FAILED = Outcome.SENT, Outcome.DEFERRED, Outcome.FAILED
RULES_FILE = "replies.toml"


class ReplyCategory(StrEnum):
    """Why a server refused: a dead letter's category, and the advice its tenant gets."""

    RELAY_DENIED = "relay_denied"
    SPAM_REJECTED = "spam_rejected"
    BAD_RECIPIENT = "bad_recipient"
    TOO_LARGE = "too_large"
    AUTH_FAILED = "auth_failed"
    TLS_FAILED = "tls_failed"
    CONNECTION = "connection"
    MAILBOX_FULL = "mailbox_full"
    BLOCKLISTED = "blocklisted"
    RATE = "rate"
    UNAUTHENTICATED = "unauthenticated"
    OTHER = "other"


class BounceClass(StrEnum):
    """What a failure means for the recipient's address (mailpipe/suppression.py)."""

    HARD = "hard"  # the address does not exist: suppress it
    SOFT = "soft"  # may pass: count it (suppressed at 3 within 30 days)
    REPUTATION = "reputation"  # the sender's or its server's doing: never the recipient's
    NONE = "none"


class Signal(StrEnum):
    """What a reply says about the server's pace (issue 22's controller reads it)."""

    RECIPIENT = "recipient"
    RATE = "rate"
    CONNECTIONS = "connections"
    SERVER_BROKEN = "server_broken"
    NONE = "none"


PHASES = ("connect", "greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "eod")
# What a rate signal leaves of a server's effective rate: an explicit throttle ("rate limited",
# "too many messages") halves it; a vague "try later" takes 30% off (a rule's ``cut``).
EXPLICIT_CUT, VAGUE_CUT = 0.5, 0.7

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
    ReplyCategory.MAILBOX_FULL: "The recipient's mailbox is full. The mail is retried; an address that stays full "
                "on three days within 30 is suppressed for the tenant.",
    ReplyCategory.BLOCKLISTED: "The receiving server refuses mail from the sending server's address or domain: it is "
                "on a blocklist (the reply names it). Look the address up on that list and ask for "
                "its removal, or send through another server; the recipient is not at fault.",
    ReplyCategory.RATE: "The receiving server asks us to slow down; the mail is retried at a lower pace.",
    ReplyCategory.UNAUTHENTICATED: "The receiving server could not authenticate the sender's domain (SPF, DKIM, "
                "DMARC): publish SPF for the sending server and the tenant's DKIM key, and check "
                "the DMARC record of the sender's domain.",
    ReplyCategory.OTHER: "",
}


# RFC 3463: class.subject.detail, at the start of the text ("5.7.1 Unable to relay") or, as
# qmail writes it, at the end in parentheses ("... rcpthosts (#5.7.1)").
_ENHANCED_START = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
_ENHANCED_ANYWHERE = re.compile(r"\(?#?\b([245])\.(\d{1,3})\.(\d{1,3})\b\)?")


@dataclass(frozen=True)
class Rule:
    """One rule of the rules file. Every condition given must hold."""

    name: str
    category: str
    bounce: str
    signal: str
    codes: frozenset[int] = frozenset()
    code_classes: frozenset[int] = frozenset()  # 4 for "4xx"
    status: tuple[str, ...] = ()
    text: re.Pattern[str] | None = None
    phases: frozenset[str] = frozenset()
    shadow: bool = False
    advice: str = ""
    sample: str = ""
    sample_phase: str | None = None
    cut: float = VAGUE_CUT  # a rate signal leaves this share of the server's effective rate

    def matches(self, code: int, text: str, enhanced: str | None, phase: str | None) -> bool:
        if (self.codes or self.code_classes) and code not in self.codes and code // 100 not in self.code_classes:
            return False
        if self.status and (enhanced is None or not any(
                enhanced == s or enhanced.startswith(s + ".") for s in self.status)):
            return False
        if self.phases and phase not in self.phases:
            return False
        return self.text is None or self.text.search(text) is not None


@dataclass(frozen=True)
class Rules:
    version: int
    rules: tuple[Rule, ...]

    def first(self, code: int, text: str, enhanced: str | None, phase: str | None) -> Rule | None:
        for rule in self.rules:
            if rule.matches(code, text, enhanced, phase):
                if not rule.shadow:
                    return rule
                log.info("shadow rule %s matches %d %s", rule.name, code, text[:200],
                         extra={"rule": rule.name, "shadow": True})
        return None


@dataclass(frozen=True)
class Reply:
    """An SMTP reply (or a connection failure, ``code`` 0) and what it means for the mail."""

    code: int
    text: str
    enhanced: str | None
    outcome: str
    category: str
    bounce: str = BounceClass.NONE
    signal: str = Signal.NONE
    rule: str = ""
    rule_advice: str = field(default="", compare=False)
    cut: float = field(default=1.0, compare=False)  # for a rate signal: the share of the rate it leaves

    @property
    def advice(self) -> str:
        return self.rule_advice or ADVICE.get(self.category, "")

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


def classify(code: int, text: str, phase: str | None = None, *, enhanced: str | None = None) -> Reply:
    """Classify a server's reply ``code text``, given in ``phase`` (PHASES) when known.
    ``enhanced`` overrides the status code found in the text (a DSN's ``Status:`` field)."""
    text = " ".join(text.split())  # one line: multi-line replies are joined by aiosmtplib with \n
    return _classify(code, text, phase, enhanced if enhanced is not None else enhanced_code(text))


# Addresses and queue ids make every reply's text unique; the rules never look at them.
_VARYING = re.compile(r"<?[^\s<>@]+@[^\s<>]+>?|\b[0-9A-Fa-f]{8,}\b")


def _classify(code: int, text: str, phase: str | None, enhanced: str | None) -> Reply:
    outcome = outcome_for(code)
    if outcome == SENT:
        return Reply(code=code, text=text, enhanced=enhanced, outcome=SENT, category="")
    rule = _rule_for(code, _VARYING.sub("<x@x>", text), enhanced, phase)
    if rule is None:  # only a code outside 4xx and 5xx (a 354 out of place, say)
        return Reply(code=code, text=text, enhanced=enhanced, outcome=outcome, category=ReplyCategory.OTHER,
                     bounce=BounceClass.NONE, signal=Signal.NONE)
    return Reply(code=code, text=text, enhanced=enhanced, outcome=outcome, category=rule.category,
                 bounce=rule.bounce, signal=rule.signal, rule=rule.name, rule_advice=rule.advice, cut=rule.cut)


@functools.lru_cache(maxsize=4096)  # the same replies recur all day: matched once
def _rule_for(code: int, text: str, enhanced: str | None, phase: str | None) -> Rule | None:
    return rules().first(code, text, enhanced, phase)


def category_for(code: int, text: str, enhanced: str | None = None) -> str:
    """Why a non-2xx reply was given (the category of ``classify``)."""
    return classify(code, text, enhanced=enhanced).category


def connection_failure(text: str, category: str = ReplyCategory.CONNECTION) -> Reply:
    """A failure without a reply (refused, timeout, dropped, TLS): always deferred."""
    signal = Signal.SERVER_BROKEN if category == ReplyCategory.TLS_FAILED else Signal.CONNECTIONS
    return Reply(code=0, text=" ".join(text.split()), enhanced=None, outcome=DEFERRED, category=category,
                 bounce=BounceClass.NONE, signal=signal, rule=f"no-reply-{category}")


SENT_REPLY = Reply(code=250, text="OK", enhanced=None, outcome=SENT, category="")


# -- the rules file ---------------------------------------------------------------------------------

_RULE_KEYS = {"name", "codes", "status", "text", "phases", "category", "bounce", "signal", "shadow",
              "advice", "sample", "sample_phase", "cut"}


@functools.cache
def rules() -> Rules:
    """The packaged rules, read and checked once."""
    text = resources.files("mailpipe").joinpath(RULES_FILE).read_text(encoding="utf-8")
    loaded = parse_rules(tomllib.loads(text), RULES_FILE)
    log.debug("reply rules version %d: %d rules", loaded.version, len(loaded.rules))
    return loaded


def parse_rules(data: dict[str, Any], source: str) -> Rules:
    """Check a rules file; a mistake names the rule and the field."""
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"{source}: version: expected a positive integer")
    raw = data.get("rule")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: no [[rule]] tables")
    out: list[Rule] = []
    for i, table in enumerate(raw):
        where = f"{source}: rule[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table")
        unknown = set(table) - _RULE_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        out.append(_rule(table, where))
    names = [r.name for r in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{source}: rule name(s) used twice: {', '.join(twice)}")
    return Rules(version=version, rules=tuple(out))


def _rule(table: dict[str, Any], where: str) -> Rule:
    name = table.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ConfigError(f"{where}.name: expected kebab-case, got {name!r}")
    where = f"{where} ({name})"
    codes: set[int] = set()
    classes: set[int] = set()
    for code in _list(table, "codes", where):
        if isinstance(code, int) and not isinstance(code, bool) and 200 <= code < 600:
            codes.add(code)
        elif isinstance(code, str) and re.fullmatch(r"[245]xx", code):
            classes.add(int(code[0]))
        else:
            raise ConfigError(f"{where}.codes: {code!r} is not a reply code or \"4xx\"/\"5xx\"")
    status = _list(table, "status", where)
    for s in status:
        if not isinstance(s, str) or not re.fullmatch(r"[245](\.\d{1,3}){1,2}", s):
            raise ConfigError(f"{where}.status: {s!r} is not like \"5.1\" or \"5.1.1\"")
    phases = _list(table, "phases", where)
    for p in phases:
        if p not in PHASES:
            raise ConfigError(f"{where}.phases: {p!r} is not one of {', '.join(PHASES)}")
    pattern = table.get("text")
    compiled = None
    if pattern is not None:
        try:
            compiled = re.compile(str(pattern), re.IGNORECASE)
        except re.error as exc:
            raise ConfigError(f"{where}.text: not a regular expression: {exc}") from None
    category, bounce, signal = table.get("category"), table.get("bounce"), table.get("signal")
    if category not in set(ReplyCategory):
        raise ConfigError(f"{where}.category: {category!r} is not one of {', '.join(ReplyCategory)}")
    if bounce not in set(BounceClass):
        raise ConfigError(f"{where}.bounce: {bounce!r} is not one of {', '.join(BounceClass)}")
    if signal not in set(Signal):
        raise ConfigError(f"{where}.signal: {signal!r} is not one of {', '.join(Signal)}")
    sample = table.get("sample")
    if not isinstance(sample, str) or not re.match(r"[245]\d\d[ -]", sample + " "):
        raise ConfigError(f"{where}.sample: expected \"CODE TEXT\", a reply this rule matches")
    sample_phase = table.get("sample_phase")
    if sample_phase is not None and sample_phase not in PHASES:
        raise ConfigError(f"{where}.sample_phase: {sample_phase!r} is not a phase")
    cut = table.get("cut", VAGUE_CUT)
    if isinstance(cut, bool) or not isinstance(cut, int | float) or not 0 < cut < 1:
        raise ConfigError(f"{where}.cut: expected a share of the rate between 0 and 1, got {cut!r}")
    return Rule(name=name, category=str(category), bounce=str(bounce), signal=str(signal),
                codes=frozenset(codes), code_classes=frozenset(classes), status=tuple(status), text=compiled,
                phases=frozenset(phases), shadow=bool(table.get("shadow", False)),
                advice=str(table.get("advice", "")), sample=sample, sample_phase=sample_phase, cut=float(cut))


def _list(table: dict[str, Any], key: str, where: str) -> Sequence[Any]:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{where}.{key}: expected a list")
    return value


def split_sample(sample: str) -> tuple[int, str]:
    """``"550 5.1.1 text"`` (or ``"550-5.1.1 text"``) as (550, "5.1.1 text")."""
    return int(sample[:3]), sample[4:]
