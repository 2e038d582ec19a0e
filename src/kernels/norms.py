"""RMS norms of Nemotron-H: the block pre-norm and the Mamba mixer's gated group norm, one pass each.

Semantics (the references define them; the Triton kernel matches), in fp32 whatever the inputs:

- ``rms_norm(x, weight, eps)``: ``weight * x / sqrt(mean(x²) + eps)`` over the last dimension.
- ``gated_rms_norm(y, z, weight, groups, eps)``: ``u = y * silu(z)``, then each group of
  ``I / groups`` consecutive channels is normalised by its own mean square, times ``weight``
  (``norm_before_gate=False``, as in ``transformers``' ``Zamba2RMSNormGated``).

The result is cast once, to ``out_dtype`` (default: x's or y's dtype). One kernel serves both:
one program per (row, group) reads the row's group once, reduces, scales and writes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import next_power_of_2, use_triton


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Torch RMS norm over the last dimension, in fp32; returns ``out_dtype`` (default x's dtype)."""
    h = F.rms_norm(_f32(x), (x.shape[-1],), _f32(weight), eps)
    return _cast(h, out_dtype or x.dtype)


def gated_rms_norm_reference(y: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, groups: int, eps: float,
                             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Torch ``norm(y * silu(z))`` with the mean square per group of ``I / groups`` channels."""
    h = _f32(y)
    if z is not None:
        h = h * F.silu(_f32(z))
    size = h.shape[-1] // groups
    h = F.rms_norm(h.unflatten(-1, (groups, size)), (size,), None, eps).flatten(-2)
    return _cast(h * _f32(weight), out_dtype or y.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out_dtype: torch.dtype | None = None,
             backend: str | None = None) -> torch.Tensor:
    """RMS norm over the last dimension of ``x [..., D]`` with ``weight [D]``, computed in fp32.

    Args:
        x: input, any leading shape; the last dimension is normalised.
        weight: ``[D]`` scale.
        eps: added to the mean square.
        out_dtype: result dtype (default x's).
        backend: ``"auto"``, ``"triton"``, ``"torch"``, or None for the library-wide setting.
    """
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [{x.shape[-1]}] like x's last dim, got {tuple(weight.shape)}")
    if not use_triton(backend, x, weight):
        return rms_norm_reference(x, weight, eps, out_dtype)
    return _launch(x, None, weight, 1, eps, out_dtype or x.dtype)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, groups: int, eps: float, *,
                   out_dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """``weight * norm_g(y * silu(z))`` over groups of ``I / groups`` channels of ``y, z [..., I]``.

    Args:
        y: input (the selective scan's output), any leading shape.
        z: gate shaped like y, or None for a plain group norm.
        weight: ``[I]`` scale.
        groups: groups of the last dimension (it must divide I).
        eps: added to each group's mean square.
        out_dtype: result dtype (default y's).
        backend: ``"auto"``, ``"triton"``, ``"torch"``, or None for the library-wide setting.
    """
    size = y.shape[-1]
    if groups < 1 or size % groups:
        raise ValueError(f"groups ({groups}) must divide the last dimension ({size})")
    if z is not None and z.shape != y.shape:
        raise ValueError(f"z must be shaped like y {tuple(y.shape)}, got {tuple(z.shape)}")
    if weight.shape != (size,):
        raise ValueError(f"weight must be [{size}] like y's last dim, got {tuple(weight.shape)}")
    tensors = (y, weight) if z is None else (y, z, weight)
    if not use_triton(backend, *tensors):
        return gated_rms_norm_reference(y, z, weight, groups, eps, out_dtype)
    return _launch(y, z, weight, groups, eps, out_dtype or y.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(y: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, groups: int, eps: float,
            out_dtype: torch.dtype) -> torch.Tensor:
    shape = y.shape
    y2 = _rows(y)
    z2 = None if z is None else _rows(z)
    out = torch.empty(y2.shape, dtype=out_dtype, device=y.device)
    if out.numel() == 0:
        return out.view(shape)
    size = shape[-1] // groups
    block = next_power_of_2(size)
    from .norms_kernel import group_rms_norm_fwd_kernel

    group_rms_norm_fwd_kernel[(y2.shape[0], groups)](
        y2, y2 if z2 is None else z2, weight, out, size, y2.stride(0), 0 if z2 is None else z2.stride(0),
        out.stride(0), float(eps), HAS_Z=z2 is not None, BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return out.view(shape)
