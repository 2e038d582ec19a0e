"""Quantize one float weight into a producer's stored tensors (round to nearest, the producers' scale rules).

- NVFP4 (ModelOpt): ``weight_scale_2 = amax / (6 * 448)`` over the tensor; per block of 16 K
  elements ``weight_scale = e4m3(block_amax / 6 / weight_scale_2)`` (saturating at 448); codes
  ``e2m1(w / (weight_scale * weight_scale_2))``, round to nearest, ties to even, clamped to ±6.
- FP8 (ModelOpt, per tensor): ``weight_scale = amax / 448``; ``weight = e4m3(w / weight_scale)``.
- W4A16 (compressed-tensors, min-max observer): per group of ``G`` K elements, symmetric
  ``scale = max|w| / 7.5`` and ``q = clamp(round(w / scale), -8, 7)``; asymmetric ``scale = (max(w, 0) -
  min(w, 0)) / 15``, ``zero = clamp(round(-8 - min(w, 0) / scale), -8, 7)``, ``q = clamp(round(w / scale)
  + zero, -8, 7)``; scales are rounded to the checkpoint's float dtype first and the codes computed
  with the rounded scale. Codes are stored plus 8, eight per int32 word (zero points along N).

An all-zero tensor or block gets a zero scale (a zero tensor scale becomes 1) and zero codes. The
activation scales (``input_scale``) are not written: nothing is calibrated, the result is a
weight-only checkpoint (residency's loader and kernels never read them).
"""

from __future__ import annotations

import torch

from ...kernels.moe.quant_formats import NVFP4_BLOCK, QuantSpec

__all__ = ["E4M3_MAX", "E2M1_MAX", "round_to_e2m1", "pack_int4", "quantize_weight", "quantize_nvfp4",
           "quantize_fp8", "quantize_w4a16"]

E4M3_MAX = 448.0
E2M1_MAX = 6.0
# E2M1 magnitudes and the midpoints between neighbours; a midpoint rounds to the even code
_E2M1_MAG = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def round_to_e2m1(q: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, sign in bit 3) of fp32 ``q``: nearest magnitude, ties to the even code, clamped to 6."""
    mag = q.abs()
    code = torch.zeros(q.shape, dtype=torch.uint8, device=q.device)
    for i in range(1, 8):
        mid = (_E2M1_MAG[i - 1] + _E2M1_MAG[i]) / 2
        # even codes win ties: moving up to an even code includes the midpoint, to an odd one excludes it
        above = mag >= mid if i % 2 == 0 else mag > mid
        code += above.to(torch.uint8)
    return code | ((q < 0).to(torch.uint8) << 3)


def pack_int4(codes: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """int32 words of 4-bit ``codes`` (0..15) packed along ``dim``: element 8j+i in bits 4i..4i+3 of word j."""
    codes = codes.movedim(dim, -1).to(torch.int64)
    pad = (-codes.shape[-1]) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    codes = codes.unflatten(-1, (-1, 8))
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=codes.device)
    words = (codes << shifts).sum(-1)  # < 2**32; fold to signed int32
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def quantize_nvfp4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """ModelOpt NVFP4 tensors of ``w [N, K]``: ``weight`` uint8, ``weight_scale`` e4m3, ``weight_scale_2`` fp32."""
    n, k = w.shape
    QuantSpec("nvfp4").check_shape(n, k)
    w = w.float()
    amax = w.abs().max() if w.numel() else torch.zeros(())
    scale2 = amax / (E2M1_MAX * E4M3_MAX)
    scale2 = torch.where(scale2 > 0, scale2, torch.ones(()))
    blocks = w.view(n, k // NVFP4_BLOCK, NVFP4_BLOCK)
    block_amax = blocks.abs().amax(-1)
    block_scale = (block_amax / E2M1_MAX / scale2).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    divisor = (block_scale.float() * scale2)[..., None]
    q = torch.where(divisor > 0, blocks / torch.where(divisor > 0, divisor, torch.ones(())), torch.zeros(()))
    codes = round_to_e2m1(q.view(n, k))
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)  # even K element in the low nibble
    return {"weight": packed.contiguous(), "weight_scale": block_scale.contiguous(),
            "weight_scale_2": scale2.reshape(()).float()}


def quantize_fp8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """ModelOpt per-tensor FP8 tensors of ``w [N, K]``: ``weight`` e4m3, ``weight_scale`` fp32 scalar."""
    w = w.float()
    amax = w.abs().max() if w.numel() else torch.zeros(())
    scale = amax / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones(()))
    q = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return {"weight": q.contiguous(), "weight_scale": scale.reshape(()).float()}


def quantize_w4a16(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized int4 tensors of ``w [N, K]`` for ``spec`` (group size, symmetry,
    scale dtype): ``weight_packed`` int32, ``weight_scale``, ``weight_shape`` int64 [2], and
    ``weight_zero_point`` int32 when asymmetric."""
    n, k = w.shape
    group = spec.group_of(k)
    groups = spec.groups(k)
    w = w.float()
    padded = torch.nn.functional.pad(w, (0, groups * group - k))  # zeros never move min/max past 0
    g = padded.view(n, groups, group)
    if spec.symmetric:
        scale = (g.abs().amax(-1) / 7.5).to(spec.scale_dtype).float()
        zero = torch.zeros(n, groups)
    else:
        lo = g.amin(-1).clamp(max=0.0)
        hi = g.amax(-1).clamp(min=0.0)
        scale = ((hi - lo) / 15.0).to(spec.scale_dtype).float()
        safe = torch.where(scale > 0, scale, torch.ones(()))
        zero = torch.where(scale > 0, torch.round(-8.0 - lo / safe), torch.zeros(())).clamp(-8, 7)
    safe = torch.where(scale > 0, scale, torch.ones(()))[..., None]
    q = torch.round(g / safe) + zero[..., None]
    q = torch.where(scale[..., None] > 0, q, zero[..., None]).clamp(-8, 7)
    codes = (q.view(n, groups * group)[:, :k] + 8).to(torch.int64)
    out = {
        "weight_packed": pack_int4(codes),
        "weight_scale": scale.to(spec.scale_dtype).contiguous(),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not spec.symmetric:
        out["weight_zero_point"] = pack_int4((zero + 8).to(torch.int64), dim=0)
    return out


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The stored tensors (leaf name -> tensor) of ``w [N, K]`` in ``spec``'s format."""
    if w.dim() != 2:
        raise ValueError(f"only 2-D Linear weights are quantized, got shape {tuple(w.shape)}")
    if spec.format == "nvfp4":
        return quantize_nvfp4(w)
    if spec.format == "fp8":
        return quantize_fp8(w)
    return quantize_w4a16(w, spec)
