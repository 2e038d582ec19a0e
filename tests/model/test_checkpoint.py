"""Checkpoint folders: loading single and sharded files, and a clear error for each kind of bad folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from residency import OffloadedNemotron
from residency.errors import CheckpointError
from residency.model.checkpoint import INDEX_NAME, Checkpoint, expected_tensors
from residency.testing import write_tiny_checkpoint


@pytest.fixture()
def sharded(tmp_path):
    return write_tiny_checkpoint(tmp_path / "sharded", seed=3, shards=3)


def test_sharded_equals_single(tmp_path, sharded):
    single = write_tiny_checkpoint(tmp_path / "single", seed=3)
    ids = torch.randint(0, 259, (1, 21))
    a = OffloadedNemotron.from_pretrained(single, device="cpu")(ids)
    b = OffloadedNemotron.from_pretrained(sharded, device="cpu")(ids)
    assert torch.equal(a, b)
    ckpt = Checkpoint(sharded)
    assert set(ckpt.tensors) == set(expected_tensors(ckpt.config))
    assert len({i.shard for i in ckpt.tensors.values()}) == 3


def test_real_tensor_names(tiny_checkpoint):
    names = set(Checkpoint(tiny_checkpoint).tensors)
    assert "backbone.layers.1.mixer.experts.31.up_proj.weight" in names
    assert "backbone.layers.1.mixer.gate.e_score_correction_bias" in names
    assert "backbone.layers.0.mixer.A_log" in names and "lm_head.weight" in names


def test_missing_shard(sharded):
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing shard.*model-00002-of-00003"):
        Checkpoint(sharded)


def test_truncated_shard(sharded):
    path = sharded / "model-00003-of-00003.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(sharded)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(sharded)


def test_index_escaping_folder(sharded, tmp_path):
    index = json.loads((sharded / INDEX_NAME).read_text())
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(sharded / "model-00001-of-00003.safetensors", outside)
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    (sharded / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        Checkpoint(sharded)
    index["weight_map"][first] = str(outside)
    (sharded / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        Checkpoint(sharded)


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_wrong_shape_and_dtype_listed_together(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "c")

    def edit(t):
        t["backbone.layers.1.mixer.experts.3.up_proj.weight"] = torch.zeros(5, 5)
        t["backbone.layers.0.mixer.D"] = torch.zeros(8, dtype=torch.int32)
        t["backbone.extra.weight"] = torch.zeros(2)
        t["mtp.layers.0.enorm.weight"] = torch.zeros(2)  # MTP tensors are allowed and ignored
        del t["backbone.layers.3.mixer.q_proj.weight"]

    _rewrite(folder, edit)
    with pytest.raises(CheckpointError) as info:
        OffloadedNemotron.from_pretrained(folder, device="cpu")
    text = str(info.value)
    assert "experts.3.up_proj.weight: [5, 5] != expected [48, 32]" in text
    assert "backbone.layers.0.mixer.D: I32" in text
    assert "backbone.extra.weight" in text and "mtp." not in text
    assert "1 missing" in text and "backbone.layers.3.mixer.q_proj.weight" in text


def test_config_weights_mismatch(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "c")
    raw = json.loads((folder / "config.json").read_text())
    raw["n_routed_experts"] = 40
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as info:
        OffloadedNemotron.from_pretrained(folder, device="cpu")
    text = str(info.value)
    assert "64 missing tensor(s)" in text and "experts.39.down_proj.weight" in text
    assert "backbone.layers.1.mixer.gate.weight: [32, 64] != expected [40, 64]" in text


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        Checkpoint(tmp_path / "nope")
    write_tiny_checkpoint(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Checkpoint(tmp_path / "c")


def test_router_bias_stays_fp32_in_bf16(tiny_checkpoint):
    model = OffloadedNemotron.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.bfloat16)
    mixer = model.model.moe_mixers[0]
    assert mixer.gate.e_score_correction_bias.dtype == torch.float32
    assert mixer.experts.up_proj.dtype == torch.bfloat16
    logits = model(torch.randint(0, 259, (1, 9)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_progress_bar_when_asked(tiny_checkpoint, capsys):
    OffloadedNemotron.from_pretrained(tiny_checkpoint, device="cpu", progress=True)
    assert "loading weights" in capsys.readouterr().err
    OffloadedNemotron.from_pretrained(tiny_checkpoint, device="cpu")  # small checkpoint: no bar by default
    assert "loading weights" not in capsys.readouterr().err
