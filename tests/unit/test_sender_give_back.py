"""A give-back keeps its batch's priority (issue 20): transactional mail handed back after a
drain, a deadline, a fence or a Redis blip stays ahead of its tenant's normal mail."""

from __future__ import annotations

from dataclasses import replace

from mailpipe import codec
from mailpipe.model import Job, now_ms
from mailpipe.settings import Settings
from sender.stage import SenderStage
from tests.unit.test_sender_logic import BATCH


def test_a_give_back_keeps_the_priority_of_its_batch() -> None:
    stage = SenderStage(Settings(namespace="unit"))
    job = Job(id="j1", tenant="acme", server="smtp", sender="hr@acme.example", recipients=("a@x",),
              message=b"x", created_ms=now_ms(), priority="high")
    for priority in ("high", "normal"):
        out = stage.outputs.give_back(replace(BATCH, priority=priority), [codec.encode_job(job)], [job],
                                      "deadline", "h1", refund=0)
        assert codec.decode_batch(out.body).priority == priority
