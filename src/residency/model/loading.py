"""Build a :class:`~residency.model.modeling.NemotronHForCausalLM` from a validated checkpoint.

Modules are created on the ``meta`` device (no random initialisation), materialised empty on the
target device and filled tensor by tensor from the memory-mapped shards, with a progress bar for
large checkpoints. Per-expert tensors are stacked into each layer's ``[E, I, L]`` / ``[E, L, I]``.
"""

from __future__ import annotations

import re

import torch

from .checkpoint import Checkpoint
from .modeling import NemotronHForCausalLM

_EXPERT = re.compile(r"^(backbone\.layers\.\d+\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")
PROGRESS_MIN_BYTES = 1 << 30


def build_model(
    ckpt: Checkpoint, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> NemotronHForCausalLM:
    """Validate ``ckpt`` and load it into a new model on ``device``.

    ``dtype`` defaults to the checkpoint's own floating dtype; the router correction bias always
    stays fp32. ``progress`` defaults to showing a bar when the checkpoint exceeds 1 GiB.
    """
    ckpt.validate()
    if dtype is None:
        dtype = _checkpoint_dtype(ckpt)
    with torch.device("meta"):
        model = NemotronHForCausalLM(ckpt.config)
    model = model.to_empty(device=device)
    model.to(dtype)
    for mixer in model.moe_mixers:  # the router bias is fp32 in every published checkpoint
        mixer.gate.e_score_correction_bias = mixer.gate.e_score_correction_bias.float()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    names = sorted(ckpt.tensors, key=_load_order)
    names = [n for n in names if not n.startswith("mtp.")]
    show = progress if progress is not None else ckpt.total_bytes >= PROGRESS_MIN_BYTES
    iterator = names
    if show:
        from tqdm.auto import tqdm

        iterator = tqdm(names, desc="loading weights", unit="tensor")
    for name in iterator:
        tensor = ckpt.get(name)
        match = _EXPERT.match(name)
        with torch.no_grad():
            if match:
                prefix, expert, proj = match.groups()
                params[f"{prefix}.{proj}"][int(expert)].copy_(tensor)
            elif name in params:
                params[name].copy_(tensor)
            elif name in buffers:
                buffers[name].copy_(tensor)
            else:  # validate() guarantees this cannot happen for backbone tensors
                raise KeyError(name)
    ckpt.close()
    model.eval()
    return model


def _checkpoint_dtype(ckpt: Checkpoint) -> torch.dtype:
    from .checkpoint import FLOAT_DTYPES

    counts: dict[str, int] = {}
    for info in ckpt.tensors.values():
        counts[info.dtype] = counts.get(info.dtype, 0) + info.nbytes
    main = max(counts, key=counts.get)
    return FLOAT_DTYPES[main]


def _load_order(name: str) -> tuple[int, str]:
    m = re.match(r"backbone\.layers\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)
