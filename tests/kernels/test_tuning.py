"""MoE tuning tables: file lookup, nearest token count, shipped defaults, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from residency.kernels.moe.tuning import (
    DEFAULT_TABLE,
    GemmTile,
    MoeConfig,
    TuningTable,
    clear_table_cache,
    find_table,
    load_table,
    table_for,
    table_name,
    table_to_json,
)


def tile(n: int) -> dict:
    return {"BLOCK_N": n, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 3}


def table_data(**overrides) -> dict:
    data = {
        "measured": True,
        "note": "test table",
        "decode": {"1": {"up": tile(16), "down": tile(32)}, "4": {"up": tile(64), "down": tile(64)}},
        "prefill": {
            "16": {"BLOCK_M": 16, "up": tile(32), "down": tile(32)},
            "512": {"BLOCK_M": 64, "up": tile(128), "down": tile(128)},
        },
    }
    return {**data, **overrides}


def write(folder, name, data) -> None:
    (folder / name).write_text(json.dumps(data) if not isinstance(data, str) else data)


def test_table_name_is_filesystem_safe():
    name = table_name("NVIDIA H100 80GB HBM3", 1024, 2688, torch.bfloat16)
    assert name == "moe_L1024_I2688_bfloat16_NVIDIA_H100_80GB_HBM3.json"


def test_nearest_token_count_and_ties_go_down(tmp_path):
    write(tmp_path, "t.json", table_data())
    table = load_table(tmp_path / "t.json")
    assert table.config("decode", 1).up.BLOCK_N == 16
    assert table.config("decode", 2).up.BLOCK_N == 16
    assert table.config("decode", 3).up.BLOCK_N == 64
    assert table.config("decode", 100).up.BLOCK_N == 64
    assert table.config("prefill", 1) == MoeConfig(GemmTile(32, 32, 2, 4, 3), GemmTile(32, 32, 2, 4, 3), 16)
    assert table.config("prefill", 264).BLOCK_M == 16  # 248 from 16, 248 from 512: the smaller key
    assert table.config("prefill", 265).BLOCK_M == 64
    assert table.measured


def test_device_table_found_then_defaults(tmp_path, monkeypatch):
    name = table_name("Some GPU", 24, 40, torch.float32)
    write(tmp_path, name, table_data())
    assert find_table("Some GPU", 24, 40, torch.float32, dirs=[tmp_path]).source == str(tmp_path / name)
    # another shape, device or dtype: the shipped hand-chosen defaults
    for args in (("Some GPU", 24, 41, torch.float32), ("Other GPU", 24, 40, torch.float32)):
        assert find_table(*args, dirs=[tmp_path]).source == str(DEFAULT_TABLE)
    assert find_table("Some GPU", 24, 40, torch.bfloat16, dirs=[tmp_path]).source == str(DEFAULT_TABLE)
    monkeypatch.setenv("RESIDENCY_KERNEL_CONFIGS", str(tmp_path))
    assert find_table("Some GPU", 24, 40, torch.float32).source == str(tmp_path / name)


def test_shipped_defaults_are_marked_unmeasured_and_cover_both_paths():
    table = load_table(DEFAULT_TABLE)
    assert not table.measured
    assert "not measured" in json.loads(DEFAULT_TABLE.read_text())["note"]
    for path in ("decode", "prefill"):
        assert table.config(path, 1) is not None and table.config(path, 4096) is not None
    # every prefill tile is legal for tl.dot on a GPU
    for config in table.prefill.values():
        assert min(config.BLOCK_M, config.up.BLOCK_N, config.up.BLOCK_K, config.down.BLOCK_N) >= 16


def test_path_choice_threshold_and_rule(tmp_path):
    write(tmp_path, "t.json", table_data(decode_max_tokens=8))
    assert load_table(tmp_path / "t.json").choose_path(8, 22, 512) == "decode"
    assert load_table(tmp_path / "t.json").choose_path(9, 22, 512) == "prefill"
    rule = load_table(DEFAULT_TABLE)
    assert [rule.choose_path(t, 22, 512) for t in (1, 5, 6)] == ["decode", "decode", "prefill"]


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "Expecting property name"),
        ("[]", "top level must be a JSON object"),
        (table_data(measured="yes"), '"measured"'),
        (table_data(decode={}), '"decode" must be a non-empty object'),
        (table_data(prefill={"many": {"up": tile(16), "down": tile(16)}}), "positive token counts"),
        (table_data(decode={"1": {"up": tile(24), "down": tile(16)}}), "decode.1.up.BLOCK_N must be a power of two"),
        (table_data(decode={"1": {"up": {"BLOCK_N": 16}, "down": tile(16)}}), "BLOCK_N and BLOCK_K"),
        (table_data(decode={"1": {"up": {**tile(16), "warps": 4}, "down": tile(16)}}), "unknown fields"),
        (table_data(decode_max_tokens=-1), "decode_max_tokens"),
    ],
)
def test_malformed_tables_name_the_file_and_problem(tmp_path, content, message):
    write(tmp_path, "bad.json", content)
    with pytest.raises(ValueError, match="bad MoE tuning table .*bad.json") as info:
        load_table(tmp_path / "bad.json")
    assert message in str(info.value)


def test_json_round_trip(tmp_path):
    table = load_table(DEFAULT_TABLE)
    measured = TuningTable("x", True, table.decode, table.prefill, decode_max_tokens=6)
    write(tmp_path, "t.json", table_to_json(measured, "round trip", device="test"))
    again = load_table(tmp_path / "t.json")
    assert (again.decode, again.prefill, again.decode_max_tokens, again.measured) == (
        table.decode,
        table.prefill,
        6,
        True,
    )


def test_lookup_by_device_is_cached_until_cleared(tmp_path, monkeypatch):
    monkeypatch.setenv("RESIDENCY_KERNEL_CONFIGS", str(tmp_path))
    clear_table_cache()
    cpu = torch.device("cpu")
    assert table_for(cpu, 24, 40, torch.float32).source == str(DEFAULT_TABLE)
    write(tmp_path, table_name("cpu", 24, 40, torch.float32), table_data())
    assert table_for(cpu, 24, 40, torch.float32).source == str(DEFAULT_TABLE)
    clear_table_cache()
    assert table_for(cpu, 24, 40, torch.float32).source.startswith(str(tmp_path))
    clear_table_cache()
