"""MoE over a slot bank of resident experts: torch reference, alignment, Triton kernels, tuning tables;
quantized (NVFP4 / FP8 / W4A16) banks of expert records with their own kernels and references."""

from .align import AlignedPairs, align_pairs
from .gather_gemm import moe_gather_gemm
from .quant_formats import ExpertRecordLayout, QuantSpec, QuantWeights
from .quant_gather_gemm import moe_gather_gemm_quant, quant_linear
from .quant_reference import moe_gather_gemm_quant_reference, quant_linear_reference
from .reference import moe_gather_gemm_reference
from .tuning import GemmTile, MoeConfig, TuningTable, find_table, load_table

__all__ = [
    "AlignedPairs",
    "ExpertRecordLayout",
    "GemmTile",
    "MoeConfig",
    "QuantSpec",
    "QuantWeights",
    "TuningTable",
    "align_pairs",
    "find_table",
    "load_table",
    "moe_gather_gemm",
    "moe_gather_gemm_quant",
    "moe_gather_gemm_quant_reference",
    "moe_gather_gemm_reference",
    "quant_linear",
    "quant_linear_reference",
]
