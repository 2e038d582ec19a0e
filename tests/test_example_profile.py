"""The profiling example runs end to end on the tiny model."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "prompt_conditioned_experts.py"


def test_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--out", str(tmp_path), "--decode-tokens", "2"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "code vs prose" in out and "merged: 8 prompts" in out
    assert (tmp_path / "plots" / "coverage_code_vs_prose.png").is_file()
    assert (tmp_path / "code.safetensors").is_file() and (tmp_path / "code_trace.safetensors").is_file()
