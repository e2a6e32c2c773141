"""Run the real ``retinanet-xla`` entry point in-process and capture what a user would see."""

import sys
from dataclasses import dataclass


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(capsys, monkeypatch, *args: str) -> CliResult:
    from retinanet_xla.cli import main

    monkeypatch.setattr(sys, "argv", ["retinanet-xla", *map(str, args)])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)
