"""Pure compute kernels (no state): routing, MoE gather-GEMM, Mamba-2 decode step, RMS norms, dequantisation.

Each kernel has a plain torch reference beside it. The public functions pick Triton on CUDA,
the torch reference on CPU, and Triton on CPU when ``TRITON_INTERPRET=1``; the library-wide
switch (``RESIDENCY_KERNELS=auto|torch|triton`` or :func:`set_backend`) overrides that choice.
"""

from ._dispatch import BACKEND_ENV, BACKENDS, get_backend, kernel_backend, set_backend
from .mamba import (
    causal_conv1d_update,
    causal_conv1d_update_reference,
    selective_state_update,
    selective_state_update_reference,
)
from .moe import (
    MoeConfig,
    moe_gather_gemm,
    moe_gather_gemm_quant,
    moe_gather_gemm_quant_reference,
    moe_gather_gemm_reference,
    quant_linear,
)
from .norms import gated_rms_norm, gated_rms_norm_reference, rms_norm, rms_norm_reference
from .routing import route, route_reference

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "MoeConfig",
    "causal_conv1d_update",
    "causal_conv1d_update_reference",
    "gated_rms_norm",
    "gated_rms_norm_reference",
    "get_backend",
    "kernel_backend",
    "moe_gather_gemm",
    "moe_gather_gemm_quant",
    "moe_gather_gemm_quant_reference",
    "moe_gather_gemm_reference",
    "quant_linear",
    "rms_norm",
    "rms_norm_reference",
    "route",
    "route_reference",
    "selective_state_update",
    "selective_state_update_reference",
    "set_backend",
]
