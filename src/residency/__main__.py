"""``python -m residency``: the ``residency`` command line."""

from __future__ import annotations

from residency.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
