"""Mamba-2 decode-step kernels against their torch references (interpreter on CPU, fp32; NaN-poisoned empty).

Shapes cover group counts above one, odd head counts, head dims and state sizes that are not
powers of two, several channel blocks, and inputs that are strided views of a fused projection,
as the model passes them. The references are also held to the chunked scan and to ``F.conv1d``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from residency.kernels import (
    causal_conv1d_update,
    causal_conv1d_update_reference,
    selective_state_update,
    selective_state_update_reference,
)

from residency.model.mamba import ssd_scan

# (batch, heads, head_dim, state, groups)
SSU_SHAPES = [(1, 8, 8, 16, 2), (2, 6, 5, 7, 3), (3, 5, 16, 32, 5), (1, 9, 3, 20, 1), (2, 12, 64, 128, 4)]
LIMITS = [(0.0, math.inf), (0.05, 0.2)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def ssu_inputs(bsz, heads, hd, nstate, groups, device):
    # x, B, C, dt as strided slices of one projection row, like the model's split of in_proj
    width = heads * hd + 2 * groups * nstate + heads
    row = torch.randn(bsz, width + 3, device=device)[:, 3:]
    x, B, C, dt = row.split([heads * hd, groups * nstate, groups * nstate, heads], dim=-1)
    return dict(
        state=torch.randn(bsz, heads, hd, nstate, device=device),
        x=x.view(bsz, heads, hd), dt=dt, A_log=torch.log(torch.rand(heads, device=device) * 7 + 1),
        B=B.view(bsz, groups, nstate), C=C.view(bsz, groups, nstate),
        D=torch.rand(heads, device=device) + 0.5, dt_bias=torch.randn(heads, device=device) * 0.5 - 1.0,
    )  # fmt: skip


@pytest.mark.parametrize("limit", LIMITS, ids=["no-clamp", "clamp"])
@pytest.mark.parametrize("shape", SSU_SHAPES, ids=lambda s: "b{}-h{}-p{}-n{}-g{}".format(*s))
def test_selective_state_update_matches_reference(device, shape, limit):
    torch.manual_seed(42)
    args = ssu_inputs(*shape, device)
    ref_state = args["state"].clone()
    expected = selective_state_update_reference(**{**args, "state": ref_state}, dt_limit=limit)
    got = selective_state_update(**args, dt_limit=limit, backend="triton")
    assert got.dtype == torch.float32 and not got.isnan().any()
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(args["state"], ref_state) <= 1e-5


def test_selective_state_update_writes_every_element_of_out(device):
    torch.manual_seed(1)
    args = ssu_inputs(2, 6, 5, 7, 3, device)
    ref_state = args["state"].clone()
    expected = selective_state_update_reference(**{**args, "state": ref_state})
    out = torch.full((2, 6, 5), float("nan"), device=device)
    assert selective_state_update(**args, out=out, backend="triton") is out
    assert not out.isnan().any() and rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("shape", SSU_SHAPES[:3], ids=lambda s: "b{}-h{}-p{}-n{}-g{}".format(*s))
def test_reference_step_equals_chunked_scan_of_one_token(shape):
    torch.manual_seed(3)
    args = ssu_inputs(*shape, "cpu")
    bsz, heads, hd, nstate, groups = shape
    start = args["state"].clone()
    y = selective_state_update_reference(**args)
    dt = F.softplus(args["dt"] + args["dt_bias"])
    A = -torch.exp(args["A_log"])
    y_scan, final = ssd_scan(args["x"][:, None], dt[:, None], A, args["B"][:, None], args["C"][:, None],
                             args["D"], 16, start)  # fmt: skip
    assert rel_err(y, y_scan[:, 0]) <= 1e-6
    assert rel_err(args["state"], final) <= 1e-6


def test_dt_softplus_is_accurate_for_very_negative_inputs(device):
    # dt + dt_bias far below zero: softplus ~ e^v, which log(1 + e^v) in fp32 would round to zero
    args = ssu_inputs(1, 4, 4, 8, 2, device)
    args["dt"] = torch.full((1, 4), -12.0, device=device)
    args["dt_bias"] = torch.tensor([0.0, -3.0, 1.0, 25.0], device=device)  # 25: the linear branch
    ref_state = args["state"].clone()
    expected = selective_state_update_reference(**{**args, "state": ref_state})
    got = selective_state_update(**args, backend="triton")
    assert rel_err(got, expected) <= 1e-6 and rel_err(args["state"], ref_state) <= 1e-6


# (batch, channels, kernel)
CONV_SHAPES = [(1, 40, 4), (3, 37, 4), (2, 300, 3), (2, 10, 2), (1, 5, 5)]


@pytest.mark.parametrize("silu", [True, False], ids=["silu", "linear"])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "b{}-c{}-k{}".format(*s))
def test_causal_conv1d_update_matches_reference(device, shape, has_bias, silu):
    torch.manual_seed(42)
    bsz, channels, kernel = shape
    x = torch.randn(bsz, channels + 2, device=device)[:, 1:-1]  # a strided view
    state = torch.randn(bsz, channels, kernel - 1, device=device)
    weight = torch.randn(channels, 1, kernel, device=device)[:, 0]
    bias = torch.randn(channels, device=device) if has_bias else None
    ref_state = state.clone()
    expected = causal_conv1d_update_reference(x, ref_state, weight, bias, silu)
    got = causal_conv1d_update(x, state, weight, bias, silu, backend="triton")
    assert not got.isnan().any()
    assert rel_err(got, expected) <= 1e-6
    assert torch.equal(state, ref_state)


def test_conv_update_equals_conv1d_over_the_window_and_shifts_the_state(device):
    torch.manual_seed(5)
    bsz, channels, kernel, steps = 2, 19, 4, 6
    xs = torch.randn(bsz, steps, channels, device=device)
    weight = torch.randn(channels, 1, kernel, device=device)
    bias = torch.randn(channels, device=device)
    state = torch.zeros(bsz, channels, kernel - 1, device=device)
    got = torch.stack([causal_conv1d_update(xs[:, t], state, weight[:, 0], bias, backend="triton")
                       for t in range(steps)], dim=1)  # fmt: skip
    padded = F.pad(xs.transpose(1, 2), (kernel - 1, 0))
    expected = F.silu(F.conv1d(padded, weight, bias, groups=channels)).transpose(1, 2)
    assert rel_err(got, expected) <= 1e-6
    assert torch.equal(state, xs[:, -(kernel - 1):].transpose(1, 2))


def test_out_is_written_in_full(device):
    x = torch.randn(3, 37, device=device)
    state = torch.randn(3, 37, 3, device=device)
    weight = torch.randn(37, 4, device=device)
    expected = causal_conv1d_update_reference(x, state.clone(), weight, None)
    out = torch.full_like(x, float("nan"))
    assert causal_conv1d_update(x, state, weight, None, out=out, backend="triton") is out
    assert rel_err(out, expected) <= 1e-6


def test_shape_errors_name_the_argument():
    args = ssu_inputs(1, 6, 4, 8, 4, "cpu")  # 4 groups do not divide 6 heads
    with pytest.raises(ValueError, match="groups dividing"):
        selective_state_update(**args, backend="torch")
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(torch.zeros(1, 8), torch.zeros(1, 8, 2), torch.zeros(8, 4), backend="torch")


def test_kernels_compile_for_hopper_and_ampere():
    # the interpreter accepts code a GPU backend rejects: compile each kernel to a cubin (sm_90, sm_80)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "residency.kernels.mamba.compile_check"], capture_output=True,
                         text=True, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert len(report["results"]) == 2 * 8 and report["problems"] == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernel check needs a CUDA GPU")
def test_bf16_inputs_on_gpu_match_the_reference():
    torch.manual_seed(0)
    args = ssu_inputs(1, 128, 64, 128, 8, "cuda")
    args = {k: (v.bfloat16() if k in ("x", "B", "C", "dt") else v) for k, v in args.items()}
    ref_state = args["state"].clone()
    expected = selective_state_update_reference(**{**args, "state": ref_state})
    got = selective_state_update(**args)
    assert rel_err(got, expected) <= 1e-4 and rel_err(args["state"], ref_state) <= 1e-4
    x = torch.randn(1, 10240, device="cuda", dtype=torch.bfloat16)
    state = torch.randn(1, 10240, 3, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(10240, 4, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(10240, device="cuda", dtype=torch.bfloat16)
    ref_state = state.clone()
    expected = causal_conv1d_update_reference(x, ref_state, weight, bias)
    assert rel_err(causal_conv1d_update(x, state, weight, bias), expected) <= 1e-2
    assert torch.equal(state, ref_state)
