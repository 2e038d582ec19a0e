"""Usage errors and Ctrl-C end a command with one line on stderr, not a usage block or a traceback."""

from __future__ import annotations

import pytest

from residency import cli


@pytest.mark.parametrize("argv, names", [
    (["plan", "--gpu", "rtx4090", "--context", "abc"], "--context"),
    (["plan", "--expert-dtype", "int3"], "--expert-dtype"),
    (["no-such-command"], "no-such-command"),
    (["generate", "--max-new-tokens"], "--max-new-tokens"),
])
def test_usage_errors_are_one_line_with_exit_status_2(argv, names, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert names in err and "error:" in err and "--help" in err


def test_ctrl_c_ends_with_one_line_and_status_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser()
    args = parser.parse_args(["gpus"])
    monkeypatch.setattr(args, "func", interrupted)
    monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {"parse_args": lambda self, argv: args})())
    assert cli.main(["gpus"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "residency gpus: interrupted"
