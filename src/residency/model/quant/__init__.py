"""Quantized checkpoints: formats, detection from the quantization config, packing, and the model modules.

- :mod:`.scheme`: which Linear modules are quantized and how (ModelOpt ``hf_quant_config.json`` /
  ``quantization_config``, compressed-tensors ``pack-quantized``);
- :mod:`.pack`: quantizing a float weight into the producers' stored tensors (``residency quantize``);
- :mod:`.modules`: :class:`QuantLinear` and :class:`QuantizedExperts`, which keep quantized bytes in memory;
- :mod:`.convert`: whole-checkpoint quantization, BF16 → ModelOpt / compressed-tensors layout.

The formats themselves (layouts, the reference dequantization, the expert record) live with the
kernels, in :mod:`residency.kernels.moe.quant_formats`.
"""

from ...kernels.moe.quant_formats import (
    FORMATS,
    ExpertRecordLayout,
    QuantSpec,
    QuantWeights,
    dequantize,
    dequantize_fp8,
    dequantize_nvfp4,
    dequantize_w4a16,
)
from .modules import QuantizedExperts, QuantLinear
from .pack import quantize_fp8, quantize_nvfp4, quantize_w4a16, quantize_weight
from .scheme import HF_QUANT_CONFIG, QuantScheme, read_scheme

__all__ = [
    "FORMATS",
    "HF_QUANT_CONFIG",
    "ExpertRecordLayout",
    "QuantLinear",
    "QuantScheme",
    "QuantSpec",
    "QuantWeights",
    "QuantizedExperts",
    "dequantize",
    "dequantize_fp8",
    "dequantize_nvfp4",
    "dequantize_w4a16",
    "quantize_fp8",
    "quantize_nvfp4",
    "quantize_w4a16",
    "quantize_weight",
    "read_scheme",
]
