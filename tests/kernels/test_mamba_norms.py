"""RMS norm and the Mamba mixer's gated group RMS norm against their torch references (interpreter, fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from residency.kernels import gated_rms_norm, gated_rms_norm_reference, rms_norm, rms_norm_reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def explicit_gated_norm(y, z, weight, groups, eps):
    # the formula written out: u = y * silu(z), normalised per group, times the weight
    u = y.float() * F.silu(z.float())
    g = u.view(*u.shape[:-1], groups, -1)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return weight.float() * g.view(u.shape)


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 37), (1, 1, 300), (7, 4096)], ids=str)
def test_rms_norm_matches_reference(device, shape):
    torch.manual_seed(42)
    x = torch.randn(*shape, device=device) * 3
    w = torch.randn(shape[-1], device=device)
    got = rms_norm(x, w, 1e-5, backend="triton")
    expected = rms_norm_reference(x, w, 1e-5)
    assert got.shape == x.shape and not got.isnan().any()
    assert rel_err(got, expected) <= 1e-6
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert rel_err(expected, w * h) <= 1e-6


# (leading shape, channels, groups)
GATED = [((4,), 48, 3), ((2, 3), 40, 5), ((1,), 64, 1), ((2,), 8192 // 8, 8), ((3, 1), 21, 7)]


@pytest.mark.parametrize("gate", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("case", GATED, ids=lambda c: f"{c[0]}-i{c[1]}-g{c[2]}")
def test_gated_rms_norm_matches_reference(device, case, gate):
    torch.manual_seed(42)
    lead, size, groups = case
    y = torch.randn(*lead, size + 4, device=device)[..., 2:-2]  # rows with a stride, like a split
    z = torch.randn(*lead, size, device=device) if gate else None
    w = torch.randn(size, device=device)
    got = gated_rms_norm(y, z, w, groups, 1e-5, backend="triton")
    expected = gated_rms_norm_reference(y, z, w, groups, 1e-5)
    assert got.shape == y.shape and not got.isnan().any()
    assert rel_err(got, expected) <= 1e-6
    if gate:
        assert rel_err(expected, explicit_gated_norm(y, z, w, groups, 1e-5)) <= 1e-6


def test_out_dtype_is_honoured(device):
    y = torch.randn(2, 32, device=device)
    w = torch.ones(32, device=device)
    out = gated_rms_norm(y, y, w, 4, 1e-5, out_dtype=torch.float16, backend="triton")
    assert out.dtype == torch.float16
    assert rel_err(out, gated_rms_norm_reference(y, y, w, 4, 1e-5)) <= 1e-3


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="must divide"):
        gated_rms_norm(torch.zeros(2, 10), None, torch.ones(10), 3, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.zeros(2, 10), torch.ones(9), 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernel check needs a CUDA GPU")
def test_bf16_on_gpu_matches_the_reference():
    torch.manual_seed(0)
    x = torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(4096, device="cuda")).bfloat16()
    assert rel_err(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)) <= 1e-2
    y = torch.randn(2, 8192, device="cuda")
    z = torch.randn(2, 8192, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8192, device="cuda", dtype=torch.bfloat16)
    got = gated_rms_norm(y, z, w, 8, 1e-5, out_dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, gated_rms_norm_reference(y, z, w, 8, 1e-5)) <= 1e-2
