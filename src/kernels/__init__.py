"""Pure compute kernels (no state): routing, MoE gather-GEMM, dequantisation.

Each kernel has a plain torch reference beside it. The public functions pick Triton on CUDA,
the torch reference on CPU, and Triton on CPU when ``TRITON_INTERPRET=1``; the library-wide
switch (``RESIDENCY_KERNELS=auto|torch|triton`` or :func:`set_backend`) overrides that choice.
"""

from ._dispatch import BACKEND_ENV, BACKENDS, get_backend, kernel_backend, set_backend
from .moe import MoeConfig, moe_gather_gemm, moe_gather_gemm_reference
from .routing import route, route_reference

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "MoeConfig",
    "get_backend",
    "kernel_backend",
    "moe_gather_gemm",
    "moe_gather_gemm_reference",
    "route",
    "route_reference",
    "set_backend",
]
