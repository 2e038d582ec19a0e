"""Pure compute kernels (no state): routing, MoE gather-GEMM, dequantisation.

Each kernel has a plain torch reference beside it. The public functions pick Triton on CUDA,
the torch reference on CPU, and Triton on CPU when ``TRITON_INTERPRET=1``.
"""

from .moe import MoeConfig, moe_gather_gemm, moe_gather_gemm_reference
from .routing import route, route_reference

__all__ = ["MoeConfig", "moe_gather_gemm", "moe_gather_gemm_reference", "route", "route_reference"]
