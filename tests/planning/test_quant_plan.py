"""Planning with per-module formats: the Super release presets, `plan --model DIR` from a quantized checkpoint's
config files alone, and REAP-pruned expert counts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from residency.cli import main
from residency.cli.plan import resolve_config
from residency.config import NemotronHConfig
from residency.model.quant.convert import quantize_checkpoint
from residency.planning.plan import plan_residency
from residency.testing import write_tiny_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # tiny tensors on a shared 2-core machine: intra-op threads only add barrier waits
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

LEAF_KIND = {"in_proj": "M", "out_proj": "M", "o_proj": "*", "shared_experts.up_proj": "E",
             "shared_experts.down_proj": "E", "fc1_latent_proj": "E", "fc2_latent_proj": "E"}


@pytest.fixture(scope="module")
def nvfp4():
    return resolve_config("nemotron-3-super-nvfp4", None)


def test_nvfp4_preset_has_the_release_module_counts(nvfp4):
    scheme = nvfp4.quantization
    formats = scheme.formats(scheme.listed_modules())
    assert formats == {"nvfp4": 40_961, "fp8": 139}
    fp8 = [m for m in scheme.listed_modules() if scheme.spec_of(m).format == "fp8"]
    for module in fp8:
        layer = int(module.split(".")[2])
        leaf = module.split(".mixer.")[1]
        assert nvfp4.pattern[layer] == LEAF_KIND[leaf], module
    assert {m.split(".mixer.")[1] for m in fp8} == set(LEAF_KIND)
    assert sorted(int(m.split(".")[2]) for m in fp8 if m.endswith("fc1_latent_proj")) == [1, 3, 5]
    assert scheme.spec_of("backbone.layers.1.mixer.shared_experts.down_proj").format == "nvfp4"
    assert scheme.spec_of("backbone.layers.8.mixer.shared_experts.down_proj") is None  # BF16
    assert scheme.spec_of("lm_head") is None and scheme.spec_of("backbone.layers.7.mixer.q_proj") is None
    assert nvfp4.expert_format == "nvfp4" and nvfp4.fingerprint() == NemotronHConfig().fingerprint()


def test_mixed_preset_counts_the_dense_fp8_modules_at_their_real_size(nvfp4):
    plan = plan_residency(nvfp4, "H100 PCIe")
    assert (plan.settings.expert_dtype, plan.settings.dense_dtype) == ("nvfp4", "mixed")
    bf16 = NemotronHConfig().non_expert_bytes("bf16")
    saved = 0
    for name, _, n, k in nvfp4.dense_linears():
        spec = nvfp4.quantization.spec_of(name)
        if spec is None:
            continue
        stored = n * k + 4 if spec.format == "fp8" else n * k // 2 + n * k // 16 + 4
        saved += 2 * n * k - stored
    assert plan.breakdown.get("non_expert_weights") == bf16 - saved
    assert saved > 4.5 * 2**30  # the 139 FP8 modules and one NVFP4 one: ~4.9 GiB less than BF16
    assert plan.settings.expert_size == 3_096_592
    assert any("139 fp8, 1 nvfp4 of 272" in n for n in plan.notes) and any("module list:" in n for n in plan.notes)
    bf16_plan = plan_residency(nvfp4, "H100 PCIe", dense_dtype="bf16")
    assert bf16_plan.budget.expert_slots < plan.budget.expert_slots


def test_spark_prediction_with_the_release_formats_is_near_the_published_speed(nvfp4):
    # Super NVFP4 on one DGX Spark decodes at about 16 tok/s (vLLM, batch 1)
    plan = plan_residency(nvfp4, "spark")
    assert 13.0 <= plan.tokens_per_s <= 20.0 and plan.hit_rate == 1.0


def test_fp8_and_bf16_presets():
    fp8 = resolve_config("nemotron-3-super-fp8", None)
    plan = plan_residency(fp8, "H100 PCIe")
    assert (plan.settings.expert_dtype, plan.settings.dense_dtype) == ("fp8", "mixed")
    assert plan.settings.expert_size == 5_505_040
    assert any("assumed, unverified" in n for n in plan.notes)
    bf16 = resolve_config("nemotron-3-super-bf16", None)
    release = plan_residency(bf16, "H100 PCIe")
    assert (release.settings.expert_dtype, release.settings.dense_dtype) == ("bf16", "bf16")
    assert release.settings.expert_size == 11_010_048
    # the plain config (no release named) keeps the planner's defaults: NVFP4 experts, BF16 dense weights
    default = plan_residency(resolve_config("nemotron-3-super", None), "H100 PCIe")
    assert (default.settings.expert_dtype, default.settings.dense_dtype) == ("nvfp4", "bf16")


def test_mixed_without_a_quantization_config_is_refused():
    from residency.config import ConfigError

    with pytest.raises(ConfigError, match="--model CHECKPOINT_DIR or a quantized --config preset"):
        plan_residency(NemotronHConfig(), "4090", dense_dtype="mixed")


@pytest.mark.parametrize("experts", [384, 256])
def test_reap_pruned_super_plans_with_the_preset_formats(experts):
    from residency.cli.plan import QUANT_PRESETS
    from residency.model.quant.scheme import load_preset

    config = NemotronHConfig(n_routed_experts=experts)
    import importlib.resources

    with importlib.resources.as_file(importlib.resources.files("residency") / "data"
                                     / QUANT_PRESETS["nemotron-3-super-nvfp4"]) as p:
        config = config.with_quantization(load_preset(p, config))
    plan = plan_residency(config, "RTX 4090")
    assert plan.num_experts == experts and len(plan.layers) == 40
    assert plan.settings.expert_size == 3_096_592
    assert config.quantization.formats(config.quantization.listed_modules())["nvfp4"] == 40 * experts * 2 + 1


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    """Config and quantization files of quantized tiny checkpoints, without their weights."""
    root = tmp_path_factory.mktemp("qplan")
    src = write_tiny_checkpoint(root / "f32", seed=0)
    out = {}
    for name, experts, dense in (("nvfp4-fp8", "nvfp4", "fp8"), ("w4a16", "w4a16", None)):
        q = quantize_checkpoint(src, root / name, experts=experts, dense=dense).folder
        for f in q.glob("*.safetensors"):
            f.unlink()
        out[name] = q
    return out


def test_plan_model_dir_reads_only_the_config_files(config_only, capsys, tmp_path):
    folder = config_only["nvfp4-fp8"]
    assert not list(folder.glob("*.safetensors"))
    assert main(["plan", "--model", str(folder), "--gpu", "4090", "--out", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "experts nvfp4" in out and "non-expert mixed" in out and "26 fp8 of 26" in out
    plan = json.loads((tmp_path / "p.json").read_text())
    config = resolve_config(None, str(folder))
    assert plan["settings"]["expert_size"] == config.expert_bytes("nvfp4") == 1744
    dense = plan["budget"]["breakdown"]["components"][0]
    assert dense["name"] == "non_expert_weights" and dense["bytes"] == config.non_expert_bytes("mixed")
    assert dense["bytes"] < config.non_expert_bytes("bf16")


def test_plan_model_dir_w4a16_uses_the_checkpoint_group_size(config_only, capsys):
    config = resolve_config(None, str(config_only["w4a16"]))
    assert config.expert_format == "w4a16"
    # group 128 over K = 32 / 48: one scale per row; bf16 scales assumed without the headers
    up = 4 * 48 * 4 + ((48 * 1 * 2 + 15) // 16) * 16
    down = 4 * 32 * 6 + ((32 * 1 * 2 + 15) // 16) * 16
    assert config.expert_bytes("w4a16") == up + down
    assert main(["plan", "--model", str(config_only["w4a16"]), "--gpu", "4090"]) == 0
    assert "experts w4a16" in capsys.readouterr().out


def test_plan_model_dir_with_a_broken_quantization_config(config_only, tmp_path, capsys):
    folder = shutil.copytree(config_only["nvfp4-fp8"], tmp_path / "bad")
    hf = json.loads((folder / "hf_quant_config.json").read_text())
    hf["quantization"]["quant_algo"] = "NVFP4_AWQ"
    (folder / "hf_quant_config.json").write_text(json.dumps(hf))
    assert main(["plan", "--model", str(folder), "--gpu", "4090"]) == 2
    err = capsys.readouterr().err
    assert "unknown quant_algo 'NVFP4_AWQ'" in err and err.count("\n") == 1
