"""What a benchmark result was measured on: CPU model and the git commit of the working tree."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
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


def run_meta(**extra: object) -> dict:
    """What a CPU benchmark's report names first: date (UTC), CPU model, Python and torch versions; then ``extra``
    in the caller's order (the commit, thread counts, ...)."""
    import torch

    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "cpu": cpu_model(),
            "python": platform.python_version(), "torch": torch.__version__, **extra}


def save_report(out: Path, meta: dict, rows: list, header: str, text: str) -> None:
    """``out.json`` (``{"meta": meta, "rows": rows}``) and ``out.md`` (``header``, then the printed table ``text``),
    the folder made first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(header + text + "\n")
