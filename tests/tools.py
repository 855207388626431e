"""External programs the tests use (installed by scripts/install-tools, which `make test` runs)."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(binary: str, package: str) -> str:
    """The path of ``binary``; fails in CI when it is missing, skips elsewhere, saying why."""
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin")
    if found is None:
        message = f"{binary} (Debian package {package}) is not installed: run scripts/install-tools {package}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found
