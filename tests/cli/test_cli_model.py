"""``residency demo`` and ``residency generate`` end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from residency.cli import main
from residency.model.tokenizer import BYTE_TOKENIZER_FILE


def test_demo_prints_tokens_and_rate(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path / "tiny"), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "generated token ids: [" in out and "tokens/s" in out
    assert (tmp_path / "tiny" / "config.json").is_file()
    # the offloaded half: profile, a small budget, the plan line, telemetry, predicted beside measured
    assert "== offloaded: profiled 3 prompts, budget" in out
    assert "residency: cpu device, budget" in out and "predicted hit rate" in out
    assert out.count("tokens/s") == 2
    assert "experts: " in out and " hits / " in out and " misses (" in out
    assert "decode hit rate: measured " in out and ", predicted by the plan " in out
    assert "same tokens as the resident run: yes" in out


def test_generate_offloaded_prints_the_plan_and_telemetry(tiny_checkpoint, capsys):
    assert main(["generate", "--model", str(tiny_checkpoint), "--ids", "1,40,41", "--max-new-tokens", "6",
                 "--temperature", "0", "--vram-budget", "16MiB", "--no-prefetch"]) == 0
    out = capsys.readouterr().out
    assert "residency: cpu device, budget 16.00 MiB:" in out
    assert "6 new tokens" in out
    telemetry = [line for line in out.splitlines() if line.startswith("experts: ")]
    assert len(telemetry) == 1 and "prefetch 0/0 used" in telemetry[0] and "device " in telemetry[0]


def test_generate_offload_flags_context_chunk_and_embeddings(tiny_checkpoint, capsys):
    base = ["generate", "--model", str(tiny_checkpoint), "--ids", "1,40,41", "--max-new-tokens", "4",
            "--temperature", "0", "--vram-budget", "16MiB"]
    assert main([*base, "--context", "512", "--prefill-chunk", "2", "--embeddings", "device"]) == 0
    out = capsys.readouterr().out
    assert "4 new tokens" in out and "in host memory" not in out.splitlines()[0]
    # a budget too small names the flags that change what it must hold, in one line
    assert main([*base[:-1], "1MiB", "--context", "512"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "for 512 tokens" in err
    assert "--vram-budget of at least" in err and "--context / --prefill-chunk" in err and "context=" not in err
    assert main([*base, "--context", "0"]) == 2
    assert capsys.readouterr().err.strip() == "residency generate: error: --context must be a positive number of " \
        "tokens, got 0"


def test_generate_from_ids_and_bad_folder(tiny_checkpoint, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_checkpoint), "--ids", "1,40,41", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert "4 new tokens" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "not a folder" in capsys.readouterr().err


def one_line_error(capsys, command: str) -> str:
    """The captured stderr, checked to be one ``residency COMMAND: error: ...`` line without a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith(f"residency {command}: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def no_tokenizer_checkpoint(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bare") / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / BYTE_TOKENIZER_FILE).unlink()
    return folder


def edited_checkpoint(tiny_checkpoint, tmp_path, edit) -> Path:
    """A copy of the tiny checkpoint whose config.json went through ``edit(raw)``."""
    folder = tmp_path / "edited"
    shutil.copytree(tiny_checkpoint, folder)
    raw = json.loads((folder / "config.json").read_text())
    edit(raw)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


GENERATE_ERRORS = [
    (["--ids", "1,999999"], "--ids: token id 999999 at position 1 is outside the vocabulary"),
    (["--ids", "-4"], "outside the vocabulary"),
    (["--ids", "a,b"], "--ids: 'a' is not a whole number; pass comma-separated token ids"),
    (["--ids", ""], "--ids is empty; pass comma-separated token ids"),
    (["--ids", " , "], "--ids is empty"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--top-p", "0"], "top_p must lie in (0, 1]"),
    (["--top-p", "1.5"], "top_p must lie in (0, 1]"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a whole number >= 1, got 0"),
    (["--max-new-tokens", "-3"], "max_new_tokens must be a whole number >= 1, got -3"),
    (["--seed", str(2**70)], "seed must be an integer that fits in 64 bits"),
    (["--device", "mps"], "unsupported device 'mps'; residency runs on 'cpu', 'cuda'"),
    (["--vram-budget", "24"], "vram_budget '24' is a bare number"),
    (["--vram-budget", "1KiB"], "cannot hold what runs besides expert slots"),
]


@pytest.mark.parametrize("extra, message", GENERATE_ERRORS)
def test_generate_input_errors(tiny_checkpoint, capsys, extra, message):
    ids = [] if "--ids" in extra else ["--ids", "1,40"]
    assert main(["generate", "--model", str(tiny_checkpoint), *ids, *extra]) == 2
    assert message in one_line_error(capsys, "generate")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["generate", "profile"])
def test_cuda_without_cuda(tiny_checkpoint, tmp_path, capsys, command):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"input_ids": [1, 2]}\n')
    args = (["generate", "--model", str(tiny_checkpoint), "--ids", "1,40"] if command == "generate" else
            ["profile", "--model", str(tiny_checkpoint), "--prompts", str(prompts), "--out", str(tmp_path / "o")])
    assert main([*args, "--device", "cuda"]) == 2
    err = one_line_error(capsys, command)
    assert "device 'cuda' requested but CUDA is not available" in err and "use device 'cpu'" in err


def test_prompt_without_tokenizer(no_tokenizer_checkpoint, capsys):
    assert main(["generate", "--model", str(no_tokenizer_checkpoint), "--prompt", "hello"]) == 2
    err = one_line_error(capsys, "generate")
    assert "--prompt needs a tokenizer" in err and "has no tokenizer" in err
    assert "pass token ids with --ids, or add the model's tokenizer.json to the folder" in err
    assert main(["generate", "--model", str(no_tokenizer_checkpoint), "--ids", "1,40", "--max-new-tokens", "2"]) == 0


def test_config_errors_on_the_command_line(tiny_checkpoint, tmp_path, capsys):
    folder = edited_checkpoint(tiny_checkpoint, tmp_path, lambda raw: raw.update(some_new_field=1))
    assert main(["generate", "--model", str(folder), "--ids", "1"]) == 2
    err = one_line_error(capsys, "generate")
    assert "['some_new_field'] are not understood by this version of residency" in err
    assert "strict" not in err  # the command line has no such option

    folder = edited_checkpoint(tiny_checkpoint, tmp_path / "b", lambda raw: raw.pop("n_routed_experts"))
    assert main(["generate", "--model", str(folder), "--ids", "1"]) == 2
    assert "missing field(s) ['n_routed_experts']" in one_line_error(capsys, "generate")


def test_demo_errors(tmp_path, capsys):
    assert main(["demo", "--max-new-tokens", "0"]) == 2
    assert "max_new_tokens must be a whole number >= 1" in one_line_error(capsys, "demo")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--dir", str(blocker / "tiny")]) == 2
    assert "cannot write the tiny checkpoint there" in one_line_error(capsys, "demo")


def test_python_dash_m(tmp_path):
    run = [sys.executable, "-m", "residency"]
    done = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "generate" in done.stdout
    done = subprocess.run([*run, "generate", "--model", str(tmp_path), "--ids", "1", "--device", "mps"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("residency generate: error: unsupported device 'mps'")
