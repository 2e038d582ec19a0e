"""Typed Nemotron-H configuration read from a Hugging Face ``config.json``, with exact byte accounting.

Covers Nemotron 3 Super (LatentMoE, 512 experts, top-22, MTP fields), Nano (no latent) and
expert-pruned variants. Both layer encodings are accepted: the ``hybrid_override_pattern`` string
(``M`` Mamba-2, ``*`` attention, ``E`` MoE, ``-`` dense MLP) and the newer ``layers_block_type`` /
``layer_types`` list. Unknown or inconsistent fields raise :class:`ConfigError` naming the field
and the fix, because a silently ignored field is how runtimes end up computing the wrong model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ResidencyError

__all__ = [
    "ConfigError",
    "UnknownConfigFieldError",
    "NemotronHConfig",
    "EXPERT_DTYPES",
    "DENSE_DTYPES",
    "load_config",
]

# Layer kinds, as single pattern characters and as list entries (new and legacy spellings).
_PATTERN_TO_KIND = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
_LIST_TO_KIND = {
    "linear_attention": "mamba",
    "mamba": "mamba",
    "full_attention": "attention",
    "attention": "attention",
    "moe": "moe",
    "mlp": "mlp",
}
_KIND_TO_PATTERN = {v: k for k, v in _PATTERN_TO_KIND.items()}

#: routed-expert formats the byte accounting knows (w4a16: compressed-tensors int4, group 128 by default)
EXPERT_DTYPES = ("bf16", "fp8", "nvfp4", "w4a16")
#: non-expert formats: all bf16, the generic FP8 estimate, or "mixed": each module's own format from a
#: checkpoint's quantization config (needs one attached: NemotronHConfig.with_quantization)
DENSE_DTYPES = ("bf16", "fp8", "mixed")
#: bytes every section of an expert record is aligned to (residency.kernels.moe.quant_formats.RECORD_ALIGN)
RECORD_ALIGN = 16

# Keys Hugging Face writes into every config.json, or that NemotronH configs carry without
# affecting the forward math (initialisation, training, generation or runtime hints).
_IGNORED_KEYS = frozenset(
    {
        "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
        "_name_or_path", "_attn_implementation_autoset", "name_or_path", "initializer_range",
        "rescale_prenorm_residual", "hidden_dropout", "attention_dropout", "use_cache", "num_logits_to_keep",
        "output_router_logits", "router_aux_loss_coef", "time_step_floor", "time_step_max", "use_mamba_kernels",
        "moe_shared_expert_overlap", "expand", "mamba_ssm_cache_dtype", "rope_theta", "partial_rotary_factor",
        "rope_scaling", "rope_parameters", "quantization_config", "compression_config", "generation_config",
        "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder", "tokenizer_class",
        "chunk_size_feed_forward", "problem_type", "id2label", "label2id", "pruned_heads", "tie_encoder_decoder",
        "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "torchscript", "use_return_dict",
        "task_specific_params", "finetuning_task", "sep_token_id", "decoder_start_token_id", "prefix",
        "sliding_window", "num_hidden_layers", "mtp_hybrid_override_pattern",
        "mtp_layers_block_type", "hybrid_override_pattern", "layers_block_type", "layer_types",
    }
)

# Legacy spellings that HF still accepts, mapped to the current field name.
_RENAMED_KEYS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_limit": "time_step_limit",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "num_local_experts": "n_routed_experts",
    "norm_eps": "layer_norm_epsilon",
}


# Fields a config.json must set, by the layer kinds its pattern uses. A field is required when it
# changes the math and our default (Nemotron 3 Super's) differs from the one transformers falls back
# to, so a config that leaves it out means different models to different readers; vocab_size and
# hidden_size because no real config leaves them out. Other missing fields take the default that
# transformers also uses; a missing moe_latent_size means no latent projection, as in transformers.
_REQUIRED_ALWAYS = ("vocab_size", "hidden_size")
_REQUIRED_BY_KIND = {
    "attention": ("num_key_value_heads",),
    "mlp": ("intermediate_size",),
    "moe": ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "routed_scaling_factor"),
}
_REQUIRED_SHARED_EXPERT = ("moe_shared_expert_intermediate_size",)


class ConfigError(ResidencyError, ValueError):
    """A config.json that cannot describe a Nemotron-H model this library computes exactly."""


class UnknownConfigFieldError(ConfigError):
    """A config.json with fields this version of residency does not understand (``fields``)."""

    def __init__(self, source: str, fields: list[str]) -> None:
        self.source, self.fields = source, sorted(fields)
        super().__init__(
            f"{source}: unknown field(s) {self.fields}. They may change the model's math, so residency refuses to "
            "guess: remove them from the config if you know they are harmless. To only read such a config (byte "
            "counts, planning), call load_config(path, strict=False) or NemotronHConfig.from_dict(raw, "
            "strict=False); a model is never loaded with fields it does not understand."
        )

    @property
    def cli_message(self) -> str:
        from . import __version__

        return (
            f"{self.source}: field(s) {self.fields} are not understood by this version of residency "
            f"({__version__}); they may change the model's math, so residency refuses to guess: use a residency "
            "version that knows them, or remove them from config.json if you know they are harmless"
        )


@dataclass(frozen=True)
class NemotronHConfig:
    """The architecture fields of a Nemotron-H checkpoint (defaults are Nemotron 3 Super's)."""

    vocab_size: int = 131072
    hidden_size: int = 4096
    pattern: str = "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME"
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    attention_bias: bool = False
    # mamba-2
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    use_bias: bool = False
    mamba_proj_bias: bool = False
    mamba_hidden_act: str = "silu"
    time_step_min: float = 0.001
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    # dense MLP ('-' layers) and experts
    intermediate_size: int = 2688
    mlp_bias: bool = False
    mlp_hidden_act: str = "relu2"
    n_routed_experts: int = 512
    num_experts_per_tok: int = 22
    moe_intermediate_size: int = 2688
    moe_latent_size: int | None = 1024
    n_shared_experts: int = 1
    moe_shared_expert_intermediate_size: int = 5376
    routed_scaling_factor: float = 5.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    # rest
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262144
    num_nextn_predict_layers: int = 0
    mtp_pattern: str = ""
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    # numerics: keep the residual stream in fp32 between blocks (read from the config; the model
    # must honour it, it is not a hint)
    residual_in_fp32: bool = False
    # the checkpoint's quantization scheme (residency.model.quant.QuantScheme: spec_of(module) and
    # describe()), attached by with_quantization for byte accounting; not part of the architecture,
    # so it is left out of equality, the fingerprint and to_dict
    quantization: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, strict: bool = True, source: str = "config") -> NemotronHConfig:
        """Build from a parsed config.json.

        ``strict`` (default) rejects keys this library does not know, since an unknown field may
        change the math (:class:`UnknownConfigFieldError`). Pass ``strict=False`` to ignore them (for
        example to plan from a newer config format). Fields that change the math and have no safe
        default must be present (see ``_REQUIRED_BY_KIND``); a missing one raises :class:`ConfigError`.
        """
        raw = dict(raw)
        model_type = raw.get("model_type", "nemotron_h")
        if model_type != "nemotron_h":
            raise ConfigError(
                f"{source}: model_type is {model_type!r}, expected 'nemotron_h'. "
                "Point residency at a Nemotron-H checkpoint (NemotronHForCausalLM)."
            )
        for old, new in _RENAMED_KEYS.items():
            if old in raw:
                if new in raw and raw[new] != raw[old]:
                    raise ConfigError(f"{source}: both {old!r} and {new!r} are set and differ; keep only {new!r}.")
                raw[new] = raw.pop(old)

        pattern = _read_pattern(raw, source)
        mtp_pattern = _read_mtp_pattern(raw, source)
        names = {f.name for f in dataclasses.fields(cls)} - {"quantization"}
        values: dict[str, Any] = {"pattern": pattern, "mtp_pattern": mtp_pattern}
        unknown = []
        for key, value in raw.items():
            if key in names and key not in ("pattern", "mtp_pattern"):
                values[key] = value
            elif key not in _IGNORED_KEYS:
                unknown.append(key)
        if unknown and strict:
            raise UnknownConfigFieldError(source, unknown)
        _check_required(values, pattern, source)
        values.setdefault("moe_latent_size", None)
        n_layers = raw.get("num_hidden_layers")
        if n_layers is not None and n_layers != len(pattern) and raw.get("hybrid_override_pattern") is not None:
            raise ConfigError(
                f"{source}: num_hidden_layers is {n_layers} but the layer pattern has {len(pattern)} entries; "
                "make them agree."
            )
        if "time_step_limit" in values:
            values["time_step_limit"] = _read_limit(values["time_step_limit"], source)
        if values.get("moe_latent_size") == 0:
            values["moe_latent_size"] = None
        try:
            return cls(**values)
        except TypeError as exc:  # wrong value types surface here
            raise ConfigError(f"{source}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """A config.json-style dict that :meth:`from_dict` reads back to an equal config."""
        out: dict[str, Any] = {"model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"]}
        for f in dataclasses.fields(self):
            if f.name != "quantization":
                out[f.name] = getattr(self, f.name)
        out["hybrid_override_pattern"] = out.pop("pattern")
        mtp = out.pop("mtp_pattern")
        if mtp:
            out["mtp_hybrid_override_pattern"] = mtp
        lo, hi = out.pop("time_step_limit")
        if (lo, hi) != (0.0, math.inf):  # the default is left out: JSON has no infinity
            out["time_step_limit"] = [lo, hi if math.isfinite(hi) else "inf"]
        out["num_hidden_layers"] = self.num_layers
        return out

    def replace(self, **changes: Any) -> NemotronHConfig:
        return dataclasses.replace(self, **changes)

    def with_quantization(self, scheme: Any) -> NemotronHConfig:
        """This config with a checkpoint's quantization scheme attached (None detaches it): byte
        accounting then uses each module's own format (``expert_bytes(self.expert_format)``,
        ``non_expert_bytes("mixed")``)."""
        return dataclasses.replace(self, quantization=scheme)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"inconsistent Nemotron-H config: {msg}")

        if not self.pattern or any(c not in _PATTERN_TO_KIND for c in self.pattern):
            raise bad(f"layer pattern {self.pattern!r} must be non-empty and use only M, *, E and -")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel",
                     "chunk_size", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                      f"num_key_value_heads ({self.num_key_value_heads})")
        if self.mamba_num_heads % self.n_groups:
            raise bad(f"mamba_num_heads ({self.mamba_num_heads}) is not a multiple of n_groups ({self.n_groups})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts "
                      f"({self.n_routed_experts})")
        if self.n_routed_experts % self.n_group or self.topk_group > self.n_group:
            raise bad(f"n_routed_experts ({self.n_routed_experts}) must split into n_group ({self.n_group}) "
                      f"groups and topk_group ({self.topk_group}) may not exceed n_group")
        if self.n_group > 1 and self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            raise bad("num_experts_per_tok exceeds the experts in the selected routing groups")
        if self.mlp_hidden_act != "relu2":
            raise bad(f"mlp_hidden_act {self.mlp_hidden_act!r} is not supported (Nemotron-H experts use 'relu2')")
        if self.mamba_hidden_act != "silu":
            raise bad(f"mamba_hidden_act {self.mamba_hidden_act!r} is not supported (Nemotron-H uses 'silu')")
        if self.moe_latent_size is not None and self.moe_latent_size <= 0:
            raise bad(f"moe_latent_size must be positive or null, got {self.moe_latent_size!r}")
        if not isinstance(self.residual_in_fp32, bool):
            raise bad(f"residual_in_fp32 must be true or false, got {self.residual_in_fp32!r}")
        if self.mamba_proj_bias:
            raise bad("mamba_proj_bias=true is not supported (Nemotron-H Mamba projections use `use_bias`)")
        if self.n_shared_experts not in (0, 1):
            raise bad(f"n_shared_experts {self.n_shared_experts} is not supported (0 or 1)")
        if self.num_nextn_predict_layers and not self.mtp_pattern:
            raise bad("num_nextn_predict_layers > 0 needs mtp_hybrid_override_pattern / mtp_layers_block_type")
        if any(c not in _PATTERN_TO_KIND for c in self.mtp_pattern):
            raise bad(f"MTP pattern {self.mtp_pattern!r} uses characters other than M, *, E and -")
        if "E" in self.pattern and self.num_experts_per_tok < 1:
            raise bad("MoE layers need num_experts_per_tok >= 1")

    # ------------------------------------------------------------------ layer structure
    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def layer_kinds(self) -> list[str]:
        """Per layer: 'mamba', 'attention', 'moe' or 'mlp'."""
        return [_PATTERN_TO_KIND[c] for c in self.pattern]

    @property
    def moe_layers(self) -> list[int]:
        """Model layer indices of the MoE layers, in order (MoE layer j is model layer moe_layers[j])."""
        return [i for i, c in enumerate(self.pattern) if c == "E"]

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, c in enumerate(self.pattern) if c == "*"]

    @property
    def mamba_layers(self) -> list[int]:
        return [i for i, c in enumerate(self.pattern) if c == "M"]

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def expert_input_size(self) -> int:
        """Width the routed experts work in: the latent size for LatentMoE, else the hidden size."""
        return self.moe_latent_size if self.moe_latent_size is not None else self.hidden_size

    @property
    def mamba_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_size(self) -> int:
        return self.mamba_inner + self.mamba_conv_dim + self.mamba_num_heads

    # ------------------------------------------------------------------ parameter and byte accounting
    @property
    def params_per_expert(self) -> int:
        """Weights in one routed expert: up [I, L] + down [L, I]."""
        return 2 * self.moe_intermediate_size * self.expert_input_size

    def expert_bytes(self, dtype: str = "bf16", *, group_size: int | None = 128, symmetric: bool = True,
                     scale_bytes: int = 2) -> int:
        """Bytes of one routed expert in ``dtype``, as the runtime stores and copies it (one record).

        Quantized formats count the checkpoint's weight and scale tensors, each record section
        padded to :data:`RECORD_ALIGN` bytes (no padding for Super's shapes), plus four fp32
        per-tensor scalars for ``nvfp4`` / ``fp8``. ``w4a16``: int4 codes packed in int32, one
        scale of ``scale_bytes`` per ``group_size`` inputs (None: per row), int4 zero points when
        not ``symmetric``. With a quantization scheme attached and ``dtype`` its expert format,
        the scheme's parameters are used (the largest expert over the MoE layers).
        """
        spec = self._expert_spec() if self.quantization is not None else None
        if spec is not None and dtype == spec.format:
            if dtype == "w4a16":
                group_size, symmetric, scale_bytes = spec.group_size, spec.symmetric, spec.scale_dtype.itemsize
        inner, width = self.moe_intermediate_size, self.expert_input_size
        if dtype == "bf16":
            return 2 * self.params_per_expert
        if dtype not in EXPERT_DTYPES:
            raise ConfigError(f"unknown expert dtype {dtype!r}; use one of {EXPERT_DTYPES}")
        total = 0
        for n, k in ((inner, width), (width, inner)):
            if dtype == "nvfp4":
                total += _align(n * _ceil_div(k, 2)) + _align(n * _ceil_div(k, 16))
            elif dtype == "fp8":
                total += _align(n * k)
            else:
                groups = 1 if group_size is None else _ceil_div(k, group_size)
                total += _align(4 * n * _ceil_div(k, 8)) + _align(n * groups * scale_bytes)
                if not symmetric:
                    total += _align(4 * _ceil_div(n, 8) * groups)
        if dtype in ("nvfp4", "fp8"):
            total += _align(4 * 4)  # weight scale (global) and input scale of up and down, fp32
        return total

    @property
    def expert_format(self) -> str:
        """The routed experts' format in the attached quantization scheme (``"bf16"`` without one)."""
        spec = self._expert_spec() if self.quantization is not None else None
        return "bf16" if spec is None else spec.format

    def _expert_spec(self) -> Any:
        """The attached scheme's expert format (the first quantized expert projection found), or None."""
        for layer in self.moe_layers:
            for proj in ("up", "down"):
                spec = self.quantization.spec_of(f"backbone.layers.{layer}.mixer.experts.0.{proj}_proj")
                if spec is not None:
                    return spec
        return None

    def dense_linears(self) -> list[tuple[str, str, int, int]]:
        """Every non-expert Linear module: (name, byte group, out, in), lm_head included."""
        d = self.hidden_size
        out: list[tuple[str, str, int, int]] = []
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        for i, kind in enumerate(self.layer_kinds):
            m = f"backbone.layers.{i}.mixer."
            if kind == "mamba":
                out += [(m + "in_proj", "mamba", self.mamba_in_proj_size, d), (m + "out_proj", "mamba", d,
                                                                                 self.mamba_inner)]
            elif kind == "attention":
                out += [(m + "q_proj", "attention", q, d), (m + "k_proj", "attention", kv, d),
                        (m + "v_proj", "attention", kv, d), (m + "o_proj", "attention", d, q)]
            elif kind == "moe":
                if self.n_shared_experts:
                    s = self.moe_shared_expert_intermediate_size
                    out += [(m + "shared_experts.up_proj", "shared_experts", s, d),
                            (m + "shared_experts.down_proj", "shared_experts", d, s)]
                if self.moe_latent_size is not None:
                    out += [(m + "fc1_latent_proj", "latent_proj", self.moe_latent_size, d),
                            (m + "fc2_latent_proj", "latent_proj", d, self.moe_latent_size)]
            else:
                out += [(m + "up_proj", "mlp", self.intermediate_size, d),
                        (m + "down_proj", "mlp", d, self.intermediate_size)]
        if not self.tie_word_embeddings:
            out.append(("lm_head", "lm_head", self.vocab_size, d))
        return out

    @property
    def num_experts_total(self) -> int:
        return self.num_moe_layers * self.n_routed_experts

    def routed_expert_bytes(self, dtype: str = "bf16") -> int:
        """All routed experts of the backbone (MTP excluded)."""
        return self.num_experts_total * self.expert_bytes(dtype)

    def non_expert_param_groups(self) -> dict[str, int]:
        """Non-expert backbone weights by component (fp32 router biases excluded; see non_expert_bytes)."""
        d = self.hidden_size
        mamba = (
            d * self.mamba_in_proj_size
            + self.mamba_conv_dim * self.conv_kernel
            + (self.mamba_conv_dim if self.use_conv_bias else 0)
            + 3 * self.mamba_num_heads
            + self.mamba_inner
            + self.mamba_inner * d
            + (self.mamba_in_proj_size + d if self.use_bias else 0)
        )
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attention = 2 * d * q + 2 * d * kv + ((q + 2 * kv + d) if self.attention_bias else 0)
        shared = self.n_shared_experts * 2 * d * self.moe_shared_expert_intermediate_size
        latent = 2 * d * self.moe_latent_size if self.moe_latent_size is not None else 0
        router = self.n_routed_experts * d
        mlp = 2 * d * self.intermediate_size
        n_m, n_a = len(self.mamba_layers), len(self.attention_layers)
        n_e, n_d = self.num_moe_layers, self.pattern.count("-")
        groups = {
            "embeddings": self.vocab_size * d,
            "lm_head": 0 if self.tie_word_embeddings else self.vocab_size * d,
            "mamba": n_m * mamba,
            "attention": n_a * attention,
            "router": n_e * router,
            "latent_proj": n_e * latent,
            "shared_experts": n_e * shared,
            "mlp": n_d * mlp,
            "norms": self.num_layers * d + d,
        }
        return groups

    @property
    def non_expert_params(self) -> int:
        return sum(self.non_expert_param_groups().values())

    @property
    def total_params(self) -> int:
        """Backbone weights (no MTP, no fp32 router biases), as published parameter counts state them."""
        return self.non_expert_params + self.num_experts_total * self.params_per_expert

    @property
    def active_params(self) -> int:
        """Weights touched per token: everything except the routed experts not selected."""
        unused = self.num_moe_layers * (self.n_routed_experts - self.num_experts_per_tok)
        return self.total_params - unused * self.params_per_expert

    def non_expert_bytes_by_group(self, dtype: str = "bf16") -> dict[str, int]:
        """Bytes of the non-expert weights per component.

        ``fp8`` quantises the large Linear layers (Mamba in/out projections, attention, latent
        projections, shared experts, dense MLPs) with per-tensor scales; embeddings, lm_head,
        router, convolution, norms and small vectors stay bf16, as in the published FP8/NVFP4 repos.
        The fp32 ``e_score_correction_bias`` vectors are counted under ``router``. ``mixed`` counts
        each Linear in its own format from the attached quantization scheme (what the loader keeps
        in memory: packed weights, block/group scales, zero points and the fp32 per-tensor scale);
        a quantized ``lm_head`` counts in bf16 because the loader dequantizes it.
        """
        if dtype not in DENSE_DTYPES:
            raise ConfigError(f"unknown non-expert dtype {dtype!r}; use one of {DENSE_DTYPES}")
        groups = self.non_expert_param_groups()
        out = {k: 2 * v for k, v in groups.items()}
        out["router"] += 4 * self.num_moe_layers * self.n_routed_experts
        if dtype == "mixed":
            if self.quantization is None:
                raise ConfigError(
                    "non-expert dtype 'mixed' takes each module's format from a checkpoint's quantization config: "
                    "plan with --model CHECKPOINT_DIR or a quantized --config preset"
                )
            for name, group, n, k in self.dense_linears():
                spec = self.quantization.spec_of(name)
                if spec is None or name == "lm_head":
                    continue
                out[group] += _linear_bytes(spec, n, k) - 2 * n * k
        if dtype == "fp8":
            d = self.hidden_size
            n_m, n_a = len(self.mamba_layers), len(self.attention_layers)
            n_e, n_d = self.num_moe_layers, self.pattern.count("-")
            scale = 2 * 4  # weight_scale + input_scale, fp32

            def linear(count: int, out_f: int, in_f: int) -> int:
                # bytes saved by storing `count` Linears in fp8 instead of bf16, scales added back
                return count * (out_f * in_f - scale)

            q = self.num_attention_heads * self.head_dim
            kv = self.num_key_value_heads * self.head_dim
            out["mamba"] -= linear(n_m, self.mamba_in_proj_size, d) + linear(n_m, d, self.mamba_inner)
            out["attention"] -= linear(2 * n_a, q, d) + linear(2 * n_a, kv, d)
            if self.moe_latent_size is not None:
                out["latent_proj"] -= linear(2 * n_e, self.moe_latent_size, d)
            shared = self.moe_shared_expert_intermediate_size
            out["shared_experts"] -= linear(2 * n_e * self.n_shared_experts, shared, d)
            out["mlp"] -= linear(2 * n_d, self.intermediate_size, d)
        return out

    def non_expert_bytes(self, dtype: str = "bf16") -> int:
        return sum(self.non_expert_bytes_by_group(dtype).values())

    # ------------------------------------------------------------------ decode state
    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return len(self.attention_layers) * 2 * self.num_key_value_heads * self.head_dim * dtype_bytes

    def mamba_state_bytes(self, ssm_dtype_bytes: int = 4, conv_dtype_bytes: int = 2) -> int:
        """Recurrent state per sequence: SSM state [nh, p, N] and conv state [(K-1), conv_dim] per Mamba layer."""
        ssm = self.mamba_num_heads * self.mamba_head_dim * self.ssm_state_size * ssm_dtype_bytes
        conv = (self.conv_kernel - 1) * self.mamba_conv_dim * conv_dtype_bytes
        return len(self.mamba_layers) * (ssm + conv)

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """A short stable hash of everything that decides tensor shapes and routing.

        Profiles, traces and plans carry it so a file made for one model is refused for another.
        """
        keys = ("vocab_size", "hidden_size", "pattern", "num_attention_heads", "num_key_value_heads", "head_dim",
                "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel",
                "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_latent_size",
                "moe_shared_expert_intermediate_size", "n_shared_experts", "routed_scaling_factor", "n_group",
                "topk_group", "norm_topk_prob", "intermediate_size")
        canon = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return "nemotron_h-" + hashlib.sha256(canon.encode()).hexdigest()[:16]

    def describe(self) -> str:
        return (
            f"Nemotron-H: {self.num_layers} layers ({len(self.mamba_layers)} Mamba, {len(self.attention_layers)} "
            f"attention, {self.num_moe_layers} MoE), {self.n_routed_experts} experts top-{self.num_experts_per_tok}, "
            f"hidden {self.hidden_size}, latent {self.moe_latent_size}, {_count(self.total_params)} params"
        )


# ---------------------------------------------------------------------- helpers


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _align(n: int) -> int:
    return _ceil_div(n, RECORD_ALIGN) * RECORD_ALIGN


def _linear_bytes(spec: Any, n: int, k: int) -> int:
    """Bytes a quantized Linear ``[n, k]`` occupies once loaded (weights, scales, zero points, fp32 scalar)."""
    if spec.format == "nvfp4":
        return n * _ceil_div(k, 2) + n * _ceil_div(k, 16) + 4
    if spec.format == "fp8":
        return n * k + 4
    groups = 1 if spec.group_size is None else _ceil_div(k, spec.group_size)
    zero = 0 if spec.symmetric else 4 * _ceil_div(n, 8) * groups
    return 4 * n * _ceil_div(k, 8) + n * groups * spec.scale_dtype.itemsize + zero


def _check_required(values: dict[str, Any], pattern: str, source: str) -> None:
    kinds = {_PATTERN_TO_KIND[c] for c in pattern}
    required = list(_REQUIRED_ALWAYS)
    for kind, names in _REQUIRED_BY_KIND.items():
        if kind in kinds:
            required += names
    if "moe" in kinds and values.get("n_shared_experts", 1):
        required += _REQUIRED_SHARED_EXPERT
    missing = [name for name in required if name not in values]
    if missing:
        by_kind = dict(_REQUIRED_BY_KIND, moe=_REQUIRED_BY_KIND["moe"] + _REQUIRED_SHARED_EXPERT)
        names = {"attention": "attention", "mlp": "dense MLP", "moe": "MoE"}
        layers = [names[k] for k in sorted(kinds & set(by_kind)) if set(by_kind[k]) & set(missing)]
        why = f" (its layer pattern has {' and '.join(layers)} layers)" if layers else ""
        raise ConfigError(
            f"{source}: missing field(s) {missing}; they decide the model's math{why} and have no safe default, "
            "so residency will not guess them: add them from the model's published config.json"
        )


def _read_pattern(raw: dict[str, Any], source: str) -> str:
    pattern = raw.get("hybrid_override_pattern")
    listed = raw.get("layers_block_type", raw.get("layer_types"))
    from_list = None
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(x, str) for x in listed):
            raise ConfigError(f"{source}: layers_block_type must be a list of strings")
        bad = sorted({x for x in listed if x not in _LIST_TO_KIND})
        if bad:
            raise ConfigError(
                f"{source}: layers_block_type has unknown layer types {bad}; expected {sorted(_LIST_TO_KIND)}"
            )
        from_list = "".join(_KIND_TO_PATTERN[_LIST_TO_KIND[x]] for x in listed)
    if pattern is not None:
        if not isinstance(pattern, str) or any(c not in _PATTERN_TO_KIND for c in pattern):
            raise ConfigError(f"{source}: hybrid_override_pattern {pattern!r} may contain only M, *, E and -")
        if from_list is not None and from_list != pattern:
            raise ConfigError(
                f"{source}: hybrid_override_pattern and layers_block_type describe different layers; keep one"
            )
        return pattern
    if from_list is None:
        raise ConfigError(f"{source}: no layer layout; set hybrid_override_pattern or layers_block_type")
    return from_list


def _read_mtp_pattern(raw: dict[str, Any], source: str) -> str:
    if not raw.get("num_nextn_predict_layers"):
        return ""
    pattern = raw.get("mtp_hybrid_override_pattern")
    if pattern is not None:
        return str(pattern)
    listed = raw.get("mtp_layers_block_type")
    if listed is None:
        return "*E"
    try:
        return "".join(_KIND_TO_PATTERN[_LIST_TO_KIND[x]] for x in listed)
    except KeyError as exc:
        raise ConfigError(f"{source}: mtp_layers_block_type has an unknown layer type {exc}") from exc


def _read_limit(value: Any, source: str) -> tuple[float, float]:
    def num(x: Any) -> float:
        if isinstance(x, dict) and "__float__" in x:  # transformers' JSON encoding of inf
            x = x["__float__"]
        return float(x)

    try:
        lo, hi = (num(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: time_step_limit must be two numbers, got {value!r}") from exc
    return (lo, hi)


def load_config(path: str | Path, *, strict: bool = True) -> NemotronHConfig:
    """Read ``config.json`` (or a checkpoint folder containing one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; pass a checkpoint folder or its config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); re-download or re-save the config") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return NemotronHConfig.from_dict(raw, strict=strict, source=str(path))

