"""Loading: each tensor materialised once in its target dtype; peak memory bounded; too-big models refused first."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from residency import OffloadedNemotron
from residency.errors import BudgetError
from residency.model import loading
from residency.model.checkpoint import Checkpoint
from residency.testing import write_tiny_checkpoint

MiB = 1 << 20

CHILD = textwrap.dedent("""
    import json, sys, torch
    from residency import OffloadedNemotron
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[2]]
    budget = None if sys.argv[3] == "none" else sys.argv[3]
    model = OffloadedNemotron.from_pretrained(sys.argv[1], device="cpu", dtype=dtype, progress=False,
                                              vram_budget=budget, quiet=True)
    logits = model([[1, 2, 3]])
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    kib = lambda key: int(status[key].split()[0])
    params = sum(p.numel() * p.element_size() for p in model.model.parameters())
    print(json.dumps({"hwm": kib("VmHWM") * 1024, "params": params, "finite": bool(torch.isfinite(logits).all())}))
""")


def peak_of_loading(folder, dtype: str, budget: str = "none") -> dict:
    """Load in a fresh process and report its own peak resident memory (VmHWM)."""
    # ru_maxrss of a child would carry this large parent's peak across exec; VmHWM is the child's own
    run = subprocess.run([sys.executable, "-c", CHILD, str(folder), dtype, budget], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_peak_memory_of_loading_a_1gib_checkpoint(big_checkpoint, dtype):
    folder, ckpt_bytes = big_checkpoint
    assert ckpt_bytes >= 1 << 30
    report = peak_of_loading(folder, dtype)
    assert report["finite"]
    limit = 1.2 * ckpt_bytes + 300 * MiB
    assert report["hwm"] <= limit, f"peak {report['hwm'] / MiB:.0f} MiB > {limit / MiB:.0f} MiB"
    if dtype == "bf16":  # converted while reading: no fp32 copy of the model ever existed
        assert report["params"] < 0.6 * ckpt_bytes
        assert report["hwm"] <= 0.6 * ckpt_bytes + 300 * MiB


def test_a_model_that_does_not_fit_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    folder = write_tiny_checkpoint(tmp_path / "tiny")
    monkeypatch.setattr(loading, "free_device_bytes", lambda device: (4 * MiB, "available host memory"))

    def no_reads(self, name, out):
        raise AssertionError("a weight was read before the fit check")

    monkeypatch.setattr(Checkpoint, "read_into", no_reads)
    with pytest.raises(BudgetError) as info:
        OffloadedNemotron.from_pretrained(folder, device="cpu")
    message = str(info.value)
    assert "routed experts" in message and "everything else" in message and "4.00 MiB" in message
    assert "vram_budget=" in message


def test_footprint_counts_every_tensor_at_its_stored_size(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "tiny", dtype=torch.bfloat16)
    model = OffloadedNemotron.from_pretrained(folder, device="cpu")
    fp = loading.footprint(model.model, torch.bfloat16)
    tensors = list(model.model.parameters()) + list(model.model.buffers())
    assert fp.total_bytes == sum(t.numel() * t.element_size() for t in tensors)
    c = model.config
    expert_params = c.num_moe_layers * c.n_routed_experts * 2 * c.moe_intermediate_size * c.expert_input_size
    slot_tables = c.num_moe_layers * c.n_routed_experts * 4
    assert fp.expert_bytes == expert_params * 2 + slot_tables


def test_read_into_converts_in_bounded_chunks(tmp_path, monkeypatch):
    folder = write_tiny_checkpoint(tmp_path / "tiny")
    ckpt = Checkpoint(folder)
    name = "backbone.embeddings.weight"
    expected = ckpt.get(name)
    from residency.model import checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "STAGING_BYTES", 1000)  # many chunks, a ragged last one
    out = torch.full(expected.shape, float("nan"), dtype=torch.bfloat16)
    ckpt.read_into(name, out)
    assert torch.equal(out, expected.to(torch.bfloat16))
    same = torch.full(expected.shape, float("nan"))
    ckpt.read_into(name, same)
    assert torch.equal(same, expected)
    ckpt.close()


@pytest.mark.slow
def test_peak_memory_of_loading_a_1gib_checkpoint_offloaded(big_checkpoint):
    """Offloaded: the host store holds every expert once; the device (here host memory too) only the
    dense part and a small slot budget, so the whole process still stays under 1.2 x + 300 MiB."""
    folder, ckpt_bytes = big_checkpoint
    report = peak_of_loading(folder, "fp32", "64MiB")
    assert report["finite"] and report["params"] < 0.1 * ckpt_bytes  # experts are not model parameters
    limit = 1.2 * ckpt_bytes + 300 * MiB
    assert report["hwm"] <= limit, f"peak {report['hwm'] / MiB:.0f} MiB > {limit / MiB:.0f} MiB"


def test_the_embedding_table_can_be_loaded_into_host_memory_outside_the_device_allocator(tmp_path):
    """``embeddings_on_host``: the table is allocated once on the host (never through ``allocate``, the
    offload runtime's device ledger), filled from the checkpoint in the model dtype, and counted by
    ``footprint`` as host bytes, not device bytes."""
    from residency.model.modeling import HostEmbedding

    folder = write_tiny_checkpoint(tmp_path / "tiny")
    asked = []

    def allocate(shape, dtype, what):
        asked.append(tuple(shape))
        return torch.empty(shape, dtype=dtype)

    reference = loading.build_model(Checkpoint(folder))
    model = loading.build_model(Checkpoint(folder), dtype=torch.bfloat16, allocate=allocate, embeddings_on_host=True)
    emb = model.backbone.embeddings
    c = model.config
    assert isinstance(emb, HostEmbedding) and model.embeddings_on_host and not reference.embeddings_on_host
    assert asked.count((c.vocab_size, c.hidden_size)) == 1  # lm_head's; the table was not asked for
    assert emb.weight.device.type == "cpu" and emb.weight.dtype == torch.bfloat16
    assert torch.equal(emb.weight, reference.backbone.embeddings.weight.to(torch.bfloat16))
    fp = loading.footprint(model, torch.bfloat16)
    assert fp.host_bytes == emb.nbytes == c.vocab_size * c.hidden_size * 2
    assert fp.total_bytes == loading.footprint(reference, torch.bfloat16).total_bytes - fp.host_bytes
    ids = torch.tensor([[5, 0, 258, 5]])
    assert torch.equal(emb(ids), reference.backbone.embeddings(ids).to(torch.bfloat16))  # a row gather


def test_dtype_names_are_understood_and_other_dtypes_refused_before_reading(tmp_path):
    from residency.errors import InputError

    folder = write_tiny_checkpoint(tmp_path / "ckpt", seed=0)
    model = OffloadedNemotron.from_pretrained(folder, device="cpu", dtype="bf16")
    assert model.model.lm_head.weight.dtype == torch.bfloat16
    assert OffloadedNemotron.from_pretrained(folder, device="cpu", dtype="auto").model.lm_head.weight.dtype == \
        OffloadedNemotron.from_pretrained(folder, device="cpu").model.lm_head.weight.dtype
    for bad in (torch.int8, "int4", torch.float8_e4m3fn, 16):
        with pytest.raises(InputError, match="dtype="):
            OffloadedNemotron.from_pretrained(folder, device="cpu", dtype=bad)
