"""Quantized weight formats of routed experts: what a slot bank holds, how it dequantizes, the record layout.

Three formats, each stored the way its producer writes it, and dequantized in fp32 exactly as below
(the kernels and the CPU path compute the same products in the same order, so a dequantized value
is the same bits everywhere):

- ``nvfp4`` (ModelOpt NVFP4): ``data`` uint8 ``[N, K/2]``, two E2M1 codes per byte, even K element
  in the low nibble; ``scale`` float8_e4m3fn ``[N, K/16]``, one block scale per 16 K elements;
  ``scale2`` fp32, the per-tensor ``weight_scale_2``. ``w = (e2m1 * float(scale)) * scale2``.
- ``fp8`` (ModelOpt FP8, per tensor): ``data`` float8_e4m3fn ``[N, K]``; ``scale2`` fp32, the
  per-tensor ``weight_scale``. ``w = float(data) * scale2``.
- ``w4a16`` (compressed-tensors ``pack-quantized``, int4): ``data`` int32 ``[N, ceil(K/8)]``, eight
  4-bit codes per word, K element ``8j + i`` in bits ``4i .. 4i+3`` of word ``j``, each code the
  signed value plus 8; ``scale`` ``[N, ceil(K/G)]`` in the checkpoint's float dtype, one per group
  of ``G`` K elements (``G = K`` for the channel strategy); asymmetric checkpoints add ``zero``
  int32 ``[ceil(N/8), ceil(K/G)]``, zero points packed the same way along N. ``w = float(q - z) *
  float(scale)`` with ``q`` and ``z`` the stored codes (``z = 8`` when symmetric).

A bank of ``S`` slots adds a leading slot dimension to every tensor (:class:`QuantWeights`; the
per-tensor ``scale2`` becomes ``[S]``). :class:`ExpertRecordLayout` lays one expert (up then down
projection) out as one contiguous byte record, the unit the offload runtime stores on the host and
copies into a device slot; a bank of records ``[S, record_bytes]`` uint8 is viewed as the two
projections' :class:`QuantWeights` without copying.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

__all__ = [
    "FORMATS",
    "NVFP4_BLOCK",
    "E2M1_VALUES",
    "QuantSpec",
    "QuantWeights",
    "ExpertRecordLayout",
    "RECORD_ALIGN",
    "e2m1_values",
    "dequantize",
    "dequantize_nvfp4",
    "dequantize_fp8",
    "dequantize_w4a16",
    "unpack_int4",
]

FORMATS = ("nvfp4", "fp8", "w4a16")
NVFP4_BLOCK = 16
#: every section of an expert record starts at a multiple of this many bytes (vector loads, dtype views)
RECORD_ALIGN = 16
#: E2M1 values of the 16 codes: sign in bit 3, magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _align(n: int) -> int:
    return _cdiv(n, RECORD_ALIGN) * RECORD_ALIGN


@dataclass(frozen=True)
class QuantSpec:
    """The storage format of one quantized Linear weight.

    ``format``: one of :data:`FORMATS`. ``group_size``: K elements per scale (16 for ``nvfp4``;
    ``w4a16``: the group size, or None for one group per row, the channel strategy; unused for
    ``fp8``). ``symmetric``: ``w4a16`` without zero points. ``scale_dtype``: dtype of the ``w4a16``
    group scales (the checkpoint's: bf16, fp16 or fp32).
    """

    format: str
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown quantized format {self.format!r}; expected one of {FORMATS}")
        if self.format == "nvfp4":
            object.__setattr__(self, "group_size", NVFP4_BLOCK)
            object.__setattr__(self, "symmetric", True)
        elif self.format == "fp8":
            object.__setattr__(self, "group_size", None)
            object.__setattr__(self, "symmetric", True)
        else:
            if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
                raise ValueError(f"w4a16 group_size must be a positive integer or None, got {self.group_size!r}")
            if self.scale_dtype not in _SCALE_DTYPES:
                raise ValueError(f"w4a16 scales must be bf16, fp16 or fp32, got {self.scale_dtype}")
        if self.format != "w4a16":
            object.__setattr__(self, "scale_dtype", torch.float8_e4m3fn if self.format == "nvfp4" else torch.float32)

    # ------------------------------------------------------------------ shapes of one [N, K] weight
    def groups(self, k: int) -> int:
        """Scale columns per row (K blocks or groups)."""
        if self.format == "fp8":
            return 0
        return 1 if self.group_size is None else _cdiv(k, self.group_size)

    def group_of(self, k: int) -> int:
        """K elements one scale covers."""
        return k if self.group_size is None else self.group_size

    def data_shape(self, n: int, k: int) -> tuple[int, int]:
        if self.format == "nvfp4":
            return (n, _cdiv(k, 2))
        if self.format == "fp8":
            return (n, k)
        return (n, _cdiv(k, 8))

    @property
    def data_dtype(self) -> torch.dtype:
        return {"nvfp4": torch.uint8, "fp8": torch.float8_e4m3fn, "w4a16": torch.int32}[self.format]

    def scale_shape(self, n: int, k: int) -> tuple[int, int] | None:
        """Shape of the block / group scales (None for fp8, which has only the per-tensor scale)."""
        return None if self.format == "fp8" else (n, self.groups(k))

    def zero_shape(self, n: int, k: int) -> tuple[int, int] | None:
        return None if self.symmetric else (_cdiv(n, 8), self.groups(k))

    @property
    def has_scalar(self) -> bool:
        """True when the weight has a per-tensor fp32 scale (nvfp4 ``weight_scale_2``, fp8 ``weight_scale``)."""
        return self.format in ("nvfp4", "fp8")

    def weight_bytes(self, n: int, k: int) -> int:
        """Bytes of the weight, its block/group scales and zero points (per-tensor scalars not included)."""
        total = _numel(self.data_shape(n, k)) * self.data_dtype.itemsize
        if self.scale_shape(n, k) is not None:
            total += _numel(self.scale_shape(n, k)) * self.scale_dtype.itemsize
        if self.zero_shape(n, k) is not None:
            total += _numel(self.zero_shape(n, k)) * 4
        return total

    def check_shape(self, n: int, k: int) -> None:
        """Refuse weights the format cannot hold (NVFP4 needs K divisible by its 16-element blocks)."""
        if self.format == "nvfp4" and k % NVFP4_BLOCK:
            raise ValueError(f"NVFP4 needs in_features divisible by {NVFP4_BLOCK}, got {k}")

    def describe(self) -> str:
        if self.format == "nvfp4":
            return "NVFP4 (E2M1, E4M3 scale per 16, fp32 global)"
        if self.format == "fp8":
            return "FP8 E4M3 per tensor"
        group = "per channel" if self.group_size is None else f"group {self.group_size}"
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"W4A16 int4 {group} {kind}, {str(self.scale_dtype).removeprefix('torch.')} scales"


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


@dataclass(frozen=True)
class QuantWeights:
    """One quantized projection for every slot of a bank: logically ``[S, N, K]`` weights.

    ``data`` ``[S, *spec.data_shape(N, K)]``; ``scale`` ``[S, *spec.scale_shape(N, K)]`` (None for
    fp8); ``scale2`` ``[S]`` fp32 per-tensor scale (None for w4a16); ``zero`` ``[S,
    *spec.zero_shape(N, K)]`` (asymmetric w4a16 only). Tensors may be views with any slot stride
    (a bank of records); their inner two dimensions must be row-major contiguous.
    """

    spec: QuantSpec
    n: int
    k: int
    data: torch.Tensor
    scale: torch.Tensor | None = None
    scale2: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    input_scale: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.check()

    @property
    def num_slots(self) -> int:
        return self.data.shape[0]

    @property
    def device(self) -> torch.device:
        return self.data.device

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.data, self.scale, self.scale2, self.zero) if t is not None]

    def check(self) -> None:
        """Shapes, dtypes and devices against the spec; raises ValueError naming the tensor."""
        s, n, k = self.spec, self.n, self.k
        s.check_shape(n, k)
        slots = self.data.shape[0] if self.data.dim() == 3 else -1

        def want(name: str, t: torch.Tensor | None, shape: tuple[int, ...] | None, dtype: torch.dtype) -> None:
            if shape is None:
                if t is not None:
                    raise ValueError(f"{s.format} weights take no {name}")
                return
            if t is None:
                raise ValueError(f"{s.format} weights need {name} {list(shape)}")
            if tuple(t.shape) != (slots, *shape) or t.dtype != dtype:
                raise ValueError(f"{s.format} {name} must be [{slots}, {', '.join(map(str, shape))}] {dtype}, "
                                 f"got {list(t.shape)} {t.dtype}")
            if t.dim() == 3 and (t.stride(2) != 1 or t.stride(1) != shape[1]):
                raise ValueError(f"{s.format} {name} must be row-major inside each slot, got strides {t.stride()}")
            if t.device != self.data.device:
                raise ValueError(f"{s.format} {name} is on {t.device}, data on {self.data.device}")

        if slots < 0:
            raise ValueError(f"{s.format} data must be [slots, N, K'], got {list(self.data.shape)}")
        want("data", self.data, s.data_shape(n, k), s.data_dtype)
        want("scale", self.scale, s.scale_shape(n, k), s.scale_dtype)
        want("zero", self.zero, s.zero_shape(n, k), torch.int32)
        if s.has_scalar:
            if self.scale2 is None or tuple(self.scale2.shape) != (slots,) or self.scale2.dtype != torch.float32:
                got = None if self.scale2 is None else f"{list(self.scale2.shape)} {self.scale2.dtype}"
                raise ValueError(f"{s.format} weights need scale2 [{slots}] float32 (per-tensor scale), got {got}")
            if self.scale2.device != self.data.device:
                raise ValueError(f"{s.format} scale2 is on {self.scale2.device}, data on {self.data.device}")
        elif self.scale2 is not None:
            raise ValueError("w4a16 weights take no per-tensor scale2")

    def slots(self, index: torch.Tensor | list[int] | slice) -> QuantWeights:
        """The weights of some slots (a copy for index tensors/lists, a view for slices)."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return replace(self, data=pick(self.data), scale=pick(self.scale), scale2=pick(self.scale2),
                       zero=pick(self.zero), input_scale=pick(self.input_scale))

    def dequantize(self) -> torch.Tensor:
        """All slots' weights ``[S, N, K]`` in fp32 (the reference dequantization)."""
        return dequantize(self.spec, self.n, self.k, self.data, self.scale, self.scale2, self.zero)


# ---------------------------------------------------------------------- dequantization (the reference)


def e2m1_values(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 E2M1 code values as fp32 ``[16]``."""
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


def _expand_groups(scale: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """Per-element scale ``[..., N, K]`` from per-group scales ``[..., N, G]``."""
    return scale.repeat_interleave(group, dim=-1)[..., :k]


def dequantize_nvfp4(data: torch.Tensor, scale: torch.Tensor, scale2: torch.Tensor, k: int) -> torch.Tensor:
    """NVFP4 ``data [..., N, K/2]`` uint8, ``scale [..., N, K/16]`` e4m3, ``scale2 [...]`` fp32 → fp32 ``[..., N, K]``.

    The product order is fixed: ``(e2m1 * scale) * scale2`` in fp32 (the first product is exact).
    """
    codes = torch.stack((data & 0xF, data >> 4), dim=-1).flatten(-2)[..., :k].long()  # even K element = low nibble
    values = e2m1_values(data.device)[codes]
    block = _expand_groups(scale.float(), NVFP4_BLOCK, k)
    return (values * block) * scale2.float().reshape(*scale2.shape, 1, 1)


def dequantize_fp8(data: torch.Tensor, scale2: torch.Tensor) -> torch.Tensor:
    """FP8 ``data [..., N, K]`` e4m3 and per-tensor ``scale2 [...]`` fp32 → fp32 ``[..., N, K]``."""
    return data.float() * scale2.float().reshape(*scale2.shape, 1, 1)


def unpack_int4(words: torch.Tensor, count: int, dim: int = -1) -> torch.Tensor:
    """The 4-bit codes ``0..15`` of int32 ``words`` packed along ``dim`` (element 8j+i in bits 4i..), int32."""
    words = words.movedim(dim, -1)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    codes = (words.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift, then the mask keeps 4 bits
    return codes.flatten(-2)[..., :count].movedim(-1, dim)


def dequantize_w4a16(data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, n: int, k: int,
                     group: int) -> torch.Tensor:
    """W4A16 ``data [..., N, ceil(K/8)]`` int32, ``scale [..., N, G]``, ``zero [..., ceil(N/8), G]`` → fp32
    ``[..., N, K]``."""
    q = unpack_int4(data, k)
    if zero is None:
        z = torch.full((), 8, dtype=torch.int32, device=data.device)
    else:
        z = _expand_groups(unpack_int4(zero, n, dim=-2), group, k)
    return (q - z).float() * _expand_groups(scale.float(), group, k)


def dequantize(spec: QuantSpec, n: int, k: int, data: torch.Tensor, scale: torch.Tensor | None,
               scale2: torch.Tensor | None, zero: torch.Tensor | None) -> torch.Tensor:
    """The fp32 weights ``[..., N, K]`` of one format's tensors (leading dimensions: slots, or none)."""
    if spec.format == "nvfp4":
        return dequantize_nvfp4(data, scale, scale2, k)
    if spec.format == "fp8":
        return dequantize_fp8(data, scale2)
    return dequantize_w4a16(data, scale, zero, n, k, spec.group_of(k))


# ---------------------------------------------------------------------- the expert record


@dataclass(frozen=True)
class _Section:
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


#: checkpoint tensor names of one quantized Linear, per format and record section
_TENSOR_NAMES = {
    "nvfp4": {"data": "weight", "scale": "weight_scale", "scale2": "weight_scale_2", "input_scale": "input_scale"},
    "fp8": {"data": "weight", "scale2": "weight_scale", "input_scale": "input_scale"},
    "w4a16": {"data": "weight_packed", "scale": "weight_scale", "zero": "weight_zero_point"},
}


@dataclass(frozen=True)
class ExpertRecordLayout:
    """One routed expert as a contiguous byte record: up ``[inner, width]`` then down ``[width, inner]``.

    Sections, in order, each starting at a multiple of :data:`RECORD_ALIGN` bytes: up data, up
    scale, up zero points, down data, down scale, down zero points, then (nvfp4 and fp8) four fp32
    scalars: up per-tensor scale, down per-tensor scale, up input_scale, down input_scale (the
    input scales are kept from the checkpoint but never read: the kernels are weight-only).
    Absent sections take no bytes. ``record_bytes`` is a multiple of :data:`RECORD_ALIGN`, so a bank
    ``[S, record_bytes]`` uint8 has every section view aligned in every slot. For Super
    (1024 / 2688): NVFP4 3,096,592 B, FP8 5,505,040 B, W4A16 g128 symmetric bf16 2,838,528 B.

    The interface matches the runtime's float ``ExpertLayout``: ``dtype`` (uint8),
    ``record_numel`` (= ``record_bytes``), ``up(records)`` / ``down(records)`` (here
    :class:`QuantWeights` views of a ``[S, record_bytes]`` bank).
    """

    spec: QuantSpec
    inner: int
    width: int
    sections: dict[str, _Section] = field(init=False, compare=False, repr=False)
    record_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        s = self.spec
        s.check_shape(self.inner, self.width)
        s.check_shape(self.width, self.inner)
        sections: dict[str, _Section] = {}
        offset = 0

        def add(name: str, shape: tuple[int, ...] | None, dtype: torch.dtype) -> None:
            nonlocal offset
            if shape is None:
                return
            sections[name] = _Section(offset, tuple(shape), dtype)
            offset = _align(offset + sections[name].nbytes)

        for proj, (n, k) in (("up", (self.inner, self.width)), ("down", (self.width, self.inner))):
            add(f"{proj}.data", s.data_shape(n, k), s.data_dtype)
            add(f"{proj}.scale", s.scale_shape(n, k), s.scale_dtype)
            add(f"{proj}.zero", s.zero_shape(n, k), torch.int32)
        if s.has_scalar:
            add("scalars", (4,), torch.float32)
        object.__setattr__(self, "sections", sections)
        object.__setattr__(self, "record_bytes", offset)

    # ------------------------------------------------------------------ the runtime's layout interface
    @property
    def gaps(self) -> list[tuple[int, int]]:
        """Byte ranges of the record that no section uses (alignment padding)."""
        out, end = [], 0
        for sec in sorted(self.sections.values(), key=lambda s: s.offset):
            if sec.offset > end:
                out.append((end, sec.offset))
            end = sec.offset + sec.nbytes
        if end < self.record_bytes:
            out.append((end, self.record_bytes))
        return out

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def record_numel(self) -> int:
        return self.record_bytes

    @property
    def quantized(self) -> bool:
        return True

    def _view(self, records: torch.Tensor, name: str) -> torch.Tensor:
        sec = self.sections[name]
        flat = records[:, sec.offset:sec.offset + sec.nbytes]
        return flat.view(sec.dtype).unflatten(1, sec.shape)

    def _check_records(self, records: torch.Tensor) -> None:
        if records.dim() != 2 or records.dtype != torch.uint8 or records.shape[1] != self.record_bytes:
            raise ValueError(f"expert records must be [slots, {self.record_bytes}] uint8, got "
                             f"{list(records.shape)} {records.dtype}")
        if records.stride(1) != 1 or records.stride(0) % RECORD_ALIGN or records.data_ptr() % RECORD_ALIGN:
            raise ValueError(f"expert records must be rows of contiguous bytes aligned to {RECORD_ALIGN}")

    def projection(self, records: torch.Tensor, proj: str) -> QuantWeights:
        """The ``"up"`` or ``"down"`` weights of every record in ``records [S, record_bytes]`` (views)."""
        self._check_records(records)
        n, k = (self.inner, self.width) if proj == "up" else (self.width, self.inner)
        scale = self._view(records, f"{proj}.scale") if f"{proj}.scale" in self.sections else None
        zero = self._view(records, f"{proj}.zero") if f"{proj}.zero" in self.sections else None
        scale2 = input_scale = None
        if self.spec.has_scalar:
            scalars = self._view(records, "scalars")  # [S, 4]
            column = 0 if proj == "up" else 1
            scale2, input_scale = scalars[:, column], scalars[:, column + 2]
        return QuantWeights(self.spec, n, k, self._view(records, f"{proj}.data"), scale, scale2, zero, input_scale)

    def up(self, records: torch.Tensor) -> QuantWeights:
        return self.projection(records, "up")

    def down(self, records: torch.Tensor) -> QuantWeights:
        return self.projection(records, "down")

    def empty(self, slots: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """A bank of ``slots`` records (uninitialised)."""
        return torch.empty(slots, self.record_bytes, dtype=torch.uint8, device=device)

    # ------------------------------------------------------------------ filling from a checkpoint
    def tensor_names(self, prefix: str) -> dict[str, str]:
        """Record part → checkpoint tensor name for expert ``prefix`` (e.g. ``...mixer.experts.7``)."""
        out = {}
        for proj in ("up", "down"):
            for part, leaf in _TENSOR_NAMES[self.spec.format].items():
                if part in ("scale", "zero") and f"{proj}.{part}" not in self.sections:
                    continue
                out[f"{proj}.{part}"] = f"{prefix}.{proj}_proj.{leaf}"
        return out

    def fill(self, read_into: Callable[[str, torch.Tensor], None], prefix: str, record: torch.Tensor,
             has: Callable[[str], bool] | None = None) -> None:
        """Fill one record ``[record_bytes]`` uint8 from a checkpoint: ``read_into(name, out)`` copies a
        stored tensor's bytes into ``out`` (``Checkpoint.read_into``); ``has(name)`` says whether an
        optional tensor (``input_scale``) exists (absent: its scalar is 0)."""
        rec = record.view(1, -1)
        weights = {"up": self.up(rec), "down": self.down(rec)}
        for part, name in self.tensor_names(prefix).items():
            proj, what = part.split(".")
            target = getattr(weights[proj], what)
            if what == "input_scale" and has is not None and not has(name):
                target.zero_()
                continue
            read_into(name, target[0])
        # padding bytes are never read, but a record is compared and hashed as a whole: keep them zero
        for start, end in self.gaps:
            record[start:end] = 0

    def pack(self, up: dict[str, torch.Tensor], down: dict[str, torch.Tensor], record: torch.Tensor) -> None:
        """Write one expert's tensors (``{"data", "scale", "scale2", "zero", "input_scale"}`` per
        projection, without a slot dimension) into ``record [record_bytes]``."""
        record.zero_()
        rec = record.view(1, -1)
        for proj, parts in (("up", up), ("down", down)):
            w = self.projection(rec, proj)
            for what in ("data", "scale", "zero", "scale2", "input_scale"):
                target = getattr(w, what)
                if target is None:
                    continue
                value = parts.get(what)
                if value is None:
                    if what == "input_scale":
                        continue
                    raise ValueError(f"{self.spec.format} record needs {proj} {what}")
                target[0].copy_(value.reshape(target[0].shape))
