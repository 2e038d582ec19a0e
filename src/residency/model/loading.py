"""Build a :class:`~residency.model.modeling.NemotronHForCausalLM` from a validated checkpoint.

Without experts (``experts=False``) it builds the dense part the offload runtime runs beside;
with ``embeddings_on_host=True`` the embedding table is a host tensor (:class:`HostEmbedding`),
allocated and filled like every other weight but never on the device.

The module tree is built on the ``meta`` device (no storage, no random initialisation). Before
any weight is read, the bytes the model will occupy on the target device are compared with the
memory free there; a model that does not fit is refused with the byte breakdown and the fix.
Then every parameter and buffer is allocated once, in its target dtype, on its target device, and
filled straight from the checkpoint file (:meth:`Checkpoint.read_into`); nothing is allocated in
fp32 first and no full-size temporary copy is made. Per-expert tensors are read into their slice
of each layer's stacked ``[E, I, L]`` / ``[E, L, I]`` banks. Router weights and the score
correction bias are stored in fp32 (the router computes in fp32), converted once here.

Quantized checkpoints (see :mod:`residency.model.quant`) keep their quantized bytes: a layer whose
routed experts are NVFP4, FP8 or W4A16 gets a :class:`~residency.model.quant.QuantizedExperts`
backend (one bank of expert records, read record by record), and each quantized dense Linear
becomes a :class:`~residency.model.quant.QuantLinear` holding the checkpoint's tensors. Both
compute exactly what the model with the weights dequantized at load computes (on CPU, bit for bit
for the dense modules). ``lm_head`` is always dequantized at load, and ``dequantize=True``
dequantizes everything into plain float modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BudgetError, InputError
from .checkpoint import FLOAT_DTYPES, Checkpoint
from .modeling import HostEmbedding, NemotronHForCausalLM, keep_embeddings_on_host, meta_model, tie_embeddings
from .moe import ExpertBackend, ResidentExperts, Router
from .quant.modules import QuantizedExperts, QuantLinear

PROGRESS_MIN_BYTES = 1 << 30
#: ``allocate(shape, dtype, what) -> tensor``: how build_model makes each device tensor
Allocator = Callable[[Sequence[int], torch.dtype, str], torch.Tensor]
# what the loader keeps free on the device besides the weights (allocator, activations of a short prompt)
DEVICE_HEADROOM_BYTES = 256 << 20


@dataclass(frozen=True)
class LoadFootprint:
    """Bytes the loaded model occupies on its device, by kind (``host_bytes``: what stays in host
    memory, the embedding table of a :class:`HostEmbedding`; not part of :attr:`total_bytes`)."""

    expert_bytes: int
    other_bytes: int
    host_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes + self.other_bytes


def target_dtype(module: nn.Module, meta: torch.Tensor, dtype: torch.dtype, name: str = "") -> torch.dtype:
    """The dtype a module's tensor is stored in: integer tables and quantized tensors keep theirs, the
    router fp32, the rest ``dtype``."""
    if not meta.is_floating_point():
        return meta.dtype
    if isinstance(module, QuantizedExperts) or (isinstance(module, QuantLinear) and name != "bias"):
        return meta.dtype
    return torch.float32 if isinstance(module, Router) else dtype


def quantized_expert_layout(ckpt: Checkpoint):
    """The :class:`~residency.kernels.moe.quant_formats.ExpertRecordLayout` of ``ckpt``'s routed experts
    (one format for every MoE layer), or None when they are float.

    This is the record the offload runtime stores per expert and copies into a slot; fill one with
    ``layout.fill(ckpt.read_into, f"{prefix}.{e}", record, has=ckpt.tensors.__contains__)``.
    Raises :class:`CheckpointError` when the layers' experts have different formats.
    """
    from ..errors import CheckpointError
    from ..kernels.moe.quant_formats import ExpertRecordLayout

    config = ckpt.config
    specs = {layer: ckpt.expert_spec(layer) for layer in config.moe_layers}
    distinct = set(specs.values())
    if len(distinct) > 1:
        names = sorted("bf16" if s is None else s.describe() for s in distinct)
        raise CheckpointError(f"{ckpt.folder}: the MoE layers' experts have different formats ({'; '.join(names)}); "
                              "one host record layout needs one format: re-quantize the experts alike")
    spec = next(iter(distinct), None)
    if spec is None:
        return None
    return ExpertRecordLayout(spec, config.moe_intermediate_size, config.expert_input_size)


def quantize_meta_model(model: NemotronHForCausalLM, ckpt: Checkpoint, dtype: torch.dtype, *,
                        experts: bool = True, dequantize: bool = False) -> None:
    """Swap in quantized modules where ``ckpt`` stores quantized weights (on the meta model, before allocation).

    Quantized dense Linears (all but ``lm_head``) become :class:`QuantLinear`; layers of quantized
    routed experts get a :class:`QuantizedExperts` backend (only when ``experts``). Nothing changes
    for a float checkpoint or with ``dequantize=True``.
    """
    if ckpt.quant is None or dequantize:
        return
    from ..kernels.moe.quant_formats import ExpertRecordLayout

    config = ckpt.config
    with torch.device("meta"):
        for name, (out_f, in_f) in ckpt.linears.items():
            spec = ckpt.module_spec(name)
            if spec is None or name == "lm_head" or ".mixer.experts." in name:
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, attr)
            setattr(parent, attr, QuantLinear(in_f, out_f, spec, dtype, bias=old.bias is not None))
        if not experts:
            return
        for layer, mixer in zip(config.moe_layers, model.moe_mixers):
            spec = ckpt.expert_spec(layer)
            if spec is not None:
                layout = ExpertRecordLayout(spec, config.moe_intermediate_size, config.expert_input_size)
                mixer.experts = QuantizedExperts(layout, config.n_routed_experts)


def build_model(
    ckpt: Checkpoint, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    progress: bool | None = None, experts: bool = True, allocate: Allocator | None = None,
    dequantize: bool = False, embeddings_on_host: bool = False,
) -> NemotronHForCausalLM:
    """Validate ``ckpt`` and load it into a new model on ``device``.

    ``dtype`` defaults to the checkpoint's own floating dtype; router weights and bias are fp32.
    ``progress`` defaults to showing a bar when the checkpoint exceeds 1 GiB. With
    ``experts=False`` the routed-expert banks are neither allocated nor read (they stay on the
    ``meta`` device until the caller installs another expert backend, e.g. the offload runtime);
    ``allocate(shape, dtype, what)``, when given, makes every device tensor (the offload runtime's
    budget ledger), and the fit check against free memory is left to it. Quantized weights stay
    quantized (see the module docstring) unless ``dequantize``. ``embeddings_on_host``: the
    embedding table is allocated in host memory (``allocate`` is not asked for it) and a
    :class:`HostEmbedding` copies each call's rows to ``device``.
    """
    ckpt.validate()
    device = torch.device(device)
    if dtype is None:
        dtype = checkpoint_dtype(ckpt)
    model = meta_model(ckpt.config)
    if ckpt.ties_embeddings:
        if embeddings_on_host:
            raise InputError("this checkpoint ties lm_head to the embedding table (tie_word_embeddings, no "
                             "lm_head.weight), which lm_head reads whole every token: keep the table on the device")
        tie_embeddings(model)  # one tensor, allocated and read once (under the embeddings)
    if embeddings_on_host:
        keep_embeddings_on_host(model, device)
    quantize_meta_model(model, ckpt, dtype, experts=experts, dequantize=dequantize)
    if allocate is None:
        check_fits(model, dtype, device, ckpt, experts=experts)

        def allocate(shape, tensor_dtype, what):
            return torch.empty(shape, dtype=tensor_dtype, device=device)

    reads: list[tuple[str, Callable[[], None]]] = []  # (what, read) in model order
    for module_name, module, kind, name, meta in _tensors(model):
        if isinstance(module, ExpertBackend):
            if not experts:
                continue
            if name == "slot_of_expert":  # not in the checkpoint: the identity slot table
                real = allocate(meta.shape, meta.dtype, "slot tables")
                module._buffers[name] = real
                continue
        if isinstance(module, HostEmbedding):  # host memory, outside any device budget
            real = torch.empty(meta.shape, dtype=target_dtype(module, meta, dtype, name), device="cpu")
        else:
            real = allocate(meta.shape, target_dtype(module, meta, dtype, name), "dense weights")
        if kind == "param":
            module._parameters[name] = nn.Parameter(real, requires_grad=False)
        else:
            module._buffers[name] = real
        full = f"{module_name}.{name}" if module_name else name
        reads += _reads(ckpt, module_name, module, name, full, real)
    if ckpt.ties_embeddings:  # lm_head still holds the meta tensor: point it at the loaded table
        tie_embeddings(model)
    for module in model.modules() if experts else ():
        if isinstance(module, (ResidentExperts, QuantizedExperts)):
            module.reset_slot_table()

    show = progress if progress is not None else ckpt.total_bytes >= PROGRESS_MIN_BYTES
    iterator = reads
    if show:
        from tqdm.auto import tqdm

        iterator = tqdm(reads, desc="loading weights", unit="tensor")
    try:
        for _, read in iterator:
            read()
    finally:
        ckpt.close()
    model.eval()
    return model


def _reads(ckpt: Checkpoint, module_name: str, module: nn.Module, name: str, full: str,
           real: torch.Tensor) -> list[tuple[str, Callable[[], None]]]:
    """How to fill one allocated tensor from the checkpoint (one read per stored tensor or expert record)."""
    if isinstance(module, ResidentExperts):  # per-expert tensors into their slice of the stacked bank
        proj = name  # up_proj / down_proj
        return [(f"{module_name}.{e}.{proj}.weight",
                 lambda e=e: ckpt.read_into(f"{module_name}.{e}.{proj}.weight", real[e]))
                for e in range(real.shape[0])]
    if isinstance(module, QuantizedExperts):  # one record per expert: up and down, data, scales, scalars
        def has(tensor: str) -> bool:
            return tensor in ckpt.tensors

        return [(f"{module_name}.{e}", lambda e=e: module.layout.fill(ckpt.read_into, f"{module_name}.{e}", real[e],
                                                                       has))
                for e in range(real.shape[0])]
    if real.dim() == 0 or (isinstance(module, QuantLinear) and real.numel() == 1 and name != "bias"):
        # per-tensor scales may be stored as [] or [1]
        return [(full, lambda: ckpt.read_into(full, real.view(-1) if real.dim() else real))]
    return [(full, lambda: ckpt.read_into(full, real))]


def footprint(model: nn.Module, dtype: torch.dtype) -> LoadFootprint:
    """Bytes of every parameter and buffer of ``model`` (a meta model is fine) once loaded in ``dtype``."""
    experts = other = host = 0
    for _, module, _, name, meta in _tensors(model):
        size = meta.numel() * target_dtype(module, meta, dtype, name).itemsize
        if isinstance(module, ExpertBackend):
            experts += size
        elif isinstance(module, HostEmbedding):
            host += size
        else:
            other += size
    return LoadFootprint(experts, other, host)


def free_device_bytes(device: torch.device) -> tuple[int, str]:
    """Memory free for the model on ``device`` and where the figure comes from."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), "free on the GPU (cudaMemGetInfo)"
    import psutil

    return int(psutil.virtual_memory().available), "available host memory"


def check_fits(model: nn.Module, dtype: torch.dtype, device: torch.device, ckpt: Checkpoint, *,
               experts: bool = True) -> None:
    """Refuse, before any weight is read, a model whose weights do not fit the memory free on ``device``."""
    need = footprint(model, dtype)
    if not experts:
        need = LoadFootprint(0, need.other_bytes)
    free, where = free_device_bytes(device)
    if need.total_bytes + DEVICE_HEADROOM_BYTES <= free:
        return
    from ..sizes import format_bytes

    raise BudgetError(
        f"{ckpt.folder}: the model needs {format_bytes(need.total_bytes)} on {device} "
        f"(routed experts {format_bytes(need.expert_bytes)}, everything else {format_bytes(need.other_bytes)}, "
        f"in {str(dtype).removeprefix('torch.')}) plus {format_bytes(DEVICE_HEADROOM_BYTES)} headroom, but only "
        f"{format_bytes(free)} is {where}. Fix: load on a device with more memory, or keep the experts off the "
        "device with vram_budget= / plan= (the offload runtime)"
    )


def checkpoint_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The floating dtype (BF16/F16/F32) holding most of the checkpoint's float bytes.

    Packed and scale tensors of quantized modules (U8, I32, F8_E4M3) do not count: a quantized
    checkpoint loads in the dtype of its unquantized tensors (embeddings, norms, lm_head ...).
    """
    counts: dict[str, int] = {}
    for info in ckpt.tensors.values():
        if info.dtype in FLOAT_DTYPES:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.nbytes
    if not counts:
        return torch.bfloat16
    main = max(counts, key=counts.get)
    return FLOAT_DTYPES[main]


def _tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, str, torch.Tensor]]:
    """(module name, module, "param"/"buffer", tensor name, tensor) for every direct tensor of every module.

    A tensor shared by two modules (tied word embeddings: ``lm_head.weight`` is the embedding
    table) is listed once, under the first module that holds it.
    """
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                yield module_name, module, "param", name, param
        for name, buf in module._buffers.items():
            if buf is not None:
                yield module_name, module, "buffer", name, buf
