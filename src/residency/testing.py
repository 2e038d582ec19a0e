"""Tiny Nemotron-H checkpoints in the real Hugging Face layout, for tests, demos and notebooks.

``write_tiny_checkpoint`` writes ``config.json``, safetensors weights with the real per-expert
tensor names (optionally sharded with an index) and a byte-level tokenizer description, or with
``tokenizer="bpe"`` a real BPE ``tokenizer.json`` with a Nemotron-style chat template
(:mod:`residency.model.tiny_tokenizer`), for chat, streaming and the server. Weights are
deterministic for a seed and scaled so activations neither vanish nor explode, the router spreads
tokens over many experts, and the Mamba time step stays well above ``time_step_min`` (so the
reference implementations' differing dt clamps do not matter).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .config import NemotronHConfig
from .model.checkpoint import INDEX_NAME, SINGLE_NAME, expected_tensors
from .model.tokenizer import ByteTokenizer

TINY_DEFAULTS: dict[str, Any] = dict(
    vocab_size=ByteTokenizer.vocab_size,
    hidden_size=64,
    pattern="MEM*EMEE",
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    mamba_num_heads=8,
    mamba_head_dim=8,
    ssm_state_size=16,
    n_groups=2,
    conv_kernel=4,
    chunk_size=16,
    n_routed_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=48,
    moe_latent_size=32,
    moe_shared_expert_intermediate_size=64,
    intermediate_size=96,
    routed_scaling_factor=2.5,
    max_position_embeddings=4096,
)


def tiny_config(**overrides: Any) -> NemotronHConfig:
    """The tiny model's config (8 layers: Mamba, attention and latent MoE; 32 experts, top-4)."""
    values = dict(TINY_DEFAULTS)
    if "hybrid_override_pattern" in overrides:
        overrides["pattern"] = overrides.pop("hybrid_override_pattern")
    values.update(overrides)
    return NemotronHConfig(**values)


def random_weights(
    config: NemotronHConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Deterministic random tensors for every backbone tensor name of ``config``."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_tensors(config).items():
        out[name] = _init(name, shape, config, gen).to(dtype)
    for name in out:
        if name.endswith("e_score_correction_bias"):
            out[name] = out[name].float()
    return out


def _init(name: str, shape: tuple[int, ...], c: NemotronHConfig, gen: torch.Generator) -> torch.Tensor:
    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
        return 1.0 + normal(0.1)
    if name.endswith("embeddings.weight"):
        return normal(1.0)
    if name.endswith("e_score_correction_bias"):
        return normal(0.05)
    if name.endswith("A_log"):
        return torch.log(uniform(1.0, 8.0))
    if name.endswith("dt_bias"):
        dt = uniform(0.05, 0.3)
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    if name.endswith(".D"):
        return uniform(0.5, 1.5)
    if name.endswith("conv1d.weight"):
        return normal(0.5)
    if name.endswith(".bias"):
        return normal(0.02)
    if name.endswith("gate.weight"):
        return normal(2.0 / math.sqrt(shape[1]))
    if name.endswith("in_proj.weight"):
        w = normal(1.0 / math.sqrt(shape[1]))
        w[-c.mamba_num_heads:] *= 0.3  # dt rows: keep softplus(dt + dt_bias) well above time_step_min
        return w
    return normal(1.0 / math.sqrt(shape[-1]))


def write_tiny_checkpoint(
    path: str | Path, seed: int = 0, *, shards: int = 1, dtype: torch.dtype = torch.float32, tokenizer: str = "bytes",
    **config_overrides: Any
) -> Path:
    """Write a small deterministic Nemotron-H checkpoint in the Hugging Face layout; returns the folder.

    ``shards > 1`` writes ``model-0000i-of-0000n.safetensors`` files and ``model.safetensors.index.json``.
    ``tokenizer``: ``"bytes"`` (UTF-8 bytes, vocabulary 259) or ``"bpe"`` (``tokenizer.json``,
    ``tokenizer_config.json`` with a chat template and ``generation_config.json``; the vocabulary is
    the BPE's, needs the ``tokenizers`` package).
    Any :class:`~residency.config.NemotronHConfig` field can be overridden (for example
    ``n_routed_experts=64``, ``moe_latent_size=None`` for a Nano-style model, ``pattern="ME*E"``).
    """
    from safetensors.torch import save_file

    if tokenizer not in ("bytes", "bpe"):
        raise ValueError(f"tokenizer must be 'bytes' or 'bpe', got {tokenizer!r}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer == "bpe":
        from .model.tiny_tokenizer import tiny_vocab_size

        config_overrides.setdefault("vocab_size", tiny_vocab_size())
    config = tiny_config(**config_overrides)
    weights = random_weights(config, seed=seed, dtype=dtype)
    raw = config.to_dict()
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    if tokenizer == "bpe":
        from .model.tiny_tokenizer import write_chat_tokenizer

        write_chat_tokenizer(folder)
    else:
        ByteTokenizer().save(folder)
    names = list(weights)
    if shards <= 1:
        save_file(weights, str(folder / SINGLE_NAME), metadata={"format": "pt"})
        return folder
    per = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
        for n in part:
            weight_map[n] = fname
            total += weights[n].numel() * weights[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return folder


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius norms, in fp32): how the tests compare logits."""
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).norm() / expected.norm()).item()


def offloaded_on_cpu(folder: str | Path, budget_bytes: int, *, context: int, **kwargs: Any) -> Any:
    """An offloaded model on the ``cpu`` device under ``budget_bytes``, with every launch verified.

    The ``cpu`` device runs the offload runtime without a GPU (slots are CPU tensors under the
    budget, copies run on a background thread) and ``verify`` checks before each launch that every
    slot read holds its expert, has landed and is what the kernel's table says: how the test suite
    exercises the runtime. ``runtime_options`` in ``kwargs`` are added to ``{"verify": True}``;
    the rest go to :meth:`residency.OffloadedNemotron.from_pretrained` (quiet).
    """
    from .offloaded import OffloadedNemotron

    options = {"verify": True, **kwargs.pop("runtime_options", {})}
    return OffloadedNemotron.from_pretrained(folder, device="cpu", vram_budget=f"{budget_bytes}B", context=context,
                                             quiet=True, runtime_options=options, **kwargs)
