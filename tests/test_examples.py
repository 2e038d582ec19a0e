"""The examples run end to end: quickstart (chat, stream, stats; offloaded), planning for target GPUs from
the config alone, and the prompt-conditioned-experts notebook executed with nbclient."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *argv])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert done.value.code == 0
    return capsys.readouterr().out


def test_quickstart(monkeypatch, capsys):
    pytest.importorskip("tokenizers")
    out = run_example("quickstart.py", ["--max-new-tokens", "8", "--device", "cpu", "--vram-budget", "16MiB"],
                      monkeypatch, capsys)
    lines = out.splitlines()
    assert lines[0].startswith("residency: cpu device, budget 16.00 MiB:")  # the plan line: experts offloaded
    assert lines[1].startswith("model: Nemotron-H: 8 layers")
    for start in ("reasoning: ", "answer: ", "usage: ", "streamed: ", "plain continuation: ", "last call: "):
        assert any(line.startswith(start) for line in lines), start
    assert "(8 tokens, finish: length)" in out or "finish: stop)" in out
    assert lines[-1].startswith("experts: ") and " hits / " in lines[-1]


def test_plan_for_target_gpu(monkeypatch, capsys):
    out = run_example("plan_for_target_gpu.py", [], monkeypatch, capsys)
    assert "model: Nemotron-H: 88 layers (40 Mamba, 8 attention, 40 MoE), 512 experts top-22" in out
    for target in ("Target: RTX 4090: 24.0 GiB", "Target: H100 SXM: 80.0 GiB", "Target: DGX Spark: 121.7 GiB"):
        assert target in out
    assert out.count("Device memory (") == 3 and "Unified memory: one copy of every expert" in out
    summary = out.split("Summary (cost-model predictions, uniform prior):")[1].splitlines()
    rows = {line.split("  ")[0].strip(): line for line in summary[3:] if line.strip()}
    assert set(rows) == {"RTX 4090", "H100 SXM", "DGX Spark"}
    assert "2751" in rows["RTX 4090"] and "13.4%" in rows["RTX 4090"]


def test_notebook_runs(tmp_path):
    pytest.importorskip("matplotlib")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(EXAMPLES / "prompt_conditioned_experts.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")  # stored without outputs
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()
    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
                     if out.output_type == "stream")
    assert "Nemotron-H: 8 layers" in text
    assert "== code prompts ==" in text and "== prose prompts ==" in text
    assert "code vs prose" in text and "merged: 8 prompts" in text
    assert "decoded tokens only:" in text and "saved " in text
    images = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type in ("display_data", "execute_result") and "image/png" in out.get("data", {})]
    assert images, "the coverage plot was not shown"
