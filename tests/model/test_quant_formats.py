"""Quantized formats: the reference dequantization equals a plain per-element decoder bit for bit (random and
edge values, odd shapes), the producers' quantization rules, and the expert record layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from residency.kernels.moe.quant_formats import (
    ExpertRecordLayout,
    QuantSpec,
    QuantWeights,
    dequantize_fp8,
    dequantize_nvfp4,
    dequantize_w4a16,
)

from residency.config import NemotronHConfig
from residency.model.quant.pack import pack_int4, quantize_fp8, quantize_nvfp4, quantize_w4a16, round_to_e2m1

# ---------------------------------------------------------------------- plain decoders (no tables, no torch ops)


def e2m1_plain(code: int) -> float:
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    return sign * (m * 0.5 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1))


def e4m3_plain(byte: int) -> float:
    sign = -1.0 if byte & 0x80 else 1.0
    e, m = (byte >> 3) & 15, byte & 7
    if e == 15 and m == 7:
        return math.nan
    return sign * (m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))


def nvfp4_plain(data: np.ndarray, scale_bytes: np.ndarray, scale2: np.float32, k: int) -> np.ndarray:
    n = data.shape[0]
    out = np.zeros((n, k), dtype=np.float32)
    for r in range(n):
        for c in range(k):
            byte = int(data[r, c // 2])
            code = byte & 15 if c % 2 == 0 else byte >> 4
            block = np.float32(e4m3_plain(int(scale_bytes[r, c // 16])))
            out[r, c] = (np.float32(e2m1_plain(code)) * block) * scale2
    return out


def w4a16_plain(words: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, k: int, group: int) -> np.ndarray:
    n = words.shape[0]
    out = np.zeros((n, k), dtype=np.float32)
    for r in range(n):
        for c in range(k):
            code = (int(words[r, c // 8]) & 0xFFFFFFFF) >> (4 * (c % 8)) & 15
            z = 8 if zero is None else (int(zero[r // 8, c // group]) & 0xFFFFFFFF) >> (4 * (r % 8)) & 15
            out[r, c] = np.float32(code - z) * np.float32(scale[r, c // group])
    return out


def same_bits(a: torch.Tensor, b: np.ndarray | torch.Tensor) -> bool:
    b = torch.as_tensor(np.asarray(b, dtype=np.float32))
    a = a.float()
    both_nan = a.isnan() & b.isnan()
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | both_nan).all())


def random_bytes(shape, gen, high=256) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=gen, dtype=torch.int32).to(torch.uint8)


# ---------------------------------------------------------------------- dequantization == plain decoders


@pytest.mark.parametrize("n,k", [(1, 16), (7, 48), (33, 16), (5, 160)])
def test_nvfp4_dequantization_matches_the_plain_decoder(n, k):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    data = random_bytes((n, k // 2), gen)
    scale = random_bytes((n, k // 16), gen, high=127)  # every finite non-negative E4M3 incl. subnormals
    for scale2 in (1.0, 3.1e-5, 2.5e3, 1e-30):
        s2 = torch.tensor(scale2, dtype=torch.float32)
        got = dequantize_nvfp4(data, scale.view(torch.float8_e4m3fn), s2, k)
        assert same_bits(got, nvfp4_plain(data.numpy(), scale.numpy(), np.float32(scale2), k))


def test_nvfp4_edge_values():
    # every code with the largest, smallest-subnormal, one and zero block scales, negative codes included
    codes = torch.arange(16, dtype=torch.uint8).repeat(4, 2)  # [4, 32]
    data = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    scale = torch.tensor([[0x7E, 0x7E], [0x01, 0x01], [0x38, 0x38], [0x00, 0x00]], dtype=torch.uint8)  # 448, 2^-9, 1, 0
    s2 = torch.tensor(1e30, dtype=torch.float32)  # huge global: 6 * 448 * 1e30 stays finite in fp32
    got = dequantize_nvfp4(data, scale.view(torch.float8_e4m3fn), s2, 32)
    assert same_bits(got, nvfp4_plain(data.numpy(), scale.numpy(), np.float32(1e30), 32))
    assert float(got[0, 7]) == np.float32(np.float32(6 * 448) * np.float32(1e30))
    assert float(got[0, 15]) == -float(got[0, 7])  # code 15 = -6
    assert bool((got[3] == 0).all()) and math.copysign(1, float(got[3, 8])) == -1  # zero scale: zeros, -0 kept
    e2m1 = [e2m1_plain(c) for c in range(16)]
    assert e2m1[:8] == [0, 0.5, 1, 1.5, 2, 3, 4, 6] and e2m1[8:] == [-v for v in e2m1[:8]]


def test_fp8_dequantization_matches_the_plain_decoder():
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(16, 16)  # NaN codes 0x7F / 0xFF included
    for s in (1.0, 1.7e-7, 3.3e4):
        got = dequantize_fp8(every.view(torch.float8_e4m3fn), torch.tensor(s, dtype=torch.float32))
        plain = np.array([[np.float32(e4m3_plain(int(b))) * np.float32(s) for b in row] for row in every.numpy()])
        assert same_bits(got, plain)
    assert float(dequantize_fp8(torch.tensor([[0x7E]], dtype=torch.uint8).view(torch.float8_e4m3fn),
                                torch.tensor(1.0))) == 448.0


@pytest.mark.parametrize("n,k,group,symmetric", [(5, 20, 8, True), (9, 48, 16, False), (3, 37, None, True),
                                                  (17, 64, 32, False), (8, 24, 128, True)])
def test_w4a16_dequantization_matches_the_plain_decoder(n, k, group, symmetric):
    gen = torch.Generator().manual_seed(n + k)
    spec = QuantSpec("w4a16", group_size=group, symmetric=symmetric, scale_dtype=torch.float32)
    words = torch.randint(-2**31, 2**31 - 1, spec.data_shape(n, k), generator=gen, dtype=torch.int64).to(torch.int32)
    groups = spec.groups(k)
    scale = torch.randn(n, groups, generator=gen) * torch.tensor([1e-6, 1.0, 1e4])[torch.arange(groups) % 3]
    scale[0, 0] = 0.0
    zero = None if symmetric else torch.randint(-2**31, 2**31 - 1, spec.zero_shape(n, k), generator=gen,
                                                dtype=torch.int64).to(torch.int32)
    got = dequantize_w4a16(words, scale, zero, n, k, spec.group_of(k))
    plain = w4a16_plain(words.numpy(), scale.numpy(), None if zero is None else zero.numpy(), k, spec.group_of(k))
    assert same_bits(got, plain)


def test_w4a16_bf16_scales_are_widened_exactly():
    gen = torch.Generator().manual_seed(3)
    words = torch.randint(-2**31, 2**31 - 1, (4, 2), generator=gen, dtype=torch.int64).to(torch.int32)
    scale = torch.randn(4, 1, generator=gen).to(torch.bfloat16)
    got = dequantize_w4a16(words, scale, None, 4, 16, 16)
    assert same_bits(got, w4a16_plain(words.numpy(), scale.float().numpy(), None, 16, 16))


# ---------------------------------------------------------------------- quantization rules


def test_e2m1_rounding_is_nearest_ties_to_even_and_saturates():
    q = torch.tensor([0.0, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 6.0, 100.0, -0.75, -5.0, -7.0])
    codes = round_to_e2m1(q)
    values = [e2m1_plain(int(c)) for c in codes]
    assert values == [0, 0, 0.5, 1, 1, 2, 2, 4, 4, 6, 6, 6, -1, -4, -6]


def test_nvfp4_quantization_follows_the_modelopt_scale_rules():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=gen)
    w[1] = 0.0  # an all-zero row: zero block scales, zero codes
    q = quantize_nvfp4(w)
    assert q["weight"].dtype == torch.uint8 and tuple(q["weight"].shape) == (6, 32)
    assert q["weight_scale"].dtype == torch.float8_e4m3fn and tuple(q["weight_scale"].shape) == (6, 4)
    scale2 = float(q["weight_scale_2"])
    assert scale2 == pytest.approx(float(w.abs().max()) / (6 * 448), rel=1e-6)
    block = w.view(6, 4, 16).abs().amax(-1)
    expected = (block / 6 / q["weight_scale_2"]).to(torch.float8_e4m3fn)
    assert torch.equal(q["weight_scale"].view(torch.uint8), expected.view(torch.uint8))
    deq = dequantize_nvfp4(q["weight"], q["weight_scale"], q["weight_scale_2"], 64)
    assert bool((deq[1] == 0).all())
    # each element is the nearest E2M1 multiple of its block's scale (within half a step of the coarsest grid)
    step = (q["weight_scale"].float() * scale2).repeat_interleave(16, -1)
    assert bool(((deq - w).abs() <= 1.0 * step + 1e-12).all())
    # the largest magnitude of the tensor lands on +-6 x its block scale
    r, c = divmod(int(w.abs().argmax()), 64)
    assert abs(float(deq[r, c])) == pytest.approx(6 * float(step[r, c]))


def test_fp8_quantization_and_zero_tensor():
    w = torch.tensor([[1.0, -2.0, 0.001, 448.0 * 3]])
    q = quantize_fp8(w)
    assert float(q["weight_scale"]) == pytest.approx(1344.0 / 448)
    assert float(dequantize_fp8(q["weight"], q["weight_scale"])[0, 3]) == pytest.approx(1344.0)
    z = quantize_fp8(torch.zeros(2, 3))
    assert float(z["weight_scale"]) == 1.0 and bool((z["weight"].float() == 0).all())


@pytest.mark.parametrize("symmetric", [True, False])
def test_w4a16_quantization_follows_the_minmax_rules(symmetric):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(10, 40, generator=gen) + (0 if symmetric else 0.7)
    spec = QuantSpec("w4a16", group_size=16, symmetric=symmetric, scale_dtype=torch.bfloat16)
    q = quantize_w4a16(w, spec)
    assert q["weight_packed"].shape == (10, 5) and q["weight_scale"].shape == (10, 3)
    assert q["weight_scale"].dtype == torch.bfloat16 and q["weight_shape"].tolist() == [10, 40]
    padded = torch.nn.functional.pad(w, (0, 8)).view(10, 3, 16)
    if symmetric:
        expected = (padded.abs().amax(-1) / 7.5).to(torch.bfloat16)
        assert "weight_zero_point" not in q
    else:
        expected = ((padded.amax(-1).clamp(min=0) - padded.amin(-1).clamp(max=0)) / 15).to(torch.bfloat16)
        assert q["weight_zero_point"].shape == (2, 3)
    assert torch.equal(q["weight_scale"], expected)
    deq = dequantize_w4a16(q["weight_packed"], q["weight_scale"], q.get("weight_zero_point"), 10, 40, 16)
    step = q["weight_scale"].float().repeat_interleave(16, -1)[:, :40]
    assert bool(((deq - w).abs() <= step * (1.0 if symmetric else 0.5) + 1e-6).all())


def test_pack_int4_matches_the_compressed_tensors_bit_order():
    codes = torch.arange(16).repeat(2, 1)  # [2, 16]: element 8j+i in bits 4i..4i+3 of word j
    words = pack_int4(codes)
    assert words.dtype == torch.int32 and words.shape == (2, 2)
    assert (int(words[0, 0]) & 0xFFFFFFFF) == 0x76543210 and (int(words[0, 1]) & 0xFFFFFFFF) == 0xFEDCBA98
    along_rows = pack_int4(torch.arange(9)[:, None].repeat(1, 3), dim=0)  # 9 rows -> 2 words, zero-padded
    assert along_rows.shape == (2, 3) and int(along_rows[1, 0]) == 8


# ---------------------------------------------------------------------- the expert record


SUPER = NemotronHConfig()


@pytest.mark.parametrize("spec,expected", [
    (QuantSpec("nvfp4"), 3_096_592),
    (QuantSpec("fp8"), 5_505_040),
    (QuantSpec("w4a16", group_size=128), 2_838_528),
])
def test_super_record_bytes_match_the_reference_table_and_the_config(spec, expected):
    layout = ExpertRecordLayout(spec, SUPER.moe_intermediate_size, SUPER.expert_input_size)
    assert layout.record_bytes == expected
    assert SUPER.expert_bytes(spec.format) == expected


@pytest.mark.parametrize("spec", [QuantSpec("nvfp4"), QuantSpec("fp8"),
                                  QuantSpec("w4a16", group_size=16, symmetric=False, scale_dtype=torch.float32),
                                  QuantSpec("w4a16", group_size=None, scale_dtype=torch.bfloat16)])
def test_record_views_round_trip_and_match_the_config_bytes(spec):
    inner, width = 48, 32
    layout = ExpertRecordLayout(spec, inner, width)
    config = NemotronHConfig(hidden_size=64, pattern="ME", mamba_num_heads=8, mamba_head_dim=8, n_groups=2,
                             n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=inner,
                             moe_latent_size=width, moe_shared_expert_intermediate_size=64)
    assert config.expert_bytes(spec.format, group_size=spec.group_size, symmetric=spec.symmetric,
                               scale_bytes=spec.scale_dtype.itemsize) == layout.record_bytes
    assert layout.record_bytes % 16 == 0
    gen = torch.Generator().manual_seed(0)
    w_up, w_down = torch.randn(inner, width, generator=gen), torch.randn(width, inner, generator=gen)
    from residency.model.quant.pack import quantize_weight

    def parts(w):
        q = quantize_weight(w, spec)
        names = {"weight": "data", "weight_packed": "data", "weight_zero_point": "zero"}
        out = {names.get(k, k): v for k, v in q.items() if k != "weight_shape"}
        if spec.format == "nvfp4":
            out["scale"], out["scale2"] = out.pop("weight_scale"), out.pop("weight_scale_2")
        elif spec.format == "fp8":
            out["scale2"] = out.pop("weight_scale")
        else:
            out["scale"] = out.pop("weight_scale")
        return out

    bank = layout.empty(3)
    bank.fill_(0xAB)
    layout.pack(parts(w_up), parts(w_down), bank[1])
    for start, end in layout.gaps:
        assert bool((bank[1, start:end] == 0).all())
    up, down = layout.up(bank), layout.down(bank)
    assert isinstance(up, QuantWeights) and up.num_slots == 3 and (up.n, up.k) == (inner, width)
    ref_up = QuantWeights(spec, inner, width, **{k: v.unsqueeze(0) if v.dim() else v.reshape(1)
                                                 for k, v in parts(w_up).items()})
    assert torch.equal(up.slots(slice(1, 2)).dequantize(), ref_up.dequantize())
    assert (down.n, down.k) == (width, inner)
