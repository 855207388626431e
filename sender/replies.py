"""The SMTP reply classifier lives in the kernel (``mailpipe/replies.py``, rules in
``mailpipe/replies.toml``), shared with the inbound stage's late reports; this module keeps the
sender's own imports working."""

from __future__ import annotations

from mailpipe.replies import (
    ADVICE,
    DEFERRED,
    FAILED,
    SENT,
    SENT_REPLY,
    BounceClass,
    Reply,
    ReplyCategory,
    Signal,
    category_for,
    classify,
    connection_failure,
    enhanced_code,
    outcome_for,
)

__all__ = ["ADVICE", "DEFERRED", "FAILED", "SENT", "SENT_REPLY", "BounceClass", "Reply", "ReplyCategory",
           "Signal", "category_for", "classify", "connection_failure", "enhanced_code", "outcome_for"]
