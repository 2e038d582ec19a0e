"""Device memory accounting for the real Super config and the budget error (sizes: tests/test_sizes.py)."""

from __future__ import annotations

import pytest

from residency.cli.plan import resolve_config
from residency.errors import BudgetError
from residency.planning.hardware import lookup_gpu
from residency.planning.memory import (
    CUDA_CONTEXT_BYTES,
    MemoryBreakdown,
    account_memory,
    activation_bytes,
)
from residency.sizes import GiB, MiB


@pytest.fixture(scope="module")
def super_config():
    return resolve_config("nemotron-3-super", None)


def test_memory_no_longer_offers_size_parsing():
    import residency.planning.memory as memory

    assert "parse_size" not in memory.__all__ and not hasattr(memory, "parse_size")


def test_super_on_rtx_4090_components(super_config):
    c = super_config
    b = account_memory(c, 24 * GiB, expert_dtype="nvfp4", dense_dtype="bf16", context=32768, batch=1)
    assert b.get("non_expert_weights") == c.non_expert_bytes("bf16") == 15_851_591_680 + 40 * 512 * 4
    assert b.get("kv_cache") == 32768 * 8192  # 8 attention layers x K,V x 2 heads x 128 x 2 bytes
    assert b.get("mamba_state") == c.mamba_state_bytes() == 40 * (4 * MiB + 60 * 1024)
    assert b.get("activations") == activation_bytes(c, 1)
    assert b.get("cuda_context") == CUDA_CONTEXT_BYTES
    assert b.get("staging_buffers") == 44 * 3_096_592
    assert b.get("os_reserve") == 0
    assert b.fixed_bytes + b.expert_bytes == 24 * GiB
    assert b.expert_size == 3_096_592 and b.expert_slots == b.expert_bytes // 3_096_592
    assert 2000 < b.expert_slots < 2600  # about 7 GiB of NVFP4 experts next to 14.8 GiB of BF16 dense weights
    assert MemoryBreakdown.from_dict(b.to_dict()) == b
    assert "experts (slots)" in "\n".join(b.lines())


def test_kv_and_state_scale_with_context_and_batch(super_config):
    base = account_memory(super_config, 80 * GiB, context=4096, batch=1)
    long = account_memory(super_config, 80 * GiB, context=131072, batch=1)
    batched = account_memory(super_config, 80 * GiB, context=4096, batch=4)
    assert long.get("kv_cache") == 32 * base.get("kv_cache") == 1 * GiB
    assert batched.get("mamba_state") == 4 * base.get("mamba_state")
    assert long.expert_bytes < base.expert_bytes and batched.expert_bytes < base.expert_bytes
    fp8_kv = account_memory(super_config, 80 * GiB, context=131072, kv_dtype="fp8")
    assert fp8_kv.get("kv_cache") == long.get("kv_cache") // 2


def test_fp8_dense_frees_memory(super_config):
    bf16 = account_memory(super_config, 24 * GiB, dense_dtype="bf16")
    fp8 = account_memory(super_config, 24 * GiB, dense_dtype="fp8")
    assert fp8.get("non_expert_weights") < 0.6 * bf16.get("non_expert_weights")
    assert fp8.expert_slots > bf16.expert_slots


def test_unified_memory_keeps_an_os_reserve(super_config):
    spark = lookup_gpu("DGX Spark")
    b = account_memory(super_config, spark.usable_bytes, unified=True)
    assert b.get("os_reserve") == int(0.12 * spark.usable_bytes)
    assert b.staging_slots == 22
    assert b.expert_bytes > super_config.routed_expert_bytes("nvfp4")  # Super NVFP4 fits one Spark


def test_budget_below_minimum_lists_components_and_fixes(super_config):
    with pytest.raises(BudgetError) as err:
        account_memory(super_config, 12 * GiB, target="RTX 3060")
    msg = str(err.value)
    for part in ("12.00 GiB on RTX 3060", "non_expert_weights", "14.76 GiB", "kv_cache", "cuda_context",
                 "What would fit", "--dense-dtype fp8", "a bigger GPU: RTX 3090 (24.00 GiB)", "--vram"):
        assert part in msg, part
    assert "--dense-dtype fp8 (non-expert weights 6.30 GiB smaller; fits)" in msg
    assert account_memory(super_config, 12 * GiB, dense_dtype="fp8").expert_bytes >= 0  # the fix really fits


def test_budget_error_suggests_a_larger_vram_only_below_the_device(super_config):
    with pytest.raises(BudgetError) as err:
        account_memory(super_config, 12 * GiB, target="RTX 4090", device_memory=24 * GiB)
    assert "a larger --vram, up to the 24.00 GiB of RTX 4090" in str(err.value)
    with pytest.raises(BudgetError) as err:
        account_memory(super_config, 12 * GiB, target="small card", device_memory=12 * GiB)
    assert "--vram" not in str(err.value) and "--gpu-spec FILE with the real figures" in str(err.value)


def test_budget_error_suggests_a_context_that_fits(super_config):
    device = 24 * GiB
    with pytest.raises(BudgetError) as err:
        account_memory(super_config, device, context=1_048_576)
    msg = str(err.value)
    assert "--context " in msg
    ctx = int(msg.split("--context ")[1].split()[0])
    assert 1024 <= ctx < 1_048_576 and ctx % 1024 == 0
    account_memory(super_config, device, context=ctx)  # does not raise
    with pytest.raises(BudgetError):
        account_memory(super_config, device, context=ctx + 64 * 1024)


def test_bad_inputs(super_config):
    with pytest.raises(BudgetError, match="KV cache dtype"):
        account_memory(super_config, 80 * GiB, kv_dtype="int4")
    with pytest.raises(BudgetError, match="at least 1"):
        account_memory(super_config, 80 * GiB, context=0)
