"""From a report that was read (inbound/reports.py) and the tokens it came with to what it means:
findings to apply, a reason to ignore it, or a reason for a person to look (the review queue).
Pure: the signer checks tokens, nothing else is asked.

A finding is applied to an address only when a valid token vouches for it: the token names the
tenant and the mail, and its recipient tag must match the address the report names (the
Original-Recipient we sent as ORCPT, the Final-Recipient, or for a feedback report the
Original-Rcpt-To or the reported mail's To). So a forged or misdirected report cannot suppress
anyone, and one tenant's report never touches another's list.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from inbound.reports import ARF, AUTO_REPLY, DSN, LEGACY, Report, split_diagnostic
from mailpipe.feedback import FeedbackType, Finding, Source
from mailpipe.replies import classify
from mailpipe.verp import BOUNCE, UNSUBSCRIBE, Signer, Token

# ARF feedback types (RFC 5965, 6650) that are a recipient's complaint.
COMPLAINT_TYPES = ("abuse", "fraud", "virus", "other")


@dataclass(frozen=True)
class Resolved:
    findings: tuple[Finding, ...] = ()
    ignored: str = ""  # nothing to do, and why (an auto-reply, a delay notice, not-spam)
    review: str = ""  # a person must look, and why
    tenant: str = ""  # whose report it is, when known (the archive's label)
    spent: tuple[Token, ...] = ()  # return paths that have brought their final report


def resolve(report: Report, *, report_id: str, at_ms: int, rcpt_tokens: Sequence[Token], mail_from: str,
            signer: Signer, tenants: Iterable[str]) -> Resolved:
    tenant_names = tuple(tenants)
    verified = {t.local_part: t for t in rcpt_tokens}  # a DSN quotes the return path it came to: known
    embedded = [t for t in (verified.get(local) or signer.verify(local, tenant_names) for local in report.tokens)
                if isinstance(t, Token)]
    tenant = next((t.tenant for t in (*rcpt_tokens, *embedded)), "")
    unsubscribes = [t for t in rcpt_tokens if t.kind == UNSUBSCRIBE]
    if unsubscribes:
        return _mailto_unsubscribe(report, unsubscribes, report_id, at_ms, mail_from, signer)
    if report.kind == AUTO_REPLY:
        return Resolved(ignored=f"auto-reply ({report.reason})", tenant=tenant)
    tokens = _unique([t for t in rcpt_tokens if t.kind == BOUNCE] + embedded)
    if not tokens:
        return Resolved(review=f"{report.kind} report without a valid return-path token: it cannot be attributed "
                               f"to a tenant ({report.reason or report.subject[:80]})")
    if report.kind in (DSN, LEGACY):
        return _bounces(report, tokens, report_id, at_ms, signer, tenant)
    if report.kind == ARF:
        return _complaint(report, tokens, report_id, at_ms, signer, tenant)
    return Resolved(review=f"unreadable report: {report.reason}", tenant=tenant)


def _bounces(report: Report, tokens: list[Token], report_id: str, at_ms: int, signer: Signer,
             tenant: str) -> Resolved:
    findings: list[Finding] = []
    spent: list[Token] = []
    unmatched: list[str] = []
    final = [f for f in report.failures if f.action == "failed"]
    if not final:
        actions = ", ".join(sorted({f.action or "none" for f in report.failures}))
        return Resolved(ignored=f"no failed recipient (Action: {actions}): a delay or success notice", tenant=tenant)
    source = Source.DSN if report.kind == DSN else Source.LEGACY
    for failure in final:
        match = _vouched(signer, tokens, (failure.original, failure.final))
        if match is None:
            unmatched.append(failure.original or failure.final)
            continue
        token, address = match
        code, text = split_diagnostic(failure.diagnostic, failure.status)
        reply = classify(code, text or failure.status, enhanced=failure.status or None)
        findings.append(Finding(
            type=FeedbackType.BOUNCED, tenant=token.tenant, recipient=address, source=source, origin=report_id,
            at_ms=at_ms, job_id=_job_id(token, report), shared=token.shared, reply=reply,
            reporting_mta=report.reporting_mta, remote_mta=failure.remote_mta, report_id=report_id))
        spent.append(token)
    if not findings:
        return Resolved(review=f"{report.kind}: no failed recipient matches its return path's recipient "
                               f"({', '.join(unmatched)[:200]}): forwarded, or not ours", tenant=tenant)
    return Resolved(findings=tuple(findings), tenant=tenant, spent=tuple(_unique(spent)))


def _complaint(report: Report, tokens: list[Token], report_id: str, at_ms: int, signer: Signer,
               tenant: str) -> Resolved:
    if report.feedback_type not in COMPLAINT_TYPES:
        return Resolved(ignored=f"feedback type {report.feedback_type!r} is not a complaint", tenant=tenant)
    match = _vouched(signer, tokens, report.original_recipients)
    if match is None:
        return Resolved(review="ARF: the complaining recipient cannot be confirmed (the report names none of the "
                               "return path's recipient, or redacts it)", tenant=tenant)
    token, address = match
    finding = Finding(type=FeedbackType.COMPLAINED, tenant=token.tenant, recipient=address, source=Source.ARF,
                      origin=report_id, at_ms=at_ms, job_id=_job_id(token, report), shared=token.shared,
                      feedback_type=report.feedback_type, reporting_mta=report.reporting_mta, report_id=report_id)
    return Resolved(findings=(finding,), tenant=tenant, spent=(token,))


def _mailto_unsubscribe(report: Report, tokens: list[Token], report_id: str, at_ms: int, mail_from: str,
                        signer: Signer) -> Resolved:
    for token in tokens:
        match = _vouched(signer, [token], (*report.senders, mail_from))
        if match is not None:
            _, address = match
            return Resolved(findings=(Finding(
                type=FeedbackType.UNSUBSCRIBED, tenant=token.tenant, recipient=address, source=Source.MAILTO,
                origin=report_id, at_ms=at_ms, job_id=token.job_id or "", report_id=report_id),),
                tenant=token.tenant, spent=(token,))
    return Resolved(review="an unsubscribe mail from an address the mail did not go to "
                           f"({', '.join(report.senders) or mail_from or 'no sender'})", tenant=tokens[0].tenant)


def _vouched(signer: Signer, tokens: Sequence[Token], addresses: Iterable[str]) -> tuple[Token, str] | None:
    """The first (token, address) where the token's recipient is that address."""
    for address in addresses:
        if not address or "@" not in address:
            continue
        for token in tokens:
            if signer.names_recipient(token, address):
                return token, address.strip().lower()
    return None


def _job_id(token: Token, report: Report) -> str:
    if token.job_id is not None:
        return token.job_id
    for candidate in (report.envelope_id, *report.message_ids):
        if candidate and token.names_job(candidate):
            return candidate
    return ""


def _unique(tokens: Sequence[Token]) -> list[Token]:
    return list({t.local_part: t for t in tokens}.values())


def one_click(token: Token, report_id: str, at_ms: int) -> Finding:
    """The finding of a one-click unsubscribe (the link's token holds its recipient)."""
    return Finding(type=FeedbackType.UNSUBSCRIBED, tenant=token.tenant, recipient=token.recipient or "",
                   source=Source.HTTP, origin=report_id, at_ms=at_ms, job_id=token.job_id or "", report_id=report_id)
