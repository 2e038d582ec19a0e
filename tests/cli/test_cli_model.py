"""``residency demo`` and ``residency generate`` end to end."""

from __future__ import annotations

from residency.cli import main


def test_demo_prints_tokens_and_rate(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path / "tiny"), "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "generated token ids: [" in out and "tokens/s" in out
    assert (tmp_path / "tiny" / "config.json").is_file()


def test_generate_from_ids_and_bad_folder(tiny_checkpoint, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_checkpoint), "--ids", "1,40,41", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert "4 new tokens" in capsys.readouterr().out
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "not a folder" in capsys.readouterr().err
