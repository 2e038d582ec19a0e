"""``residency quantize``: writes loadable quantized checkpoints; bad requests end with one line and exit status 2."""

from __future__ import annotations

import json

import pytest
import torch

from residency import OffloadedNemotron
from residency.cli import main
from residency.model.checkpoint import Checkpoint
from residency.testing import write_tiny_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # tiny tensors on a shared 2-core machine: intra-op threads only add barrier waits
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("cli-q") / "f32", seed=4)


@pytest.mark.parametrize("argv,algo", [
    (["--format", "nvfp4"], "ModelOpt NVFP4"),
    (["--format", "nvfp4", "--dense", "fp8"], "ModelOpt MIXED_PRECISION"),
    (["--format", "fp8", "--dense", "same"], "ModelOpt FP8"),
    (["--format", "w4a16", "--group-size", "16", "--asymmetric"], "compressed-tensors"),
    (["--format", "w4a16", "--group-size", "0", "--dense", "same"], "compressed-tensors"),
])
def test_quantize_writes_a_checkpoint_that_loads(source, tmp_path, capsys, argv, algo):
    out = tmp_path / "q"
    assert main(["quantize", str(source), str(out), *argv]) == 0
    printed = capsys.readouterr().out
    assert algo in printed and "MiB ->" in printed
    ckpt = Checkpoint(out)
    ckpt.validate()
    assert ckpt.quant is not None and ckpt.quant.describe().startswith(algo.split()[0])
    logits = OffloadedNemotron.from_pretrained(out, device="cpu")(torch.tensor([[1, 2, 3, 4]]))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("argv,message", [
    (["--format", "nvfp4", "--group-size", "64"], "apply to w4a16 only"),
    (["--format", "w4a16", "--dense", "fp8"], "cannot share one checkpoint"),
    (["--format", "fp8", "--dense", "w4a16"], "cannot share one checkpoint"),
    (["--format", "w4a16", "--group-size", "-4"], "negative"),
    (["--format", "nvfp4", "--shard-size", "12"], "--shard-size"),
])
def test_bad_requests_exit_2_with_one_line(source, tmp_path, capsys, argv, message):
    assert main(["quantize", str(source), str(tmp_path / "q"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("residency quantize: error:") and message in err and "\n" not in err
    assert not (tmp_path / "q").exists()


def test_quantized_input_and_missing_input(source, tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", str(source), str(q), "--format", "fp8"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(q), str(tmp_path / "q2"), "--format", "nvfp4"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nope"), str(tmp_path / "q3"), "--format", "nvfp4"]) == 2
    assert "not a folder" in capsys.readouterr().err
    raw = json.loads((q / "config.json").read_text())
    assert raw["quantization_config"]["quant_algo"] == "FP8"
