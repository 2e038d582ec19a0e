"""Quantized checkpoints end to end: `residency quantize`'s code path writes them, the loader detects and validates
them, and each format (and a mixed one with FP8 dense modules) gives the logits of the same model with its weights
dequantized to fp32, resident and offloaded; bad quantized checkpoints are refused naming the module and problem."""

from __future__ import annotations

import json

import pytest
import torch
from residency.kernels.moe.quant_formats import QuantSpec
from safetensors.torch import load_file, save_file

from residency import OffloadedNemotron
from residency.errors import CheckpointError
from residency.model.checkpoint import Checkpoint
from residency.model.loading import build_model, checkpoint_dtype, footprint
from residency.model.modeling import meta_model
from residency.model.quant import QuantizedExperts, QuantLinear
from residency.model.quant.convert import quantize_checkpoint
from residency.model.quant.scheme import HF_QUANT_CONFIG
from residency.testing import write_tiny_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # tiny tensors on a shared 2-core machine: intra-op threads only add barrier waits
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

W4 = QuantSpec("w4a16", group_size=16)
W4_ASYM_CHANNEL = QuantSpec("w4a16", group_size=None, symmetric=False)
CASES = {
    "nvfp4": ("nvfp4", None),
    "fp8": ("fp8", None),
    "w4a16": (W4, None),
    "w4a16-asym-channel": (W4_ASYM_CHANNEL, None),
    "nvfp4+fp8-dense": ("nvfp4", "fp8"),
    "fp8-all": ("fp8", "fp8"),
    "w4a16-all": (QuantSpec("w4a16", group_size=32, symmetric=False), QuantSpec("w4a16", group_size=32,
                                                                                symmetric=False)),
}
IDS = torch.tensor([[5, 77, 3, 200, 14, 99, 1, 42, 250, 8, 31]])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("qsrc") / "f32", seed=0)


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {name: quantize_checkpoint(source, root / name, experts=e, dense=d).folder for name, (e, d) in CASES.items()}


def dequantized_copy(folder, out):
    """The same model with every weight dequantized to fp32 (plain float checkpoint, no quantization config)."""
    ckpt = Checkpoint(folder)
    tensors = {}
    for name in ckpt.tensors:
        module, _, leaf = name.rpartition(".")
        spec = ckpt.module_spec(module)
        if spec is None:
            tensors[name] = ckpt.get(name).float() if ckpt.tensors[name].dtype != "F32" else ckpt.get(name)
        elif leaf in ("weight", "weight_packed"):
            n, k = ckpt.linears[module]
            w = torch.empty(n, k)
            ckpt.read_dequantized(module, w)
            tensors[f"{module}.weight"] = w
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    raw = json.loads((folder / "config.json").read_text())
    del raw["quantization_config"]
    (out / "config.json").write_text(json.dumps(raw))
    return out


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_logits_equal_the_dequantized_model_resident_and_offloaded(case, quantized, tmp_path):
    folder = quantized[case]
    reference = OffloadedNemotron.from_pretrained(dequantized_copy(folder, tmp_path / "deq"), device="cpu")
    expected = reference(IDS)
    resident = OffloadedNemotron.from_pretrained(folder, device="cpu")
    experts_kind = {type(m.experts) for m in resident.model.moe_mixers}
    assert experts_kind == {QuantizedExperts}
    got = resident(IDS)
    assert got.dtype == torch.float32 and rel(got, expected) <= 1e-5
    from residency.model.loading import checkpoint_dtype
    from residency.offload import DEFAULT_CONTEXT, fixed_bytes

    ckpt = Checkpoint(folder)
    need = fixed_bytes(ckpt.config, checkpoint_dtype(ckpt), ckpt=ckpt, context=DEFAULT_CONTEXT)
    budget = need.total + 4 * need.layout.record_bytes  # a few slots: most experts miss
    offloaded = OffloadedNemotron.from_pretrained(folder, device="cpu", vram_budget=f"{budget}B", quiet=True)
    got_off = offloaded(IDS)
    assert offloaded.stats()["experts"]["misses"] > 0
    assert rel(got_off, expected) <= 1e-5
    runtime = offloaded.runtime
    assert runtime.layout.quantized  # every case has quantized experts: packed records move fewer bytes per miss
    c = ckpt.config
    assert runtime.layout.record_bytes < 2 * c.moe_intermediate_size * c.expert_input_size * 2
    assert runtime.store.buffers[0].dtype == torch.uint8
    cpu = OffloadedNemotron.from_pretrained(folder, device="cpu", vram_budget=f"{budget}B", quiet=True,
                                            cpu_experts=True)
    assert rel(cpu(IDS), expected) <= 1e-5 and cpu.stats()["experts"]["cpu_computed"] > 0
    runtime.close()
    cpu.runtime.close()
    # unified memory with every packed record in RAM: decode steps read the store in place, no host routing
    everything = need.total + 2 * ckpt.total_bytes
    unified = OffloadedNemotron.from_pretrained(folder, device="cpu", vram_budget=f"{everything}B", quiet=True,
                                                runtime_options={"mode": "unified"})
    assert all(unified.runtime._in_place)
    assert torch.equal(unified.generate(IDS, max_new_tokens=4, temperature=0, stop_at_eos=False),
                       reference.generate(IDS, max_new_tokens=4, temperature=0, stop_at_eos=False))
    assert unified.stats()["experts"]["by_phase"]["decode"]["hits"] == 3 * c.num_experts_per_tok * c.num_moe_layers
    unified.runtime.close()


def test_dense_modules_stay_quantized_and_compute_bit_for_bit(quantized, tmp_path):
    folder = quantized["nvfp4+fp8-dense"]
    model = build_model(Checkpoint(folder))
    mixer = model.backbone.layers[0].mixer
    assert isinstance(mixer.in_proj, QuantLinear) and mixer.in_proj.weight.dtype == torch.float8_e4m3fn
    assert not isinstance(model.lm_head, QuantLinear)  # lm_head is never quantized by the releases or quantize
    flat = build_model(Checkpoint(folder), dequantize=True)
    assert isinstance(flat.backbone.layers[0].mixer.in_proj, torch.nn.Linear)
    x = torch.randn(3, 64)
    # the dequantized-at-load Linear and the quantized one agree to the bit on CPU
    assert torch.equal(mixer.in_proj(x), flat.backbone.layers[0].mixer.in_proj(x))
    # memory: FP8 dense weights and NVFP4 expert records, not float copies
    ckpt = Checkpoint(folder)
    meta = meta_model(ckpt.config)
    dense_float = footprint(meta, torch.float32)
    from residency.model.loading import quantize_meta_model

    quantize_meta_model(meta, ckpt, torch.float32)
    packed = footprint(meta, torch.float32)
    assert packed.expert_bytes < dense_float.expert_bytes / 6 and packed.other_bytes < dense_float.other_bytes
    c = ckpt.config
    assert packed.expert_bytes == c.num_experts_total * (c.expert_bytes("nvfp4") + 4)  # records + slot table


def test_bf16_source_writes_bf16_scales_and_loads_in_bf16(tmp_path):
    src = write_tiny_checkpoint(tmp_path / "bf16", seed=1, dtype=torch.bfloat16)
    out = quantize_checkpoint(src, tmp_path / "w4", experts="w4a16", dense=None).folder
    ckpt = Checkpoint(out)
    assert ckpt.tensors["backbone.layers.1.mixer.experts.0.up_proj.weight_scale"].dtype == "BF16"
    assert checkpoint_dtype(ckpt) == torch.bfloat16
    assert ckpt.module_spec("backbone.layers.1.mixer.experts.0.up_proj").scale_dtype == torch.bfloat16
    model = OffloadedNemotron.from_pretrained(out, device="cpu")
    assert torch.isfinite(model(IDS)).all()


def test_files_written_by_quantize(quantized, source):
    nv = quantized["nvfp4"]
    hf = json.loads((nv / HF_QUANT_CONFIG).read_text())
    assert hf["quantization"]["quant_algo"] == "NVFP4" and hf["quantization"]["group_size"] == 16
    assert "lm_head" in hf["quantization"]["exclude_modules"]
    raw = json.loads((nv / "config.json").read_text())
    assert raw["quantization_config"]["quant_method"] == "modelopt"
    names = load_file(str(nv / "model.safetensors"))
    up = "backbone.layers.1.mixer.experts.0.up_proj."
    assert names[up + "weight"].dtype == torch.uint8 and tuple(names[up + "weight"].shape) == (48, 16)
    assert names[up + "weight_scale"].dtype == torch.float8_e4m3fn and names[up + "weight_scale_2"].dim() == 0
    mixed = json.loads((quantized["nvfp4+fp8-dense"] / HF_QUANT_CONFIG).read_text())["quantization"]
    assert mixed["quant_algo"] == "MIXED_PRECISION"
    assert mixed["quantized_layers"]["backbone.layers.0.mixer.in_proj"] == {"quant_algo": "FP8"}
    assert mixed["quantized_layers"][up[:-1]] == {"quant_algo": "NVFP4", "group_size": 16}
    ct = json.loads((quantized["w4a16"] / "config.json").read_text())["quantization_config"]
    assert ct["quant_method"] == "compressed-tensors" and ct["format"] == "pack-quantized"
    assert ct["config_groups"]["group_0"]["weights"]["group_size"] == 16
    assert not (quantized["w4a16"] / HF_QUANT_CONFIG).exists()
    # every other file of the source (the tokenizer) is copied
    others = {p.name for p in source.iterdir()} - {"config.json", "model.safetensors"}
    assert others and others <= {p.name for p in quantized["w4a16"].iterdir()}


def test_quantize_refuses_bad_requests(quantized, source, tmp_path):
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(quantized["fp8"], tmp_path / "again", experts="nvfp4")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty"):
        quantize_checkpoint(source, tmp_path / "full", experts="nvfp4")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="cannot be combined"):
        quantize_checkpoint(source, tmp_path / "mix", experts="w4a16", dense="fp8")
    assert not (tmp_path / "mix").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".mix")]


def test_sharded_output_and_index(source, tmp_path):
    out = quantize_checkpoint(source, tmp_path / "sh", experts="nvfp4", shard_bytes=200_000).folder
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = IDS[:, :5]
    single = quantize_checkpoint(source, tmp_path / "one", experts="nvfp4").folder
    assert torch.equal(OffloadedNemotron.from_pretrained(out, device="cpu")(ids),
                       OffloadedNemotron.from_pretrained(single, device="cpu")(ids))


@pytest.mark.parametrize("experts", [24, 16])
def test_reap_pruned_expert_counts_load_and_profile(tmp_path, experts):
    src = write_tiny_checkpoint(tmp_path / "reap", seed=2, n_routed_experts=experts)
    out = quantize_checkpoint(src, tmp_path / "q", experts="nvfp4", dense="fp8").folder
    model = OffloadedNemotron.from_pretrained(out, device="cpu")
    assert model.config.n_routed_experts == experts
    profile = model.profile([[1, 2, 3, 4, 5, 6]])
    assert tuple(profile.counts.shape) == (model.config.num_moe_layers, experts)


# ---------------------------------------------------------------------- refusals


def _edit(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _copy(folder, tmp_path, name="bad"):
    import shutil

    return shutil.copytree(folder, tmp_path / name)


UP = "backbone.layers.1.mixer.experts.3.up_proj"


def test_missing_scale_and_wrong_scale_shape_name_the_module(quantized, tmp_path):
    folder = _copy(quantized["nvfp4+fp8-dense"], tmp_path)

    def edit(t):
        del t[UP + ".weight_scale_2"]
        t["backbone.layers.1.mixer.experts.4.down_proj.weight_scale"] = torch.zeros(32, 2).to(torch.float8_e4m3fn)
        del t["backbone.layers.0.mixer.in_proj.weight_scale"]
        t["backbone.layers.2.mixer.out_proj.weight"] = torch.zeros(64, 64, dtype=torch.uint8)

    _edit(folder, edit)
    with pytest.raises(CheckpointError) as info:
        Checkpoint(folder).validate()
    text = str(info.value)
    assert f"{UP} (nvfp4): missing weight_scale_2" in text
    assert "experts.4.down_proj (nvfp4): weight_scale [32, 2] != expected [32, 3]" in text
    assert "backbone.layers.0.mixer.in_proj (fp8): missing weight_scale" in text
    assert "backbone.layers.2.mixer.out_proj (fp8): weight is U8, expected F8_E4M3" in text
    assert "4 quantized module problem(s)" in text


def test_module_listed_as_quantized_but_stored_in_float(quantized, source, tmp_path):
    folder = _copy(quantized["nvfp4"], tmp_path)
    plain = load_file(str(source / "model.safetensors"))

    def edit(t):
        for leaf in ("weight", "weight_scale", "weight_scale_2"):
            del t[f"{UP}.{leaf}"]
        t[f"{UP}.weight"] = plain[f"{UP}.weight"]

    _edit(folder, edit)
    with pytest.raises(CheckpointError, match=rf"{UP} \(nvfp4\): listed as quantized in .* but stored in F32"):
        OffloadedNemotron.from_pretrained(folder, device="cpu")


def test_module_stored_quantized_but_not_listed(quantized, tmp_path):
    folder = _copy(quantized["nvfp4"], tmp_path)
    hf = json.loads((folder / HF_QUANT_CONFIG).read_text())
    hf["quantization"]["exclude_modules"].append(UP)
    (folder / HF_QUANT_CONFIG).write_text(json.dumps(hf))
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()),
                                                    "quantization_config": None}))
    raw = json.loads((folder / "config.json").read_text())
    del raw["quantization_config"]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as info:
        Checkpoint(folder).validate()
    text = str(info.value)
    assert f"{UP}: stored quantized (weight U8, weight_scale, weight_scale_2) but" in text
    assert "mix formats" in text  # one expert of layer 1 would stay float: a layer needs one format


def test_unknown_algorithms_and_formats_are_refused(quantized, tmp_path):
    folder = _copy(quantized["nvfp4"], tmp_path)
    hf = json.loads((folder / HF_QUANT_CONFIG).read_text())
    hf["quantization"]["quant_algo"] = "W4A8_AWQ"
    (folder / HF_QUANT_CONFIG).write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="unknown quant_algo 'W4A8_AWQ'.*supported: ModelOpt NVFP4"):
        Checkpoint(folder)
    mixed = _copy(quantized["nvfp4+fp8-dense"], tmp_path, "mixed")
    hf = json.loads((mixed / HF_QUANT_CONFIG).read_text())
    hf["quantization"]["quantized_layers"]["backbone.layers.0.mixer.in_proj"] = {"quant_algo": "INT8_SQ"}
    (mixed / HF_QUANT_CONFIG).write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="module 'backbone.layers.0.mixer.in_proj' has unknown quant_algo"):
        Checkpoint(mixed)
    ct = _copy(quantized["w4a16"], tmp_path, "ct")
    raw = json.loads((ct / "config.json").read_text())
    raw["quantization_config"]["config_groups"]["group_0"]["format"] = "float-quantized"
    (ct / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="format 'float-quantized'.*pack-quantized"):
        Checkpoint(ct)
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (ct / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="quant_method 'gptq'"):
        Checkpoint(ct)


def test_the_two_modelopt_files_must_agree(quantized, tmp_path):
    folder = _copy(quantized["nvfp4+fp8-dense"], tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"]["quantized_layers"]["backbone.layers.0.mixer.in_proj"] = {
        "quant_algo": "NVFP4", "group_size": 16}
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="disagrees with"):
        Checkpoint(folder)
    (folder / HF_QUANT_CONFIG).unlink()  # config.json alone describes the weights: now its FP8 module is wrong
    with pytest.raises(CheckpointError, match="in_proj \\(nvfp4\\): weight .*\\[200, 64\\]"):
        Checkpoint(folder).validate()


def test_quantized_tensor_read_into_the_wrong_dtype_is_refused(quantized):
    ckpt = Checkpoint(quantized["nvfp4"])
    with pytest.raises(CheckpointError, match="stored as F8_E4M3"):
        ckpt.read_into(UP + ".weight_scale", torch.empty(48, 2))
    w = torch.empty(48, 32)
    ckpt.read_into(UP + ".weight", w)  # the logical weight into a float tensor: dequantized
    ref = torch.empty(48, 32, dtype=torch.float64)
    ckpt.read_dequantized(UP, ref)
    assert torch.equal(w.double(), ref)


@pytest.mark.parametrize("case", ["nvfp4", "w4a16-asym-channel"])
def test_the_runtime_api_slots_plus_cpu_equal_the_resident_layer(case, quantized):
    """What the offload runtime does with quantized records: host records filled from the checkpoint, a
    device bank with fewer slots than experts (and unused slots) read through a slot table, the pairs
    without a slot computed on the CPU from the host records; the sum equals the resident layer."""
    import numpy as np
    from residency.kernels.moe.quant_gather_gemm import moe_gather_gemm_quant
    from residency.runtime.cpu_quant import cpu_moe_quant

    from residency.model.loading import quantized_expert_layout

    ckpt = Checkpoint(quantized[case])
    layout = quantized_expert_layout(ckpt)
    c = ckpt.config
    prefix = f"backbone.layers.{c.moe_layers[1]}.mixer.experts"
    host = torch.zeros(c.n_routed_experts, layout.record_bytes, dtype=torch.uint8)  # the host store's records
    for e in range(c.n_routed_experts):
        layout.fill(ckpt.read_into, f"{prefix}.{e}", host[e], has=ckpt.tensors.__contains__)
    resident = build_model(ckpt).moe_mixers[1].experts
    assert torch.equal(resident.records, host)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, c.expert_input_size, generator=gen)
    ids = torch.stack([torch.randperm(c.n_routed_experts, generator=gen)[:c.num_experts_per_tok] for _ in range(6)])
    weights = torch.rand(ids.shape, generator=gen)
    bank = torch.zeros(12, layout.record_bytes, dtype=torch.uint8)  # 12 device slots, some left unused
    table = torch.full((c.n_routed_experts,), -1, dtype=torch.int32)
    for slot, e in enumerate(range(0, c.n_routed_experts, 3)[:10]):
        bank[slot + 2].copy_(host[e])  # one copy moves a whole expert
        table[e] = slot + 2
    skip = table[ids] < 0
    out = torch.zeros(x.shape)
    moe_gather_gemm_quant(x, layout.up(bank), layout.down(bank), table, ids, weights, skip, out=out)
    tokens, picks = np.nonzero(skip.numpy())
    cpu_moe_quant(x.numpy(), layout, host.numpy(), tokens, ids.numpy()[tokens, picks],
                  weights.numpy()[tokens, picks], out.numpy())
    expected = moe_gather_gemm_quant(x, resident.up(), resident.down(), resident.slot_of_expert, ids, weights)
    assert skip.any() and (~skip).any()
    assert rel(out, expected) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["nvfp4", "fp8", "w4a16", "nvfp4+fp8-dense"])
def test_on_cuda_quantized_logits_equal_the_dequantized_model_resident_and_offloaded(case, quantized, tmp_path):
    """The compiled quantized kernels (decode and prefill) and packed slot banks on the GPU, fp32 activations."""
    from residency.model.loading import checkpoint_dtype
    from residency.offload import DEFAULT_CONTEXT, fixed_bytes

    folder = quantized[case]
    reference = OffloadedNemotron.from_pretrained(dequantized_copy(folder, tmp_path / "deq"), device="cpu")
    long_ids = torch.randint(3, 256, (1, 70), generator=torch.Generator().manual_seed(1))  # prefill path too
    for ids in (IDS, long_ids):
        expected = reference(ids)
        resident = OffloadedNemotron.from_pretrained(folder, device="cuda")
        assert rel(resident(ids).cpu(), expected) <= 1e-4, case
        ckpt = Checkpoint(folder)
        need = fixed_bytes(ckpt.config, checkpoint_dtype(ckpt), ckpt=ckpt, context=DEFAULT_CONTEXT)
        budget = need.total + 4 * need.layout.record_bytes
        offloaded = OffloadedNemotron.from_pretrained(folder, device="cuda", vram_budget=f"{budget}B", quiet=True)
        try:
            assert rel(offloaded(ids).cpu(), expected) <= 1e-4, case
            assert offloaded.stats()["experts"]["misses"] > 0
        finally:
            offloaded.runtime.close()
