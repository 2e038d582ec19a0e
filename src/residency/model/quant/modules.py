"""Model modules that keep quantized weights in their stored form: a dense Linear and the resident expert backend.

- :class:`QuantLinear` replaces an ``nn.Linear`` whose checkpoint weight is quantized (FP8 Mamba
  projections, shared experts, latent projections, attention output ...). Its buffers are the
  checkpoint's tensors under the checkpoint's names (``weight`` / ``weight_scale`` /
  ``weight_scale_2``, or ``weight_packed`` / ``weight_scale`` / ``weight_zero_point``), so the
  model holds the quantized bytes, not a dequantized copy. Each call computes through
  :func:`residency.kernels.moe.quant_linear`: on CPU the weight is dequantized (fp32 reference),
  rounded to the model dtype and multiplied by ``F.linear``, which is exactly what the same model
  with the weights dequantized at load computes; on a GPU the Triton kernels dequantize in
  registers with fp32 accumulation.
- :class:`QuantizedExperts` is the fully resident routed-expert backend for a layer of quantized
  experts: one bank of expert records (:class:`~residency.kernels.moe.quant_formats.ExpertRecordLayout`)
  with the identity slot table, computed by :func:`residency.kernels.moe.moe_gather_gemm_quant`.
"""

from __future__ import annotations

import torch
from torch import nn

from ...kernels.moe.quant_formats import ExpertRecordLayout, QuantSpec, QuantWeights
from ...kernels.moe.quant_gather_gemm import moe_gather_gemm_quant, quant_linear
from ..moe import ExpertBackend, ExpertWork

__all__ = ["QuantLinear", "QuantizedExperts", "STORED_LEAVES"]

#: buffer (= checkpoint tensor) names of a quantized Linear, by format, for data / scale / per-tensor scale / zero
STORED_LEAVES = {
    "nvfp4": {"data": "weight", "scale": "weight_scale", "scale2": "weight_scale_2"},
    "fp8": {"data": "weight", "scale2": "weight_scale"},
    "w4a16": {"data": "weight_packed", "scale": "weight_scale", "zero": "weight_zero_point"},
}


class QuantLinear(nn.Module):
    """``y = x @ W.T (+ b)`` with ``W`` kept in its quantized checkpoint format (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, dtype: torch.dtype,
                 bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.compute_dtype = dtype
        n, k = out_features, in_features
        spec.check_shape(n, k)
        leaves = STORED_LEAVES[spec.format]
        self.register_buffer(leaves["data"], torch.empty(spec.data_shape(n, k), dtype=spec.data_dtype))
        if "scale" in leaves:
            self.register_buffer(leaves["scale"], torch.empty(spec.scale_shape(n, k), dtype=spec.scale_dtype))
        if "scale2" in leaves:
            self.register_buffer(leaves["scale2"], torch.empty((), dtype=torch.float32))
        if "zero" in leaves and not spec.symmetric:
            self.register_buffer(leaves["zero"], torch.empty(spec.zero_shape(n, k), dtype=torch.int32))
        self.bias = nn.Parameter(torch.empty(n, dtype=dtype)) if bias else None

    def quant_weights(self) -> QuantWeights:
        """The weight as a one-slot :class:`QuantWeights` (views of the buffers)."""
        leaves = STORED_LEAVES[self.spec.format]

        def get(part: str) -> torch.Tensor | None:
            name = leaves.get(part)
            t = None if name is None else getattr(self, name, None)
            return None if t is None else t.unsqueeze(0)

        scale2 = get("scale2")
        return QuantWeights(self.spec, self.out_features, self.in_features, get("data"), get("scale"),
                            None if scale2 is None else scale2.reshape(1), get("zero"))

    def dequantized(self) -> torch.Tensor:
        """The weight ``[out, in]`` dequantized (fp32 reference) and rounded to the compute dtype."""
        return self.quant_weights().dequantize()[0].to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.quant_weights(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.describe()}"


class QuantizedExperts(ExpertBackend):
    """All routed experts of one layer as quantized records ``[E, record_bytes]`` with the identity slot table."""

    def __init__(self, layout: ExpertRecordLayout, num_experts: int) -> None:
        super().__init__()
        self.layout = layout
        self.register_buffer("records", torch.empty(num_experts, layout.record_bytes, dtype=torch.uint8))
        self.register_buffer("slot_of_expert", torch.empty(num_experts, dtype=torch.int32), persistent=False)
        if self.slot_of_expert.device.type != "meta":
            self.reset_slot_table()

    @property
    def spec(self) -> QuantSpec:
        return self.layout.spec

    def reset_slot_table(self) -> None:
        """The identity slot table: expert e is in slot e."""
        self.slot_of_expert.copy_(torch.arange(self.slot_of_expert.numel(), dtype=torch.int32))

    def up(self) -> QuantWeights:
        return self.layout.up(self.records)

    def down(self) -> QuantWeights:
        return self.layout.down(self.records)

    def submit(self, work: ExpertWork) -> torch.Tensor:
        return moe_gather_gemm_quant(
            work.latent, self.up(), self.down(), self.slot_of_expert, work.ids, work.weights,
            pair_norms=work.pair_norms,
        )

    def collect(self, handle: torch.Tensor) -> torch.Tensor:
        return handle

    def extra_repr(self) -> str:
        return (f"{self.records.shape[0]} experts, {self.layout.spec.describe()}, "
                f"{self.layout.record_bytes} bytes each")
