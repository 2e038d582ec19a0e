"""``residency profile`` and ``residency profile show`` end to end."""

from __future__ import annotations

import json

import pytest

from residency.cli import main
from residency.profiling.profile import Profile
from residency.profiling.trace import RoutingTrace


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"id": "a", "text": "def f(x): return x"}, {"id": "b", "prompt": "Once upon a time"},
             {"input_ids": [1, 50, 51, 52]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_profile_then_show(tiny_checkpoint, prompt_file, tmp_path, capsys):
    out, trace = tmp_path / "p.safetensors", tmp_path / "t.safetensors"
    code = main(["profile", "--model", str(tiny_checkpoint), "--prompts", str(prompt_file), "--out", str(out),
                 "--trace", str(trace), "--decode-tokens", "2"])
    assert code == 0
    text = capsys.readouterr().out
    assert "3 prompts" in text and "hottest experts" in text and "re-use of experts" in text
    profile = Profile.load(out)
    assert profile.prompt_names == ["a", "b", "prompts-3"]
    assert RoutingTrace.load(trace, profile.fingerprint).num_tokens == profile.tokens
    assert main(["profile", "show", str(out)]) == 0
    assert "mean effective experts" in capsys.readouterr().out
    assert main(["profile", "show", str(out), "--trace", str(trace), "--phase", "decode"]) == 0
    text = capsys.readouterr().out
    assert "(decode tokens only)" in text and "6 tokens (0 prefill, 6 decode)" in text and "median" in text


def test_compare(tiny_checkpoint, prompt_file, tmp_path, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["profile", "--model", str(tiny_checkpoint), "--prompts", str(prompt_file), "--out", str(a)]) == 0
    Profile.load(a).select([0]).save(b)
    capsys.readouterr()
    assert main(["profile", "compare", str(a), str(b), "--top-n", "6"]) == 0
    text = capsys.readouterr().out
    assert "top-6 experts by gate mass" in text and "mean Jaccard" in text
    assert main(["profile", "compare", str(a)]) == 2


def test_profile_errors(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    assert main(["profile", "--model", str(tiny_checkpoint), "--prompts", str(bad), "--out",
                 str(tmp_path / "p")]) == 2
    assert "one of the fields 'input_ids', 'text', 'prompt'" in capsys.readouterr().err
    assert main(["profile", "--model", str(tiny_checkpoint)]) == 2
    assert "missing --prompts, --out" in capsys.readouterr().err
    assert main(["profile", "shw", "x"]) == 2
    assert "unknown or incomplete action 'shw x'" in capsys.readouterr().err
    assert main(["profile", "show", str(tmp_path / "none.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("residency profile: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"id": "far", "input_ids": [1, 999999]}], "prompt 'far': token id 999999 at position 1 is outside the vocab"),
        ([{"id": "none", "input_ids": []}], "prompt 'none': no token ids"),
        ([{"id": "bad", "input_ids": ["a", "b"]}], "prompt 'bad': token ids must be"),
    ],
)
def test_bad_prompt_ids(tiny_checkpoint, tmp_path, capsys, lines, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert main(["profile", "--model", str(tiny_checkpoint), "--prompts", str(path), "--out",
                 str(tmp_path / "p")]) == 2
    err = one_line_error(capsys)
    assert f"{path}: {message}" in err
    assert not (tmp_path / "p").exists()


def test_text_prompts_without_tokenizer(tiny_checkpoint, prompt_file, tmp_path, capsys):
    import shutil

    from residency.model.tokenizer import BYTE_TOKENIZER_FILE

    bare = tmp_path / "bare"
    shutil.copytree(tiny_checkpoint, bare)
    (bare / BYTE_TOKENIZER_FILE).unlink()
    assert main(["profile", "--model", str(bare), "--prompts", str(prompt_file), "--out", str(tmp_path / "p")]) == 2
    err = one_line_error(capsys)
    assert "prompt 'a' is text, but" in err and "has no tokenizer" in err
    assert "'input_ids' in a JSONL prompt file" in err and "tokenizer.json" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "mps"], "unsupported device 'mps'; residency runs on 'cpu', 'cuda'"),
        (["--decode-tokens", "-1"], "--decode-tokens must be a whole number >= 0, got -1"),
        (["--co-activation", "-2"], "--co-activation must be a whole number >= 0"),
        (["--top", "-1"], "--top must be a whole number >= 0"),
    ],
)
def test_profile_option_errors(tiny_checkpoint, prompt_file, tmp_path, capsys, extra, message):
    assert main(["profile", "--model", str(tiny_checkpoint), "--prompts", str(prompt_file), "--out",
                 str(tmp_path / "p"), *extra]) == 2
    assert message in one_line_error(capsys)


def test_compare_top_n_out_of_range(tiny_checkpoint, prompt_file, tmp_path, capsys):
    a = tmp_path / "a.safetensors"
    assert main(["profile", "--model", str(tiny_checkpoint), "--prompts", str(prompt_file), "--out", str(a)]) == 0
    capsys.readouterr()
    assert main(["profile", "compare", str(a), str(a), "--top-n", "0"]) == 2
    assert "--top-n must be a whole number >= 1" in one_line_error(capsys)
    assert main(["profile", "compare", str(a), str(a), "--top-n", "33"]) == 2
    assert "--top-n 33 exceeds the 32 experts per layer" in one_line_error(capsys)
