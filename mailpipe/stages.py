"""The stages, registered once: the command line, the demo, the deploy checks and the tests
read this list. A stage is a class of its own folder, named here by module and class, so the
kernel names it without importing it (only ``load``, called by the command line, does)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailpipe.stage import Stage

# In pipeline order: what each consumes is what the one before it publishes.
STAGES: dict[str, tuple[str, str]] = {
    "producer": ("producer.stage", "EnqueueStage"),
    "packer": ("packer.stage", "PackerStage"),
    "limiter": ("limiter.stage", "LimiterStage"),
    "sender": ("sender.stage", "SenderStage"),
    # Not on the mail's path: what comes back after the 250 (bounces, complaints, unsubscribes).
    "inbound": ("inbound.stage", "InboundStage"),
}
NAMES = tuple(STAGES)
# The stages a mail goes through, in order (the demo and the fault campaign run these).
MAIL_PATH = ("producer", "packer", "limiter", "sender")


def load(name: str) -> type[Stage]:
    """The class of the stage called ``name``."""
    module, cls = STAGES[name]
    stage: type[Stage] = getattr(importlib.import_module(module), cls)
    return stage
