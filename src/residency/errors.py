"""Error types. Every error names the problem and the fix; catching ``ResidencyError`` catches them all."""

from __future__ import annotations


class ResidencyError(Exception):
    """Base class for errors raised by residency on bad input."""


class CheckpointError(ResidencyError, ValueError):
    """A checkpoint folder that is missing, incomplete, or does not match its config."""


class FileFormatError(ResidencyError, ValueError):
    """A profile, trace or plan file that is corrupt, truncated, tampered with or of the wrong kind."""


class ModelMismatchError(ResidencyError, ValueError):
    """A file made for one model used with another (fingerprints differ)."""


class BudgetError(ResidencyError, ValueError):
    """A memory budget that cannot hold what the model needs."""
