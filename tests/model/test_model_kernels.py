"""The model computes through ``residency.kernels``: the Triton kernels (in the CPU interpreter, fp32)
give the same logits as the torch references, and the kernels are what actually runs."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from residency.kernels import routing
from residency.kernels.moe import gather_gemm

from residency import OffloadedNemotron, kernels
from residency.testing import write_tiny_checkpoint

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

CONFIGS = {
    "tiny": {},
    # another expert count, top-k, layer pattern and group-limited routing
    "grouped-top-6-of-48": dict(n_routed_experts=48, num_experts_per_tok=6, n_group=4, topk_group=2,
                                pattern="EM*E-M", moe_latent_size=None),
}


class Launches:
    """Counts Triton launches of the router and the MoE kernel, and calls of their torch references."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts = {"route_ref": 0, "moe_ref": 0, "moe_triton": 0}
        for module, name, key in ((routing, "route_reference", "route_ref"),
                                  (gather_gemm, "moe_gather_gemm_reference", "moe_ref"),
                                  (gather_gemm, "reduce_pairs", "moe_triton")):
            original = getattr(module, name)

            def counted(*args, _original=original, _key=key, **kwargs):
                self.counts[_key] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_triton_backend_gives_the_torch_backend_logits(tmp_path, monkeypatch, name):
    folder = write_tiny_checkpoint(tmp_path / name, seed=3, **CONFIGS[name])
    model = OffloadedNemotron.from_pretrained(folder, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    launches = Launches(monkeypatch)
    with kernels.kernel_backend("torch"):
        expected = model(ids)
    assert launches.counts == {"route_ref": model.config.num_moe_layers, "moe_ref": model.config.num_moe_layers,
                               "moe_triton": 0}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with kernels.kernel_backend("triton"):
        got = model(ids)
    assert launches.counts["moe_triton"] == model.config.num_moe_layers  # every MoE layer ran the kernel
    assert launches.counts["route_ref"] == launches.counts["moe_ref"] == model.config.num_moe_layers  # unchanged
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel <= 1e-5, rel


def test_environment_switch_reaches_the_model(tmp_path, monkeypatch):
    folder = write_tiny_checkpoint(tmp_path / "env", seed=1)
    model = OffloadedNemotron.from_pretrained(folder, device="cpu", dtype=torch.float32)
    launches = Launches(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    model([[1, 2, 3]])
    assert launches.counts["moe_triton"] == model.config.num_moe_layers and launches.counts["route_ref"] == 0
    monkeypatch.setenv(kernels.BACKEND_ENV, "torch")
    model([[1, 2, 3]])
    assert launches.counts["moe_ref"] == launches.counts["route_ref"] == model.config.num_moe_layers


def test_router_weights_are_fp32_once_loaded(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "bf16", seed=2, dtype=torch.bfloat16)
    model = OffloadedNemotron.from_pretrained(folder, device="cpu")
    for mixer in model.model.moe_mixers:
        assert mixer.gate.weight.dtype == torch.float32
        assert mixer.gate.e_score_correction_bias.dtype == torch.float32
        assert mixer.experts.up_proj.dtype == torch.bfloat16
        assert torch.equal(mixer.experts.slot_of_expert, torch.arange(model.config.n_routed_experts,
                                                                       dtype=torch.int32))
