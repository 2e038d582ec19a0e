"""One size parser for the library and the command line: units, bare numbers, fractions of free memory, budgets."""

from __future__ import annotations

import pytest

from residency.errors import ResidencyError, SizeError
from residency.sizes import Budget, GiB, KiB, MiB, TiB, format_bytes, parse_budget, parse_size

# ---------------------------------------------------------------------- parse_size: units


@pytest.mark.parametrize(
    ("text", "value"),
    [
        # binary: GiB and the single letter G (docker --memory 20g), any case, optional space
        ("20GiB", 20 * GiB), ("20gib", 20 * GiB), ("20 GIB", 20 * GiB), ("20G", 20 * GiB), ("20g", 20 * GiB),
        ("512MiB", 512 * MiB), ("512m", 512 * MiB), ("4KiB", 4 * KiB), ("4k", 4 * KiB),
        (" 2 TiB ", 2 * TiB), ("2T", 2 * TiB),
        # decimal
        ("64GB", 64 * 10**9), ("64 gb", 64 * 10**9), ("3kb", 3000), ("512MB", 512 * 10**6), ("1TB", 10**12),
        # fractional values
        ("1.5GiB", 3 * GiB // 2), ("1.5g", 3 * GiB // 2), ("23.5 GiB", 47 * GiB // 2), (".5GiB", GiB // 2),
        ("1.1GB", 1_100_000_000), ("121.7GiB", int(121.7 * GiB)), ("1e3MB", 10**9),
        # bytes, and ints as byte counts in the Python API
        ("4096B", 4096), ("0B", 0), (4096, 4096), (0, 0),
    ],
)
def test_parse_size_units(text, value):
    assert parse_size(text) == value


def test_a_partial_byte_rounds_down():
    assert parse_size("1.3KiB") == 1331  # 1331.2 bytes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("24", "size '24' has no unit (24 bytes is never meant); write 24GiB or 24GB"),
        ("0.8", "size '0.8' has no unit; write 0.8GiB or 0.8GB (only a budget such as --vram may be a bare fraction"),
        ("20 gigs", "cannot read size '20 gigs': unknown unit 'gigs'; write it like 20GiB, 64GB or 512MiB"),
        ("20GiBs", "unknown unit 'GiBs'"),
        ("", "cannot read size ''; write it like 20GiB"),
        ("GiB", "cannot read size 'GiB'; write it like 20GiB"),
        ("1.2.3GB", "cannot read size '1.2.3GB'; write it like 20GiB"),
        ("-1GiB", "size '-1GiB' is negative; a size is at least 0 bytes"),
        (-5, "size -5 is negative"),
        (0.8, "size 0.8 is a bare number, not a size; pass bytes as an int or a string with a unit such as '0.8GiB'"),
        (True, "size True is not a size"),
        (None, "size None is not a size"),
    ],
)
def test_parse_size_refusals_name_the_input_and_the_fix(text, message):
    with pytest.raises(SizeError) as err:
        parse_size(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_size_errors_are_residency_errors_and_value_errors():
    with pytest.raises(ResidencyError):
        parse_size("24")
    with pytest.raises(ValueError):
        parse_size("24")


def test_what_names_the_input():
    with pytest.raises(SizeError, match="^--host-memory '64' has no unit"):
        parse_size("64", what="--host-memory")


def test_unit_explanation_says_which_units_are_binary():
    with pytest.raises(SizeError) as err:
        parse_size("3 lots")
    assert "GiB, MiB, KiB, TiB or G, M, K, T are binary; GB, MB, KB, TB decimal" in str(err.value)


# ---------------------------------------------------------------------- parse_budget

CARD = dict(total_bytes=24 * GiB, device_name="RTX 4090")


def test_budget_from_sizes_says_how_it_was_read():
    b = parse_budget("24GB", **CARD)
    assert b == Budget(24 * 10**9, "24GB = 24.00 GB (decimal) = 22.35 GiB") and int(b) == 24 * 10**9
    assert parse_budget("20GiB", **CARD) == Budget(20 * GiB, "20GiB = 20.00 GiB")
    assert parse_budget(" 1.5 g ", **CARD).understood == "1.5 g = 1.50 GiB"
    assert parse_budget(20 * GiB, **CARD) == Budget(20 * GiB, f"{20 * GiB} bytes = 20.00 GiB")


def test_budget_as_a_fraction_of_free_memory():
    b = parse_budget("0.8", total_bytes=24 * GiB, free_bytes=int(20.5 * GiB), device_name="RTX 4090")
    assert b.bytes == int(0.8 * 20.5 * GiB)
    assert b.understood == "0.8 = 80 % of 20.50 GiB free = 16.40 GiB"
    assert parse_budget(0.8, total_bytes=24 * GiB, free_bytes=20 * GiB).bytes == 16 * GiB
    assert parse_budget("1", total_bytes=24 * GiB, free_bytes=20 * GiB).bytes == 20 * GiB
    assert parse_budget(1.0, total_bytes=24 * GiB, free_bytes=20 * GiB).bytes == 20 * GiB
    assert parse_budget(".5", total_bytes=24 * GiB, free_bytes=20 * GiB).bytes == 10 * GiB


def test_a_fraction_of_an_unmeasured_device_takes_its_whole_memory():
    b = parse_budget("0.5", **CARD)
    assert b.bytes == 12 * GiB
    assert b.understood == ("0.5 = 50 % of RTX 4090's 24.00 GiB (free memory not measured, all of it assumed free) "
                            "= 12.00 GiB")


def test_point_eight_never_becomes_zero_bytes():
    for value in ("0.8", 0.8):
        assert parse_budget(value, **CARD).bytes == int(0.8 * 24 * GiB)
    with pytest.raises(SizeError):
        parse_size("0.8")
    with pytest.raises(SizeError):
        parse_size(0.8)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("100GiB", "budget '100GiB' (100.00 GiB) is more than RTX 4090 has (24.00 GiB); give at most 24.00 GiB, or "
                   "a fraction of free memory such as 0.9"),
        (100 * GiB, "is more than RTX 4090 has (24.00 GiB)"),
        ("24", "budget '24' is a bare number: a bare number is a fraction of free device memory in (0, 1], such as "
               "0.8; for a size write 24GiB or 24GB"),
        ("1.5", "for a size write 1.5GiB or 1.5GB"),
        (1.5, "budget 1.5 is a bare number"),
        ("0", "budget '0' is a bare number"),
        (0.0, "budget 0.0 is a bare number"),
        (float("nan"), "budget nan is a bare number"),
        ("0GiB", "budget '0GiB' is 0 bytes"),
        ("-0.5", "budget '-0.5' is negative"),
        (24, "budget=24 would be 24 bytes; give bytes for a real budget"),
        (True, "budget True is not a budget"),
        ([24], "budget [24] is not a budget"),
        ("lots", "cannot read budget 'lots'; write it like 20GiB, 64GB or 512MiB"),
        ("20 gigs", "unknown unit 'gigs'"),
    ],
)
def test_budget_refusals_name_the_input_and_the_fix(value, message):
    with pytest.raises(SizeError) as err:
        parse_budget(value, **CARD)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_fraction_needs_a_device_whose_memory_is_known():
    with pytest.raises(SizeError, match="'0.8' is a fraction of free device memory, but a custom GPU's memory is not "
                                        "known; give a size such as 40GiB"):
        parse_budget("0.8", total_bytes=None, device_name="a custom GPU")
    assert parse_budget("40GiB", total_bytes=None).bytes == 40 * GiB  # no device limit to check


def test_a_budget_passes_through_and_is_checked_again():
    b = parse_budget("20GiB", **CARD)
    assert parse_budget(b, **CARD) is b
    with pytest.raises(SizeError, match="'20GiB' .* is more than L4-ish has"):
        parse_budget(b, total_bytes=16 * GiB, device_name="L4-ish")


def test_what_names_the_budget_input():
    with pytest.raises(SizeError, match="^--vram '100GiB'"):
        parse_budget("100GiB", what="--vram", **CARD)


def test_format_bytes():
    assert format_bytes(15_851_591_680) == "14.76 GiB"
    assert format_bytes(256 * MiB) == "256.00 MiB"
    assert format_bytes(3 * KiB) == "3.00 KiB"
    assert format_bytes(10) == "10 B"
    assert format_bytes(-2 * GiB) == "-2.00 GiB"
