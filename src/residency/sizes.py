"""Memory sizes and budgets: the one parser the library and the command line share.

Rules (:func:`parse_size`, :func:`parse_budget`):

- ``GiB``/``G``, ``MiB``/``M``, ``KiB``/``K`` and ``TiB``/``T`` are binary (2**30, 2**20, ...);
  ``GB``, ``MB``, ``KB`` and ``TB`` are decimal (10**9, 10**6, ...); ``B`` is bytes. Case does not
  matter, a space may separate number and unit, and fractional values are allowed ("1.5GiB",
  "23.5 gib"). A result that is not a whole number of bytes is rounded down.
- A bare number is never a size: "24" would be 24 bytes, which nobody means, so :func:`parse_size`
  refuses it and says to write ``24GiB`` or ``24GB``. In the Python API an ``int`` is a byte count.
- A *budget* (:func:`parse_budget`, used by ``residency plan --vram`` and
  ``plan_residency(vram=...)``) may also be a fraction in (0, 1]: that share of the device's free
  memory, as vLLM's ``gpu_memory_utilization`` reads it. ``0.8`` is 80 %, never 0 bytes. A budget
  above the device's memory is refused.

Every refusal raises :class:`~residency.errors.SizeError` naming the input, what is wrong and the
fix. This module is a leaf: it imports nothing from the rest of the library but the error types.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from .errors import SizeError

__all__ = ["KiB", "MiB", "GiB", "TiB", "Budget", "SizeError", "parse_size", "parse_budget", "format_bytes"]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

#: unit (lower case) → bytes per unit
_UNITS = {
    "b": 1,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
    "k": KiB, "m": MiB, "g": GiB, "t": TiB,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}
_DECIMAL = {"kb": "KB", "mb": "MB", "gb": "GB", "tb": "TB"}
_NUMBER = re.compile(r"\s*([+-]?)(\d+(?:\.\d*)?|\.\d+)((?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*")
_HOW = "write it like 20GiB, 64GB or 512MiB (GiB, MiB, KiB, TiB or G, M, K, T are binary; GB, MB, KB, TB decimal)"


@dataclass(frozen=True)
class Budget:
    """A device-memory budget in bytes and, in words, how the input was read (printed by the CLI)."""

    bytes: int
    understood: str

    def __int__(self) -> int:
        return self.bytes


def _split(text: str, what: str) -> tuple[str, Fraction, str]:
    """(number as written, its value, unit in lower case or '') of a size string; refuses what cannot be read."""
    match = _NUMBER.fullmatch(text)
    if match is None:
        raise SizeError(f"cannot read {what} {text!r}; {_HOW}")
    sign, digits, exponent, unit = match.groups()
    number = digits + exponent
    if sign == "-":
        raise SizeError(f"{what} {text!r} is negative; a size is at least 0 bytes, {_HOW}")
    unit = unit.lower()
    if unit and unit not in _UNITS:
        raise SizeError(f"cannot read {what} {text!r}: unknown unit {match.group(4)!r}; {_HOW}")
    return number, Fraction(number), unit


def parse_size(value: str | int, *, what: str = "size") -> int:
    """Bytes from a size string ("20GiB", "64GB", "512 MiB", "1.5g") or an int byte count.

    ``what`` names the input in error messages ("--host-memory", "GPU spec memory_bytes"). Bare
    numbers ("24"), floats (``0.8``), negative sizes and unknown units raise :class:`SizeError`.
    """
    if isinstance(value, bool):
        raise SizeError(f"{what} {value!r} is not a size; {_HOW}")
    if isinstance(value, int):
        if value < 0:
            raise SizeError(f"{what} {value} is negative; a size is at least 0 bytes")
        return value
    if isinstance(value, float):
        raise SizeError(
            f"{what} {value!r} is a bare number, not a size; pass bytes as an int or a string with a unit such as "
            f"'{value:g}GiB' or '{value:g}GB'"
        )
    if not isinstance(value, str):
        raise SizeError(f"{what} {value!r} is not a size; {_HOW}")
    number, amount, unit = _split(value, what)
    if not unit:
        if 0 < amount <= 1:
            raise SizeError(
                f"{what} {value!r} has no unit; write {number}GiB or {number}GB (only a budget such as --vram "
                "may be a bare fraction of free device memory)"
            )
        raise SizeError(
            f"{what} {value!r} has no unit ({number} bytes is never meant); write {number}GiB or {number}GB"
        )
    return math.floor(amount * _UNITS[unit])


def _fraction_of(value: str | float) -> Fraction | None:
    """The value of a bare number ("0.8", 0.8, "1"), or None when ``value`` carries a unit."""
    if isinstance(value, float):
        return Fraction(repr(value)) if math.isfinite(value) else None
    match = _NUMBER.fullmatch(value)
    if match is None or match.group(4) or match.group(1) == "-":
        return None
    return Fraction(match.group(2) + match.group(3))


def parse_budget(
    value: str | int | float | Budget,
    *,
    total_bytes: int | None,
    free_bytes: int | None = None,
    device_name: str = "the device",
    what: str = "budget",
) -> Budget:
    """Read a device-memory budget: a size string, an int byte count, or a fraction in (0, 1] of free memory.

    ``total_bytes`` is the device's memory (None when the budget itself defines the device, as with
    ``--gpu custom``: then a fraction is refused); ``free_bytes`` its free memory when measured (a
    fraction of an unmeasured device is taken of ``total_bytes``, assumed free). A budget above
    ``total_bytes``, of 0 bytes, or that cannot be read raises :class:`SizeError`.
    """
    if isinstance(value, Budget):
        budget = value
    elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SizeError(
            f"{what} {value!r} is not a budget; give a size such as '24GiB', bytes as an int, or a fraction of free "
            "device memory such as 0.8"
        )
    elif isinstance(value, int):
        if value < MiB:
            raise SizeError(
                f"{what}={value} would be {value} bytes; give bytes for a real budget (e.g. 24 * 2**30), a size "
                "string such as '24GiB', or a fraction of free device memory as a float such as 0.8"
            )
        budget = Budget(value, f"{value} bytes = {format_bytes(value)}")
    else:
        share = _fraction_of(value)
        if share is not None or isinstance(value, float):
            budget = _fraction_budget(value, share, total_bytes, free_bytes, device_name, what)
        else:
            text = value.strip()
            number, amount, unit = _split(text, what)
            size = math.floor(amount * _UNITS[unit])
            if unit in _DECIMAL:
                understood = f"{text} = {float(amount):.2f} {_DECIMAL[unit]} (decimal) = {format_bytes(size)}"
            else:
                understood = f"{text} = {format_bytes(size)}"
            budget = Budget(size, understood)
    if budget.bytes <= 0:
        raise SizeError(f"{what} {value!r} is 0 bytes; give a size such as 20GiB or a fraction such as 0.8")
    if total_bytes is not None and budget.bytes > total_bytes:
        raise SizeError(
            f"{what} {_shown(value)} ({format_bytes(budget.bytes)}) is more than {device_name} has "
            f"({format_bytes(total_bytes)}); give at most {format_bytes(total_bytes)}, or a fraction of free memory "
            "such as 0.9"
        )
    return budget


def _shown(value: object) -> str:
    return repr(value.understood.split(" = ")[0] if isinstance(value, Budget) else value)


def _fraction_budget(
    value: str | float, share: Fraction | None, total: int | None, free: int | None, device: str, what: str
) -> Budget:
    written = value.strip() if isinstance(value, str) else repr(value)
    if share is None or not 0 < share <= 1:
        raise SizeError(
            f"{what} {value!r} is a bare number: a bare number is a fraction of free device memory in (0, 1], "
            f"such as 0.8; for a size write {written}GiB or {written}GB"
        )
    percent = f"{float(share * 100):g} %"
    if free is not None:
        size = math.floor(share * free)
        understood = f"{written} = {percent} of {format_bytes(free)} free = {format_bytes(size)}"
    elif total is not None:
        size = math.floor(share * total)
        understood = (f"{written} = {percent} of {device}'s {format_bytes(total)} (free memory not measured, all of it "
                      f"assumed free) = {format_bytes(size)}")
    else:
        raise SizeError(
            f"{what} {value!r} is a fraction of free device memory, but {device}'s memory is not known; give a size "
            "such as 40GiB"
        )
    return Budget(size, understood)


def format_bytes(n: float) -> str:
    """Binary units with two decimals: '14.76 GiB', '256.00 MiB', '10 B'."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"
