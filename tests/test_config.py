"""Config parsing and the published Nemotron 3 Super / Nano byte and parameter counts."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from residency.config import ConfigError, NemotronHConfig, UnknownConfigFieldError, load_config

GiB = 1024**3
SUPER_JSON = resources.files("residency") / "data" / "nemotron-3-super-120b-a12b.config.json"
NANO = dict(
    hidden_size=2688, pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", mamba_num_heads=64,
    n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856, moe_latent_size=None,
    moe_shared_expert_intermediate_size=3712, routed_scaling_factor=2.5,
)


@pytest.fixture(scope="module")
def super_config() -> NemotronHConfig:
    return load_config(SUPER_JSON)


def test_super_published_numbers(super_config):
    c = super_config
    assert c.num_layers == 88 and c.num_moe_layers == 40
    assert c.attention_layers == [7, 16, 25, 36, 47, 58, 69, 78]
    assert c.moe_layers[:4] == [1, 3, 5, 8] and c.moe_layers[-1] == 87
    assert c.params_per_expert == 5_505_024
    assert c.total_params == 120_668_687_360
    assert c.active_params == 12_770_216_960
    assert c.non_expert_params == 7_925_795_840
    assert round(c.non_expert_bytes("bf16") / GiB, 2) == 14.76
    assert c.expert_bytes("bf16") == 11_010_048
    assert c.expert_bytes("fp8") == 5_505_040
    assert c.expert_bytes("nvfp4") == 3_096_592
    assert c.routed_expert_bytes("nvfp4") == 63_418_204_160
    assert round(c.routed_expert_bytes("nvfp4") / GiB, 2) == 59.06
    assert c.routed_expert_bytes("bf16") == 225_485_783_040
    assert c.kv_bytes_per_token() == 8192
    assert round(c.mamba_state_bytes() / 2**20, 1) == 162.3
    groups = c.non_expert_param_groups()
    assert groups["shared_experts"] == 1_761_607_680 and groups["router"] == 83_886_080
    assert groups["latent_proj"] == 335_544_320
    assert c.non_expert_bytes("fp8") < c.non_expert_bytes("bf16")
    assert c.mtp_pattern == "*E"


def test_nano_and_pruned_variants(super_config):
    nano = NemotronHConfig(**NANO)
    assert nano.total_params == 31_577_937_344  # the derived count in the model reference
    assert nano.expert_input_size == 2688 and nano.expert_bytes("bf16") == 19_955_712
    assert super_config.replace(n_routed_experts=384).total_params == 92_461_992_960
    assert super_config.replace(n_routed_experts=256).total_params == 64_255_298_560


def test_pattern_and_list_forms_agree(super_config):
    raw = json.loads(SUPER_JSON.read_text())
    pattern = raw.pop("hybrid_override_pattern")
    names = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
    as_list = dict(raw, layers_block_type=[names[ch] for ch in pattern])
    new_names = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
    as_new_list = dict(raw, layers_block_type=[new_names[ch] for ch in pattern])
    assert NemotronHConfig.from_dict(as_list) == super_config
    assert NemotronHConfig.from_dict(as_new_list) == super_config
    assert NemotronHConfig.from_dict(super_config.to_dict()) == super_config


def test_transformers_saved_config_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.NemotronHConfig(
        vocab_size=64, hidden_size=32, hybrid_override_pattern="ME*E", num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, moe_latent_size=16,
        moe_shared_expert_intermediate_size=16,
    )
    hf.save_pretrained(tmp_path)
    c = load_config(tmp_path)
    assert c.pattern == "ME*E" and c.moe_latent_size == 16 and c.n_routed_experts == 8


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"some_new_field": 3}, "unknown field"),
        ({"hybrid_override_pattern": "MEX"}, "may contain only"),
        ({"num_experts_per_tok": 600}, "exceeds n_routed_experts"),
        ({"num_key_value_heads": 3}, "multiple of"),
        ({"num_hidden_layers": 12}, "num_hidden_layers"),
        ({"mlp_hidden_act": "silu"}, "relu2"),
        ({"layers_block_type": ["mamba", "moe"]}, "describe different layers"),
        ({"n_routed_experts": 0}, "positive integer"),
    ],
)
def test_bad_configs_are_refused(change, message):
    raw = json.loads(SUPER_JSON.read_text())
    raw.update(change)
    with pytest.raises(ConfigError, match=message):
        NemotronHConfig.from_dict(raw)


def test_unknown_fields_allowed_when_not_strict(tmp_path):
    raw = json.loads(SUPER_JSON.read_text())
    raw["some_new_field"] = 1
    assert NemotronHConfig.from_dict(raw, strict=False).n_routed_experts == 512
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnknownConfigFieldError) as info:
        load_config(tmp_path)
    err = info.value
    assert err.fields == ["some_new_field"] and isinstance(err, ConfigError)
    # the Python message names the option exactly as it is spelled; the CLI one names no Python option
    assert "load_config(path, strict=False)" in str(err) and "NemotronHConfig.from_dict(raw, strict=False)" in str(err)
    assert "load with strict=False" not in str(err)
    assert "not understood by this version of residency" in err.cli_message and "strict" not in err.cli_message
    assert load_config(tmp_path, strict=False).n_routed_experts == 512


@pytest.mark.parametrize(
    "drop, missing",
    [
        (["n_routed_experts"], "['n_routed_experts']"),
        (["n_routed_experts", "num_experts_per_tok"], "['n_routed_experts', 'num_experts_per_tok']"),
        (["moe_intermediate_size", "routed_scaling_factor"], "['moe_intermediate_size', 'routed_scaling_factor']"),
        (["hidden_size", "vocab_size"], "['vocab_size', 'hidden_size']"),
        (["num_key_value_heads"], "['num_key_value_heads']"),
        (["moe_shared_expert_intermediate_size"], "['moe_shared_expert_intermediate_size']"),
    ],
)
def test_fields_without_a_safe_default_are_required(drop, missing):
    raw = json.loads(SUPER_JSON.read_text())
    for key in drop:
        raw.pop(key, None)
    with pytest.raises(ConfigError, match="missing field") as info:
        NemotronHConfig.from_dict(raw, source="x/config.json")
    assert f"x/config.json: missing field(s) {missing}" in str(info.value)
    assert "no safe default" in str(info.value)


def test_required_fields_depend_on_the_layers():
    # no MoE layers: no expert fields needed; a dense '-' layer needs intermediate_size
    dense = {"vocab_size": 64, "hidden_size": 32, "hybrid_override_pattern": "M*M-", "num_key_value_heads": 2,
             "num_attention_heads": 4, "head_dim": 8, "mamba_num_heads": 8, "mamba_head_dim": 4, "n_groups": 2}
    with pytest.raises(ConfigError, match=r"missing field\(s\) \['intermediate_size'\].*dense MLP layers"):
        NemotronHConfig.from_dict(dense)
    assert NemotronHConfig.from_dict({**dense, "intermediate_size": 64}).num_moe_layers == 0
    # without a shared expert its size is not needed
    raw = json.loads(SUPER_JSON.read_text())
    del raw["moe_shared_expert_intermediate_size"]
    assert NemotronHConfig.from_dict({**raw, "n_shared_experts": 0}).n_shared_experts == 0


def test_missing_latent_size_means_no_latent():
    raw = json.loads(SUPER_JSON.read_text())
    del raw["moe_latent_size"]
    assert NemotronHConfig.from_dict(raw).moe_latent_size is None  # what transformers reads too


def test_residual_in_fp32_is_a_field():
    raw = json.loads(SUPER_JSON.read_text())
    assert NemotronHConfig.from_dict(raw).residual_in_fp32 is False
    config = NemotronHConfig.from_dict({**raw, "residual_in_fp32": True})
    assert config.residual_in_fp32 is True
    assert config.to_dict()["residual_in_fp32"] is True and NemotronHConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="residual_in_fp32 must be true or false"):
        NemotronHConfig.from_dict({**raw, "residual_in_fp32": "yes"})


def test_unreadable_config_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing")


def test_fingerprint_changes_with_shape(super_config):
    assert super_config.fingerprint() == load_config(SUPER_JSON).fingerprint()
    assert super_config.fingerprint() != super_config.replace(n_routed_experts=384).fingerprint()
