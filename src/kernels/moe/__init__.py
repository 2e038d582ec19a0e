"""MoE over a slot bank of resident experts: torch reference, alignment, Triton kernels, tuning tables."""

from .align import AlignedPairs, align_pairs
from .gather_gemm import moe_gather_gemm
from .reference import moe_gather_gemm_reference
from .tuning import GemmTile, MoeConfig, TuningTable, find_table, load_table

__all__ = [
    "AlignedPairs",
    "GemmTile",
    "MoeConfig",
    "TuningTable",
    "align_pairs",
    "find_table",
    "load_table",
    "moe_gather_gemm",
    "moe_gather_gemm_reference",
]
