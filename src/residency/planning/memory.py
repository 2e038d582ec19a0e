"""Device memory accounting: what a decode run needs besides experts, and what is left for expert slots.

Every byte on the target device is assigned to one component (see :func:`account_memory`):

- ``non_expert_weights``: embeddings, lm_head, Mamba and attention mixers, routers, latent
  projections and shared experts, in the non-expert dtype (exact, from the config); with
  ``embeddings_on_host`` the embedding table (vocab x hidden, bf16: 1 GiB for Super) is left out,
  because it stays in host memory and each token copies only its row to the device;
- ``kv_cache``: batch x context x (8 attention layers x K and V x 2 heads x 128) in the KV dtype;
- ``mamba_state``: per sequence, fp32 SSM state and bf16 conv state of every Mamba layer;
- ``activations``: live buffers of one prefill chunk (per token: hidden-sized buffers, the Mamba
  in-projection and conv outputs, the routed experts' up/relu² outputs in the latent space, the
  shared expert), last-token fp32 logits and a fixed kernel workspace; attention is assumed to use
  a fused kernel that never materialises the score matrix;
- ``cuda_context``: driver-reserved memory and the CUDA context (768 MiB unless measured);
- ``fragmentation_reserve``: 256 MiB plus 10 % of activations, KV and Mamba state, for the caching
  allocator's rounding (expert slots are one allocation and do not fragment);
- ``os_reserve`` (unified memory only): 12 % of the shared pool, at least 4 GiB, for the OS, the
  page cache and the CPU side of the process;
- ``staging_buffers``: slots that receive misses of layers without dynamic slots and look-ahead
  prefetches (2 x top-k experts on discrete GPUs, top-k on unified memory reading from disk, none
  when every expert is resident).

What remains is the expert budget. A budget below the minimum raises :class:`BudgetError` with the
component list and concrete ways to make it fit. Size strings and budgets are read by
:mod:`residency.sizes`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..config import NemotronHConfig
from ..errors import BudgetError
from ..sizes import GiB, MiB, format_bytes
from .hardware import CATALOG

__all__ = [
    "MemoryComponent",
    "MemoryBreakdown",
    "account_memory",
    "activation_bytes",
    "embedding_table_bytes",
    "KV_DTYPE_BYTES",
    "CUDA_CONTEXT_BYTES",
]

KV_DTYPE_BYTES = {"bf16": 2, "fp8": 1}
CUDA_CONTEXT_BYTES = 768 * MiB  # unverified default; `residency calibrate` measures it on the device
FRAGMENTATION_FIXED = 256 * MiB
FRAGMENTATION_SHARE = 0.10
UNIFIED_OS_SHARE = 0.12  # vLLM advises <= 0.85 GPU memory utilisation on GB10; 12 % is kept back here
UNIFIED_OS_MIN = 4 * GiB
WORKSPACE_BYTES = 256 * MiB
PREFILL_CHUNK = 1024


@dataclass(frozen=True)
class MemoryComponent:
    """One consumer of device memory, with a note saying how its size was computed."""

    name: str
    bytes: int
    note: str


@dataclass(frozen=True)
class MemoryBreakdown:
    """Device memory split into fixed components and the rest, the expert budget.

    ``device_bytes`` is the memory the run may occupy on the device (the whole shared pool on
    unified memory); ``expert_bytes`` what is left for expert slots after ``components``;
    ``expert_size`` the bytes of one routed expert in the expert dtype.
    """

    device_bytes: int
    components: tuple[MemoryComponent, ...]
    expert_bytes: int
    expert_size: int
    staging_slots: int
    unified: bool

    @property
    def fixed_bytes(self) -> int:
        return sum(c.bytes for c in self.components)

    @property
    def expert_slots(self) -> int:
        """Whole experts that fit the expert budget."""
        return max(0, self.expert_bytes) // self.expert_size

    def get(self, name: str) -> int:
        for c in self.components:
            if c.name == name:
                return c.bytes
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_bytes": self.device_bytes,
            "components": [asdict(c) for c in self.components],
            "expert_bytes": self.expert_bytes,
            "expert_size": self.expert_size,
            "staging_slots": self.staging_slots,
            "unified": self.unified,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MemoryBreakdown:
        return cls(
            device_bytes=int(raw["device_bytes"]),
            components=tuple(MemoryComponent(str(c["name"]), int(c["bytes"]), str(c["note"]))
                             for c in raw["components"]),
            expert_bytes=int(raw["expert_bytes"]),
            expert_size=int(raw["expert_size"]),
            staging_slots=int(raw["staging_slots"]),
            unified=bool(raw["unified"]),
        )

    def lines(self) -> list[str]:
        """Human-readable rows, one per component, then the expert budget."""
        rows = [f"  {c.name:<22} {format_bytes(c.bytes):>12}  {c.note}" for c in self.components]
        rows.append(
            f"  {'experts (slots)':<22} {format_bytes(self.expert_bytes):>12}  "
            f"{self.expert_slots} slots of {format_bytes(self.expert_size)}"
        )
        rows.append(f"  {'total':<22} {format_bytes(self.device_bytes):>12}")
        return rows


def activation_bytes(config: NemotronHConfig, batch: int, prefill_chunk: int = PREFILL_CHUNK) -> int:
    """Peak live activations of one prefill chunk plus last-token logits and kernel workspace (bf16)."""
    c = config
    per_token = (
        4 * c.hidden_size
        + c.mamba_in_proj_size + c.mamba_conv_dim + 2 * c.mamba_inner
        + c.num_experts_per_tok * (2 * c.moe_intermediate_size + c.expert_input_size)
        + c.expert_input_size
        + 2 * c.moe_shared_expert_intermediate_size * c.n_shared_experts
    )
    tokens = max(prefill_chunk, batch)
    return 2 * per_token * tokens + 4 * batch * c.vocab_size + WORKSPACE_BYTES


def account_memory(
    config: NemotronHConfig,
    device_bytes: int,
    *,
    expert_dtype: str = "nvfp4",
    dense_dtype: str = "bf16",
    context: int = 32768,
    batch: int = 1,
    kv_dtype: str = "bf16",
    unified: bool = False,
    staging_slots: int | None = None,
    cuda_context_bytes: int | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
    target: str = "the target device",
    device_memory: int | None = None,
    embeddings_on_host: bool = False,
) -> MemoryBreakdown:
    """Split ``device_bytes`` into fixed components and the expert budget.

    Raises :class:`BudgetError` listing every component and what would fit when the fixed part
    (including staging buffers) exceeds ``device_bytes``. ``device_memory`` is all the memory of
    ``target`` when ``device_bytes`` is a smaller budget (the error then suggests a larger one).
    ``embeddings_on_host``: the embedding table stays in host memory and is not counted on the device.
    """
    components = _components(
        config, device_bytes, expert_dtype, dense_dtype, context, batch, kv_dtype, unified,
        staging_slots, cuda_context_bytes, prefill_chunk, embeddings_on_host,
    )
    fixed = sum(c.bytes for c in components)
    staging = staging_slots if staging_slots is not None else _default_staging(config, unified)
    if fixed > device_bytes:
        raise BudgetError(_explain(
            config, device_bytes, components, expert_dtype=expert_dtype, dense_dtype=dense_dtype, context=context,
            batch=batch, kv_dtype=kv_dtype, unified=unified, staging_slots=staging_slots,
            cuda_context_bytes=cuda_context_bytes, prefill_chunk=prefill_chunk, target=target,
            device_memory=device_memory, embeddings_on_host=embeddings_on_host,
        ))
    return MemoryBreakdown(
        device_bytes=int(device_bytes), components=tuple(components), expert_bytes=int(device_bytes - fixed),
        expert_size=config.expert_bytes(expert_dtype), staging_slots=staging, unified=unified,
    )


def embedding_table_bytes(config: NemotronHConfig) -> int:
    """Bytes of the input embedding table (vocab x hidden, bf16 in every dense dtype)."""
    return config.non_expert_bytes_by_group("bf16")["embeddings"]


def _default_staging(config: NemotronHConfig, unified: bool) -> int:
    return config.num_experts_per_tok * (1 if unified else 2)


def _components(
    config: NemotronHConfig,
    device_bytes: int,
    expert_dtype: str,
    dense_dtype: str,
    context: int,
    batch: int,
    kv_dtype: str,
    unified: bool,
    staging_slots: int | None,
    cuda_context_bytes: int | None,
    prefill_chunk: int,
    embeddings_on_host: bool = False,
) -> list[MemoryComponent]:
    if kv_dtype not in KV_DTYPE_BYTES:
        raise BudgetError(f"unknown KV cache dtype {kv_dtype!r}; use one of {sorted(KV_DTYPE_BYTES)}")
    if context < 1 or batch < 1:
        raise BudgetError(f"context ({context}) and batch ({batch}) must be at least 1")
    expert_size = config.expert_bytes(expert_dtype)
    kv_per_token = config.kv_bytes_per_token(KV_DTYPE_BYTES[kv_dtype])
    kv = batch * context * kv_per_token
    mamba = batch * config.mamba_state_bytes()
    act = activation_bytes(config, batch, prefill_chunk)
    staging = staging_slots if staging_slots is not None else _default_staging(config, unified)
    ctx = CUDA_CONTEXT_BYTES if cuda_context_bytes is None else int(cuda_context_bytes)
    dense = config.non_expert_bytes(dense_dtype)
    parts = "lm_head, Mamba, attention, routers, latent proj., shared experts"
    if embeddings_on_host:
        table = embedding_table_bytes(config)
        dense_note = f"{dense_dtype}: {parts}; embedding table ({format_bytes(table)}) in host memory"
        dense -= table
    else:
        dense_note = f"{dense_dtype}: embeddings, {parts}"
    out = [
        MemoryComponent("non_expert_weights", dense, dense_note),
        MemoryComponent("kv_cache", kv, f"{batch} x {context} tokens x {format_bytes(kv_per_token)} ({kv_dtype})"),
        MemoryComponent("mamba_state", mamba, f"{batch} x {format_bytes(config.mamba_state_bytes())} per sequence"),
        MemoryComponent("activations", act, f"prefill chunk of {max(prefill_chunk, batch)} tokens, logits, workspace"),
        MemoryComponent("cuda_context", ctx, "measured" if cuda_context_bytes is not None else "assumed (768 MiB)"),
        MemoryComponent("fragmentation_reserve", int(FRAGMENTATION_FIXED + FRAGMENTATION_SHARE * (act + kv + mamba)),
                        "256 MiB + 10 % of activations, KV and Mamba state"),
    ]
    if unified:
        out.append(MemoryComponent("os_reserve", max(UNIFIED_OS_MIN, int(UNIFIED_OS_SHARE * device_bytes)),
                                   "unified memory: 12 % of the pool for the OS, page cache and CPU side"))
    out.append(MemoryComponent("staging_buffers", staging * expert_size,
                               f"{staging} expert slots for misses and prefetches ({expert_dtype})"))
    return out


def _fixed(config: NemotronHConfig, device_bytes: int, **kw: Any) -> int:
    return sum(c.bytes for c in _components(config, device_bytes, **kw))


def _explain(config: NemotronHConfig, device_bytes: int, components: list[MemoryComponent], **kw: Any) -> str:
    """The BudgetError text: what takes the memory, and concrete changes that would make it fit."""
    target = kw.pop("target")
    device_memory = kw.pop("device_memory")
    needed = sum(c.bytes for c in components)
    rows = "\n".join(f"  {c.name:<22} {format_bytes(c.bytes):>12}  {c.note}" for c in components)
    fixes: list[str] = []
    short = needed - device_bytes
    # Smaller context: KV scales linearly with it.
    kv_per_ctx = kw["batch"] * config.kv_bytes_per_token(KV_DTYPE_BYTES[kw["kv_dtype"]])
    kv_now = kv_per_ctx * kw["context"]
    if kv_now > short:
        ctx_max = (kv_now - short) // kv_per_ctx
        ctx_max = (ctx_max // 1024) * 1024
        if ctx_max >= 1024:
            fixes.append(f"--context {ctx_max} (KV cache {format_bytes(kv_per_ctx * ctx_max)} instead of "
                         f"{format_bytes(kv_now)})")
    if kw["dense_dtype"] == "bf16":
        alt = _fixed(config, device_bytes, **{**kw, "dense_dtype": "fp8"})
        saved = needed - alt
        verdict = "fits" if alt <= device_bytes else "not enough alone"
        fixes.append(f"--dense-dtype fp8 (non-expert weights {format_bytes(saved)} smaller; {verdict})")
    if not kw["embeddings_on_host"] and not kw["unified"] and not config.tie_word_embeddings:
        alt = _fixed(config, device_bytes, **{**kw, "embeddings_on_host": True})
        verdict = "fits" if alt <= device_bytes else "not enough alone"
        fixes.append(f"--embeddings host (the {format_bytes(embedding_table_bytes(config))} embedding table stays in "
                     f"host memory, one row copied per token; {verdict})")
    if kw["batch"] > 1:
        alt = _fixed(config, device_bytes, **{**kw, "batch": 1})
        verdict = "fits" if alt <= device_bytes else "not enough alone"
        fixes.append(f"batch 1 instead of {kw['batch']} ({verdict})")
    if kw["kv_dtype"] == "bf16" and kv_now > short / 4:
        alt = _fixed(config, device_bytes, **{**kw, "kv_dtype": "fp8"})
        fixes.append(f"fp8 KV cache ({'fits' if alt <= device_bytes else 'not enough alone'})")
    bigger = sorted(
        (g for g in CATALOG if g.unified_memory == kw["unified"] and
         g.usable_bytes - (_fixed(config, g.usable_bytes, **kw)) > 0),
        key=lambda g: g.usable_bytes,
    )[:3]
    if bigger:
        names = ", ".join(f"{g.name} ({format_bytes(g.usable_bytes)})" for g in bigger)
        fixes.append(f"a bigger GPU: {names}")
    if device_memory is None:
        fixes.append("a larger --vram, up to the device's memory")
    elif device_bytes < device_memory:
        fixes.append(f"a larger --vram, up to the {format_bytes(device_memory)} of {target}")
    else:
        fixes.append(f"--gpu-spec FILE with the real figures, if {target} has more than {format_bytes(device_bytes)}")
    return (
        f"{format_bytes(device_bytes)} on {target} cannot hold what Nemotron-H needs besides routed experts: "
        f"{format_bytes(needed)}, {format_bytes(short)} short.\n"
        f"What takes the memory:\n{rows}\n"
        "What would fit:\n" + "\n".join(f"  - {f}" for f in fixes)
    )
