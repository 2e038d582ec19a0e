"""Build a :class:`~residency.model.modeling.NemotronHForCausalLM` from a validated checkpoint.

Without experts (``experts=False``) it builds the dense part the offload runtime runs beside.

The module tree is built on the ``meta`` device (no storage, no random initialisation). Before
any weight is read, the bytes the model will occupy on the target device are compared with the
memory free there; a model that does not fit is refused with the byte breakdown and the fix.
Then every parameter and buffer is allocated once, in its target dtype, on its target device, and
filled straight from the checkpoint file (:meth:`Checkpoint.read_into`); nothing is allocated in
fp32 first and no full-size temporary copy is made. Per-expert tensors are read into their slice
of each layer's stacked ``[E, I, L]`` / ``[E, L, I]`` banks. Router weights and the score
correction bias are stored in fp32 (the router computes in fp32), converted once here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BudgetError
from .checkpoint import FLOAT_DTYPES, Checkpoint
from .modeling import NemotronHForCausalLM, meta_model
from .moe import ResidentExperts, Router

_EXPERT = re.compile(r"^(backbone\.layers\.\d+\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")
PROGRESS_MIN_BYTES = 1 << 30
#: ``allocate(shape, dtype, what) -> tensor``: how build_model makes each device tensor
Allocator = Callable[[Sequence[int], torch.dtype, str], torch.Tensor]
# what the loader keeps free on the device besides the weights (allocator, activations of a short prompt)
DEVICE_HEADROOM_BYTES = 256 << 20


@dataclass(frozen=True)
class LoadFootprint:
    """Bytes the loaded model occupies on its device, by kind."""

    expert_bytes: int
    other_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes + self.other_bytes


def target_dtype(module: nn.Module, meta: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a module's tensor is stored in: integer tables keep theirs, the router fp32, the rest ``dtype``."""
    if not meta.is_floating_point():
        return meta.dtype
    return torch.float32 if isinstance(module, Router) else dtype


def build_model(
    ckpt: Checkpoint, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    progress: bool | None = None, experts: bool = True, allocate: Allocator | None = None,
) -> NemotronHForCausalLM:
    """Validate ``ckpt`` and load it into a new model on ``device``.

    ``dtype`` defaults to the checkpoint's own floating dtype; router weights and bias are fp32.
    ``progress`` defaults to showing a bar when the checkpoint exceeds 1 GiB. With
    ``experts=False`` the routed-expert banks are neither allocated nor read (they stay on the
    ``meta`` device until the caller installs another expert backend, e.g. the offload runtime);
    ``allocate(shape, dtype, what)``, when given, makes every device tensor (the offload runtime's
    budget ledger), and the fit check against free memory is left to it.
    """
    ckpt.validate()
    device = torch.device(device)
    if dtype is None:
        dtype = checkpoint_dtype(ckpt)
    model = meta_model(ckpt.config)
    if allocate is None:
        check_fits(model, dtype, device, ckpt, experts=experts)

        def allocate(shape, tensor_dtype, what):
            return torch.empty(shape, dtype=tensor_dtype, device=device)

    params: dict[str, torch.Tensor] = {}
    for module_name, module, kind, name, meta in _tensors(model):
        if not experts and isinstance(module, ResidentExperts):
            continue
        real = allocate(meta.shape, target_dtype(module, meta, dtype), "dense weights")
        if kind == "param":
            module._parameters[name] = nn.Parameter(real, requires_grad=False)
        else:
            module._buffers[name] = real
        params[f"{module_name}.{name}" if module_name else name] = real
    for module in model.modules() if experts else ():
        if isinstance(module, ResidentExperts):  # not in the checkpoint: the identity slot table
            module.reset_slot_table()

    names = sorted((n for n in ckpt.tensors if not n.startswith("mtp.") and (experts or not _EXPERT.match(n))),
                   key=_load_order)
    show = progress if progress is not None else ckpt.total_bytes >= PROGRESS_MIN_BYTES
    iterator = names
    if show:
        from tqdm.auto import tqdm

        iterator = tqdm(names, desc="loading weights", unit="tensor")
    try:
        for name in iterator:
            match = _EXPERT.match(name)
            if match:
                prefix, expert, proj = match.groups()
                ckpt.read_into(name, params[f"{prefix}.{proj}"][int(expert)])
            else:  # validate() guarantees every backbone tensor has a destination
                ckpt.read_into(name, params[name])
    finally:
        ckpt.close()
    model.eval()
    return model


def footprint(model: nn.Module, dtype: torch.dtype) -> LoadFootprint:
    """Bytes of every parameter and buffer of ``model`` (a meta model is fine) once loaded in ``dtype``."""
    experts = other = 0
    for _, module, _, _, meta in _tensors(model):
        size = meta.numel() * target_dtype(module, meta, dtype).itemsize
        if isinstance(module, ResidentExperts):
            experts += size
        else:
            other += size
    return LoadFootprint(experts, other)


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
    """The floating dtype holding most of the checkpoint's bytes."""
    counts: dict[str, int] = {}
    for info in ckpt.tensors.values():
        counts[info.dtype] = counts.get(info.dtype, 0) + info.nbytes
    main = max(counts, key=counts.get)
    return FLOAT_DTYPES[main]


def _tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, str, torch.Tensor]]:
    """(module name, module, "param"/"buffer", tensor name, tensor) for every direct tensor of every module."""
    for module_name, module in model.named_modules():
        for name, param in module._parameters.items():
            if param is not None:
                yield module_name, module, "param", name, param
        for name, buf in module._buffers.items():
            if buf is not None:
                yield module_name, module, "buffer", name, buf


def _load_order(name: str) -> tuple[int, str]:
    m = re.match(r"backbone\.layers\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)
