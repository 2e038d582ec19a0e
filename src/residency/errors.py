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


class DeviceError(ResidencyError, ValueError):
    """A device that is not supported, not available on this machine, or out of range."""


class InputError(ResidencyError, ValueError):
    """Bad call arguments: token ids outside the vocabulary, text without a tokenizer, bad sampling settings."""


class SizeError(ResidencyError, ValueError):
    """A memory size or budget that cannot be read, or that does not fit the device ("24", "100GiB" on 24 GiB)."""
