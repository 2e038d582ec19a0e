"""What a benchmark result was measured on: CPU model and the git commit of the working tree."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    """Short hash of HEAD, with ``+dirty`` when the tree has uncommitted changes.

    Outside git (a lent GPU machine gets the working tree without ``.git``) it is the commit the
    caller names in ``RESIDENCY_COMMIT``, else 'unknown'.
    """
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("RESIDENCY_COMMIT") or "unknown"
    return head + ("+dirty" if dirty else "")
