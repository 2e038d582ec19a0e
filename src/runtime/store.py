"""Host tier: every routed expert of every MoE layer once in host memory, one contiguous record per expert.

A record is the expert's ``up`` ``[I, L]`` followed by its ``down`` ``[L, I]`` in the model dtype,
so one copy moves a whole expert into a device slot of the same layout. Each MoE layer's records
live in one buffer allocated at exact size by the ordinary allocator and then page-locked with
``cudaHostRegister`` when a CUDA device is used (not PyTorch's pinned allocator, which rounds
every block up to a power of two: 5.6 GiB per Super layer would become 8). Pinning that fails
falls back to pageable memory with a warning. Experts a plan puts on disk get no record: they
stay in the checkpoint file and are read on demand (:meth:`HostExpertStore.read_from_disk`).

The store is filled layer by layer straight from the checkpoint (:meth:`Checkpoint.read_into`),
so loading needs no memory beyond the records themselves and a bounded staging buffer.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CheckpointError


@dataclass(frozen=True)
class ExpertLayout:
    """Shape of one float expert record: ``up [inner, width]`` then ``down [width, inner]``, in ``dtype``.

    Quantized checkpoints use :class:`residency.kernels.moe.quant_formats.ExpertRecordLayout`
    instead (uint8 records of packed weights and scales, ``quantized = True``), which has the same
    interface; the store, the slot banks and the copies handle both alike.
    """

    inner: int
    width: int
    dtype: torch.dtype
    quantized = False

    def fill(self, read_into, prefix: str, record: torch.Tensor, has=None) -> None:
        """Fill one record from a checkpoint: ``read_into(name, out)`` (``Checkpoint.read_into``)."""
        rec = record.view(1, -1)
        read_into(f"{prefix}.up_proj.weight", self.up(rec)[0])
        read_into(f"{prefix}.down_proj.weight", self.down(rec)[0])

    @property
    def up_numel(self) -> int:
        return self.inner * self.width

    @property
    def record_numel(self) -> int:
        return 2 * self.inner * self.width

    @property
    def record_bytes(self) -> int:
        return self.record_numel * self.dtype.itemsize

    def up(self, records: torch.Tensor) -> torch.Tensor:
        """``[n, inner, width]`` view of the up projections in ``records [n, record_numel]``."""
        return records[:, : self.up_numel].unflatten(1, (self.inner, self.width))

    def down(self, records: torch.Tensor) -> torch.Tensor:
        """``[n, width, inner]`` view of the down projections in ``records [n, record_numel]``."""
        return records[:, self.up_numel:].unflatten(1, (self.width, self.inner))


class HostExpertStore:
    """The experts of ``num_layers`` MoE layers in host memory (records), with an on-disk remainder.

    Args:
        layout: the record layout.
        num_layers: MoE layers.
        num_experts: experts per layer.
        disk: per MoE layer, experts that stay on disk (no record).
        pin: page-lock the buffers with ``cudaHostRegister`` (needs CUDA); failures warn and fall
            back to pageable memory.
        device: where the records live: host memory by default; on unified-memory machines the
            GPU's own allocation of the shared pool, so the kernels read the records in place.
    """

    def __init__(self, layout: ExpertLayout, num_layers: int, num_experts: int, *,
                 disk: Sequence[Iterable[int]] | None = None, pin: bool = False,
                 device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.row_of_expert: list[np.ndarray] = []  # per layer: expert -> row of its record, -1 = on disk
        self.buffers: list[torch.Tensor] = []
        self._registered: list[int] = []
        # the CUDA device whose copy streams read the pinned buffers (the runtime sets it): unpinning waits for it
        self.copy_device: torch.device | None = None
        self.pinned = False
        self.pin_problem: str | None = None if pin else "not requested"
        disk_sets = [set(d) for d in disk] if disk is not None else [set() for _ in range(num_layers)]
        if len(disk_sets) != num_layers:
            raise ValueError(f"disk sets for {len(disk_sets)} layers, the model has {num_layers} MoE layers")
        for j in range(num_layers):
            rows = np.full(num_experts, -1, dtype=np.int64)
            ram = [e for e in range(num_experts) if e not in disk_sets[j]]
            rows[ram] = np.arange(len(ram))
            self.row_of_expert.append(rows)
            self.buffers.append(torch.empty(len(ram), layout.record_numel, dtype=layout.dtype, device=device))
        if pin and torch.device(device).type == "cpu":
            self._pin()
        self.source = None  # the checkpoint, once filled: disk experts are read from it

    # ------------------------------------------------------------------ memory
    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def _pin(self) -> None:
        if not torch.cuda.is_available():
            self.pin_problem = "no CUDA device"
            return
        cudart = torch.cuda.cudart()
        for buf in self.buffers:
            if buf.numel() == 0:
                continue
            # cudaHostRegisterPortable (1): pinned for every CUDA context, not only the current device's
            err = cudart.cudaHostRegister(buf.data_ptr(), buf.numel() * buf.element_size(), 1)
            code = int(err.value) if hasattr(err, "value") else int(err)
            if code != 0:
                _clear_cuda_error()
                self.unpin()
                self.pin_problem = f"cudaHostRegister failed (error {code})"
                warnings.warn(
                    f"could not page-lock the {self.nbytes / 2**30:.1f} GiB host expert store "
                    f"({self.pin_problem}); copies will use pageable memory and run slower. "
                    "Raise the locked-memory limit (ulimit -l) or free host memory.",
                    RuntimeWarning, stacklevel=3,
                )
                return
            self._registered.append(buf.data_ptr())
        self.pinned = True
        self.pin_problem = None

    def unpin(self) -> None:
        """Unregister the buffers, after every copy from them on :attr:`copy_device` has finished (whatever the
        order in which the garbage collector takes the store and the runtime apart)."""
        try:
            if self._registered and self.copy_device is not None:
                torch.cuda.synchronize(self.copy_device)
        finally:  # (a sticky CUDA error in the wait must not leave memory registered that is then freed)
            if self._registered:
                cudart = torch.cuda.cudart()
                for ptr in self._registered:
                    cudart.cudaHostUnregister(ptr)
                self._registered.clear()
            self.pinned = False

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.unpin()
        except Exception:
            pass

    # ------------------------------------------------------------------ access
    def on_disk(self, layer: int, expert: int) -> bool:
        return int(self.row_of_expert[layer][expert]) < 0

    def record(self, layer: int, expert: int) -> torch.Tensor:
        """The expert's record ``[record_numel]`` (a view into the layer's buffer)."""
        row = int(self.row_of_expert[layer][expert])
        if row < 0:
            raise KeyError(f"expert {expert} of MoE layer {layer} is on disk; use read_from_disk")
        return self.buffers[layer][row]

    def up(self, layer: int) -> torch.Tensor:
        """``[ram experts, I, L]`` view of a layer's up projections (rows by ``row_of_expert``; for
        quantized records the layout's ``QuantWeights`` view)."""
        return self.layout.up(self.buffers[layer])

    def down(self, layer: int) -> torch.Tensor:
        return self.layout.down(self.buffers[layer])

    # ------------------------------------------------------------------ filling
    def fill(self, ckpt, names: Sequence[str], *, progress: bool = False) -> None:
        """Read every RAM expert of every layer from ``ckpt``; ``names[j]`` is layer j's tensor prefix.

        ``names[j]`` is e.g. ``"backbone.layers.1.mixer.experts"``; expert e's tensors are
        ``{prefix}.{e}.up_proj.weight`` and ``.down_proj.weight``.
        """
        if len(names) != self.num_layers:
            raise ValueError(f"{len(names)} layer prefixes for {self.num_layers} MoE layers")
        layers = range(self.num_layers)
        if progress:
            from tqdm.auto import tqdm

            layers = tqdm(layers, desc="host expert store", unit="layer")
        has = ckpt.tensors.__contains__
        for j in layers:
            for e in range(self.num_experts):
                row = int(self.row_of_expert[j][e])
                if row >= 0:
                    self.layout.fill(ckpt.read_into, f"{names[j]}.{e}", self.buffers[j][row], has=has)
        self.source = (ckpt, list(names))

    def read_from_disk(self, layer: int, expert: int, out: torch.Tensor) -> None:
        """Read a disk expert's record into ``out [record_numel]`` (host or device) from the checkpoint."""
        if self.source is None:
            raise CheckpointError("the host store was not filled from a checkpoint; no disk tier to read from")
        ckpt, names = self.source
        self.layout.fill(ckpt.read_into, f"{names[layer]}.{expert}", out, has=ckpt.tensors.__contains__)


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a failed ``cudaHostRegister``: torch checks it after its next kernel
    launch and would report the failed page-locking there, as that kernel's error, instead of carrying on with
    pageable memory. (torch's ``cudart()`` binding has no ``cudaGetLastError``; the runtime library torch loaded
    is found by name, the one of torch's CUDA version first: another runtime's error state is not torch's.)"""
    import ctypes

    major = (torch.version.cuda or "").split(".")[0]
    names = [f"libcudart.so.{major}"] if major.isdigit() else []
    names += [n for n in ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so", "cudart64_12.dll")
              if n not in names]
    for name in names:
        try:
            ctypes.CDLL(name).cudaGetLastError()
            return
        except (OSError, AttributeError):
            continue
