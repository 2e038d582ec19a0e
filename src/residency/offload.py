"""Wiring of the offload runtime into the model: budget, slot layout, host store, backends.

``load_offloaded`` is what ``OffloadedNemotron.from_pretrained(vram_budget=..., plan=...)`` runs:

1. the budget is read (:func:`residency.sizes.parse_budget`) against the device's memory, and
   every device allocation from here on is charged to a :class:`~residency.runtime.ledger.DeviceLedger`
   with that cap: dense weights, slot banks, staging slots, slot tables, and a reserve for the KV
   cache, Mamba state and activations of ``context`` tokens;
2. the slot layout comes from the plan (``plan=``: its static sets, dynamic slot counts and miss
   paths, as the simulator reads them) or is planned here for the exact bytes left after the
   fixed allocations, with the planner's hit model (:mod:`residency.planning.allocate`) over the
   profile's pick counts (``profile=``) or a uniform prior;
3. the dense part of the model is loaded onto the device (no expert banks), the host store is
   filled from the checkpoint, and each MoE layer gets an :class:`OffloadedExperts` backend;
4. the embedding table goes where the plan says (``settings.embeddings_on_host``) or, without a
   plan, where :func:`embeddings_on_host` puts it: in host memory (not charged to the ledger; a
   :class:`~residency.model.modeling.HostEmbedding` copies each step's rows to the device) unless
   the device is unified memory, the embeddings are tied to ``lm_head``, or every expert fits on
   the device with the table there.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import NemotronHConfig
from .errors import BudgetError, InputError
from .model.checkpoint import Checkpoint
from .model.loading import build_model, footprint
from .model.modeling import NemotronHForCausalLM, keep_embeddings_on_host, meta_model, tie_embeddings
from .model.moe import ExpertBackend, ExpertWork
from .runtime.backend import LayerSlotPlan, OffloadRuntime, RuntimeOptions
from .runtime.ledger import DeviceLedger
from .runtime.policy import LRU, StaticOnly
from .runtime.store import ExpertLayout, HostExpertStore
from .sizes import format_bytes, parse_budget

DEFAULT_CONTEXT = 8192
DEFAULT_PREFILL_CHUNK = 512
#: host-to-device rate the per-miss copy-or-compute choice assumes without a plan (PCIe 4.0 x16, practical)
DEFAULT_H2D_GBPS = 25.0
#: CPU expert throughput assumed where it is not measured (see miss_rates)
DEFAULT_CPU_EXPERT_GBPS = 10.0


class _WeakRouter:
    """A MoE mixer's router for the runtime's look-ahead, holding the mixer weakly: the model holds the runtime
    (through its expert backends), so a strong reference back would make a cycle, and a deleted model (its host
    store: most of the checkpoint's bytes) would wait for a garbage-collector pass to be freed."""

    __slots__ = ("_mixer",)

    def __init__(self, mixer: Any) -> None:
        self._mixer = weakref.ref(mixer)

    def __call__(self, hidden: torch.Tensor) -> Any:
        return self._mixer().route(hidden)


class OffloadedExperts(ExpertBackend):
    """The expert backend of one MoE layer, served by the offload runtime."""

    def __init__(self, runtime: OffloadRuntime, moe_index: int) -> None:
        super().__init__()
        self._runtime = [runtime]  # held in a list so nn.Module does not register it
        self.moe_index = moe_index

    @property
    def runtime(self) -> OffloadRuntime:
        return self._runtime[0]

    def submit(self, work: ExpertWork) -> Any:
        return self.runtime.submit(self.moe_index, work), work

    def collect(self, handle: Any) -> torch.Tensor:
        pending, work = handle
        return self.runtime.collect(self.moe_index, pending, work)


@dataclass(frozen=True)
class SlotLayout:
    """Per MoE layer slot plans, the policy, and the planner's predicted hit rate (None when unknown)."""

    layers: tuple[LayerSlotPlan, ...]
    policy: str
    predicted_hit_rate: float | None
    source: str  # "plan" or "planned here"

    @property
    def slots(self) -> int:
        return sum(len(lp.static) + lp.dynamic_slots for lp in self.layers)


def reserve_bytes(config: NemotronHConfig, context: int, chunk: int, act_bytes: int = 2) -> int:
    """Device bytes kept for the KV cache and Mamba state of ``context`` tokens and one prefill chunk's activations.

    ``act_bytes``: bytes per element of the activations, which the KV cache and the conv state are kept in
    (2 for bf16 / fp16, 4 for fp32 models); the SSM state is fp32.

    Activations per token (fp32 upper bound): the hidden-sized buffers of a block, the Mamba
    in-projection and conv outputs, the routed pairs' up outputs and per-pair results in the
    latent space, the shared expert, and the vocabulary-sized logits of the last token.
    """
    c = config
    kv = context * c.kv_bytes_per_token(act_bytes)
    per_token = 4 * (8 * c.hidden_size + c.mamba_in_proj_size + c.mamba_conv_dim
                     + c.num_experts_per_tok * (c.moe_intermediate_size + 2 * c.expert_input_size)
                     + c.moe_shared_expert_intermediate_size)
    return kv + c.mamba_state_bytes(conv_dtype_bytes=act_bytes) + chunk * per_token + 4 * c.vocab_size


@dataclass(frozen=True)
class FixedBytes:
    """Device bytes the offloaded model takes besides expert slots (the smallest feasible budget).

    ``host_embeddings``: bytes of the embedding table when it stays in host memory (then not in
    ``dense`` nor :attr:`total`), else 0.
    """

    dense: int
    staging: int
    staging_slots: int
    tables: int
    reserve: int
    context: int
    layout: ExpertLayout
    host_embeddings: int = 0
    max_batch: int = 1

    @property
    def total(self) -> int:
        return self.dense + self.staging + self.tables + self.reserve

    def describe(self) -> str:
        table = (f" (embedding table {format_bytes(self.host_embeddings)} in host memory)"
                 if self.host_embeddings else "")
        return (f"dense weights {format_bytes(self.dense)}{table}, staging slots {format_bytes(self.staging)} "
                f"({self.staging_slots} x {format_bytes(self.layout.record_bytes)}), slot tables "
                f"{format_bytes(self.tables)}, KV cache, Mamba state and activations for {self.context} tokens"
                f"{f' x {self.max_batch} sequences' if self.max_batch > 1 else ''} "
                f"{format_bytes(self.reserve)}: {format_bytes(self.total)} in all")


def fixed_bytes(config: NemotronHConfig, dtype: torch.dtype, *, staging: int | None = None,
                context: int = DEFAULT_CONTEXT, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                ckpt: Checkpoint | None = None, embeddings_on_host: bool | None = None,
                max_batch: int = 1) -> FixedBytes:
    """What :func:`load_offloaded` charges to the budget before any expert slot (the reserve for ``max_batch``
    sequences of ``context`` tokens).

    With ``ckpt``, its quantized dense modules count at their stored size and the expert record
    is the checkpoint's quantized record when its experts are quantized. ``embeddings_on_host``:
    the embedding table stays in host memory and is not charged; None (default) = where
    :func:`load_offloaded` puts it without a plan on a device that is not unified memory and
    cannot hold every expert: in host memory unless the embeddings are tied.
    """
    meta = meta_model(config)
    if config.tie_word_embeddings and (ckpt is None or ckpt.ties_embeddings):
        tie_embeddings(meta)  # lm_head reads the embedding table: counted once
    if embeddings_on_host is None:
        embeddings_on_host = not config.tie_word_embeddings
    if embeddings_on_host:
        keep_embeddings_on_host(meta, "cpu")
    layout = expert_layout(config, dtype, ckpt)
    if ckpt is not None:
        from .model.loading import quantize_meta_model

        quantize_meta_model(meta, ckpt, dtype, experts=False)
    staging = staging if staging is not None else 2 * config.num_experts_per_tok
    weights = footprint(meta, dtype)
    return FixedBytes(
        dense=weights.other_bytes, staging=staging * layout.record_bytes, staging_slots=staging,
        tables=4 * config.n_routed_experts * (config.num_moe_layers + 1),
        reserve=max_batch * reserve_bytes(config, context, prefill_chunk, act_bytes=dtype.itemsize), context=context,
        layout=layout,
        host_embeddings=weights.host_bytes, max_batch=max_batch,
    )


def expert_layout(config: NemotronHConfig, dtype: torch.dtype, ckpt: Checkpoint | None = None):
    """The host/slot record of one expert: the checkpoint's quantized record, else ``up``+``down`` in ``dtype``."""
    if ckpt is not None:
        from .model.loading import quantized_expert_layout

        quantized = quantized_expert_layout(ckpt)
        if quantized is not None:
            return quantized
    return ExpertLayout(config.moe_intermediate_size, config.expert_input_size, dtype)


def layout_from_plan(plan: Any, config: NemotronHConfig, policy: str | None = None) -> SlotLayout:
    """The runtime's view of a :class:`~residency.planning.plan.Plan` (static sets as the simulator takes them)."""
    from .errors import ModelMismatchError
    from .planning.simulate import static_set_for

    if plan.fingerprint != config.fingerprint():
        raise ModelMismatchError(
            f"the plan was made for model {plan.fingerprint!r} ({plan.model}), this checkpoint is "
            f"{config.fingerprint()!r}; plan again with `residency plan --model` for this checkpoint"
        )
    policy = policy or plan.settings.policy
    priors = plan.priors()
    layers = []
    for j, lp in enumerate(plan.layers):
        static = tuple(int(e) for e in static_set_for(plan, j, policy))
        dynamic = lp.slots - len(static)
        miss_path = "copy" if lp.miss_path in ("copy", "none", "disk") else lp.miss_path
        disk = tuple(int(e) for e in lp.disk if int(e) not in static)  # (the plan's host-RAM tier: the rest)
        layers.append(LayerSlotPlan(static, dynamic, miss_path, np.asarray(priors[j], dtype=np.float64), disk))
    predicted = getattr(plan.predicted, "hit_rate", None)
    return SlotLayout(tuple(layers), policy, predicted, "plan")


def plan_layout(config: NemotronHConfig, expert_slots: int, *, profile: Any = None, policy: str = LRU.name,
                locality: float | None = None) -> SlotLayout:
    """Split ``expert_slots`` over the MoE layers with the planner's hit model (uniform prior without a profile)."""
    from .planning.allocate import (
        DEFAULT_LOCALITY,
        DEFAULT_WINDOW,
        allocate,
        hit_curves,
        pick_probabilities,
        rank_experts,
        slot_gains,
    )

    L, E, k = config.num_moe_layers, config.n_routed_experts, config.num_experts_per_tok
    counts = None if profile is None else np.asarray(profile.counts, dtype=np.float64)
    p = pick_probabilities(counts, L, E, k)
    order = rank_experts(p)
    p_sorted = np.take_along_axis(p, order, axis=1)
    lam = np.full(L, DEFAULT_LOCALITY if locality is None else locality)
    V, R = hit_curves(p_sorted, k, lam, DEFAULT_WINDOW)
    per_layer = allocate(slot_gains(V), min(expert_slots, L * E))
    layers = []
    for j in range(L):
        n = int(per_layer[j])
        r = n if policy == StaticOnly.name else int(R[j, n])
        layers.append(LayerSlotPlan(tuple(int(e) for e in order[j, :r]), n - r, "copy", p[j].copy()))
    predicted = float(sum(V[j, int(per_layer[j])] for j in range(L)) / (L * k))
    return SlotLayout(tuple(layers), policy, predicted, "planned here")


def miss_rates(plan: Any, mode: str, cpu_experts: str | bool, device: torch.device,
               layout: ExpertLayout) -> tuple[float, float]:
    """(host-to-device GB/s, CPU expert GB/s) the per-miss copy-or-compute choice uses.

    The link comes from the plan's GPU, else local detection, else :data:`DEFAULT_H2D_GBPS`. The
    CPU rate is measured on this host (a short decode step of 4 experts of the model's shape, in
    the store's format: BF16, or the packed records of a quantized checkpoint, whose kernel moves
    fewer bytes per second) when the choice is automatic on a CUDA device; elsewhere the choice
    does not need it.
    """
    h2d = DEFAULT_H2D_GBPS
    if plan is not None and plan.gpu.h2d_gbps:
        h2d = float(plan.gpu.h2d_gbps)
    elif device.type == "cuda":
        try:
            from .planning.detect import detect_local

            gpu = detect_local(device.index or 0).gpu
            if gpu is not None and gpu.h2d_gbps:
                h2d = float(gpu.h2d_gbps)
        except Exception:  # detection is best effort (NVML missing or unsupported)
            pass
    cpu = DEFAULT_CPU_EXPERT_GBPS
    if cpu_experts == "auto" and mode == "cuda":
        if layout.quantized:
            from .runtime.cpu_quant import measure_quant_throughput

            cpu = measure_quant_throughput(layout.spec, 4, latent=layout.width, intermediate=layout.inner,
                                           bank_records=16, repeats=3)
        else:
            from .runtime.cpu_experts import measure_throughput

            cpu = measure_throughput(4, latent=layout.width, intermediate=layout.inner, bank_experts=16, repeats=3)
    return h2d, cpu


def embeddings_on_host(config: NemotronHConfig, mode: str, *, choice: str | None = None, plan: Any = None,
                       budget_bytes: int | None = None, fixed_on_device: FixedBytes | None = None) -> bool:
    """Whether :func:`load_offloaded` keeps the embedding table in host memory.

    ``choice`` 'host' or 'device' decides; else the plan's ``settings.embeddings_on_host`` (plans of
    format 1 have the table on the device); else automatically, as the planner chooses: on the device
    for unified memory (one pool: moving the table frees nothing), for tied embeddings (``lm_head``
    reads the whole table every token) and when the budget holds every expert with the table there
    (``budget_bytes`` against ``fixed_on_device``, the fixed part with the table on the device);
    otherwise in host memory, which frees the table's bytes for expert slots for one row copied per
    token. The ``cpu`` device stands in for a discrete GPU and is treated like one.
    """
    from .planning.plan import EMBEDDINGS_CHOICES

    choice = choice or "auto"
    if choice not in EMBEDDINGS_CHOICES:
        raise InputError(f"embeddings must be one of {EMBEDDINGS_CHOICES}, got {choice!r}")
    if choice == "auto" and plan is not None:
        choice = "host" if plan.settings.embeddings_on_host else "device"
    if choice == "host" and config.tie_word_embeddings:
        raise InputError("this model ties its word embeddings to lm_head (tie_word_embeddings), which reads the "
                         "whole table every token: the table stays on the device; use embeddings='device'")
    if choice != "auto":
        return choice == "host"
    if mode == "unified" or config.tie_word_embeddings:
        return False
    if budget_bytes is not None and fixed_on_device is not None:
        every_expert = config.num_moe_layers * config.n_routed_experts * fixed_on_device.layout.record_bytes
        if budget_bytes >= fixed_on_device.total + every_expert:
            return False
    return True


def device_memory(device: torch.device) -> tuple[int, int, str]:
    """(total, free, name) of the memory the budget is taken from."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total), int(free), torch.cuda.get_device_name(device)
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available), "host memory (cpu device)"


def load_offloaded(
    ckpt: Checkpoint,
    device: torch.device,
    *,
    mode: str,
    dtype: torch.dtype | None,
    vram_budget: Any,
    plan: Any = None,
    profile: Any = None,
    policy: str | None = None,
    prefetch: bool = True,
    cpu_experts: str | bool = "auto",
    staging_slots: int | None = None,
    context: int = DEFAULT_CONTEXT,
    max_batch: int = 1,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    progress: bool | None = None,
    verify: bool = False,
    copy_delay: Any = None,
    embeddings: str | None = None,
    mirror_tables: bool = False,
    disk_readers: int = 8,
) -> tuple[NemotronHForCausalLM, OffloadRuntime, SlotLayout]:
    """Load ``ckpt`` with its routed experts offloaded; see the module docstring.

    ``embeddings``: 'host', 'device', or None / 'auto' (the plan's placement, else
    :func:`embeddings_on_host`).
    """
    from .model.loading import checkpoint_dtype

    config = ckpt.config
    ckpt.validate()
    dtype = dtype or checkpoint_dtype(ckpt)
    total, free, name = device_memory(device)
    if vram_budget is None:
        if plan is None:
            raise InputError("offloading needs vram_budget= (e.g. '20GiB', or 0.8 of free memory) or plan=")
        vram_budget = int(plan.budget.vram_bytes)
    budget = parse_budget(vram_budget, total_bytes=total, free_bytes=free, device_name=name, what="vram_budget")
    ledger = DeviceLedger(device, budget.bytes)
    staging = staging_slots if staging_slots is not None else 2 * config.num_experts_per_tok
    fixed_args = dict(staging=staging, context=context, max_batch=max_batch, prefill_chunk=prefill_chunk, ckpt=ckpt)
    on_device = fixed_bytes(config, dtype, embeddings_on_host=False, **fixed_args)
    host_table = embeddings_on_host(config, mode, choice=embeddings, plan=plan, budget_bytes=budget.bytes,
                                    fixed_on_device=on_device)
    need = fixed_bytes(config, dtype, embeddings_on_host=True, **fixed_args) if host_table else on_device
    if need.total > budget.bytes:
        what = f"vram_budget {budget.understood} cannot hold what runs besides expert slots: {need.describe()}. "
        error = BudgetError(what + f"Give at least {format_bytes(need.total)}, or a smaller context= / "
                            "prefill_chunk= / max_batch=")
        error.cli_message = (what.replace("vram_budget", "--vram-budget", 1) + f"Give --vram-budget of at least "
                             f"{format_bytes(need.total)}, or a smaller --context / --prefill-chunk")
        raise error
    layout = need.layout
    if not layout.quantized and layout.dtype == torch.float16:
        # the CPU expert kernels read bfloat16 or float32 records: float16 experts are always copied
        if cpu_experts is True:
            raise InputError("cpu_experts=True computes misses on the CPU, whose kernels read bfloat16 or float32 "
                             "experts, and this model's experts are float16; use dtype='bfloat16', or "
                             "cpu_experts=False / 'auto' (float16 misses are then copied)")
        cpu_experts = False
    L, E = config.num_moe_layers, config.n_routed_experts
    fixed = need.total
    expert_slots = int((budget.bytes - fixed) // layout.record_bytes)
    if plan is not None:
        slots = layout_from_plan(plan, config, policy)
    elif mode == "unified":
        # one copy of each expert in the shared pool, the most used first; the rest stay on disk
        slots = plan_layout(config, expert_slots, profile=profile, policy=StaticOnly.name)
    else:
        slots = plan_layout(config, expert_slots, profile=profile, policy=policy or LRU.name)
    ledger.charge(need.reserve, "KV cache, Mamba state, activations (reserved)")
    model = build_model(ckpt, device=device, dtype=dtype, progress=progress, experts=False,
                        allocate=lambda shape, dt, what: ledger.empty(shape, dt, what),
                        embeddings_on_host=host_table)
    if mode == "unified":
        disk = [sorted(set(range(E)) - set(lp.static)) for lp in slots.layers]
        ledger.charge(sum(len(lp.static) for lp in slots.layers) * layout.record_bytes, "expert store (unified memory)")
        store = HostExpertStore(layout, L, E, disk=disk, device=device)
    else:  # every expert in host memory but those the plan leaves on disk (host RAM it did not have for them)
        store = HostExpertStore(layout, L, E, disk=[lp.disk for lp in slots.layers], pin=mode == "cuda")
    prefixes = [f"backbone.layers.{layer}.mixer.experts" for layer in config.moe_layers]
    show = progress if progress is not None else ckpt.total_bytes >= (1 << 30)
    store.fill(ckpt, prefixes, progress=show)
    ckpt.close()
    routers = [_WeakRouter(m) for m in model.moe_mixers]
    h2d, cpu_gbps = miss_rates(plan, mode, cpu_experts, device, layout)
    policy_name = StaticOnly.name if mode == "unified" else slots.policy
    options = RuntimeOptions(mode=mode, policy=policy_name, prefetch=prefetch, cpu_experts=cpu_experts,
                             staging_slots=staging, h2d_gbps=h2d, cpu_expert_gbps=cpu_gbps, verify=verify,
                             copy_delay=copy_delay, mirror_tables=mirror_tables, disk_readers=disk_readers)
    runtime = OffloadRuntime(store, slots.layers, ledger, options, routers, config.num_experts_per_tok)
    model.set_experts(lambda mixer: OffloadedExperts(runtime, mixer.moe_index))
    model.add_step_listener(runtime)
    return model, runtime, slots
