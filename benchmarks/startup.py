"""How long the CLI takes to answer without doing work: `--help`, `--version` and a few
subcommands' help, each run as a fresh process, the median of `--repeats` runs per round and
the rounds alternating the commands' order (docs/performance.md, "Start-up"). Usage:

    .venv/bin/python benchmarks/startup.py --rounds 2 --json runs/bench/startup.json

`--source DIR` times another checkout's package (e.g. a git worktree of an older commit) with
this environment's packages.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ("--help", "--version", "data --help", "train --help", "data check --help")


def seconds(args: str, source: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "retinanet_xla", *args.split()], cwd=source, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {command: [] for command in COMMANDS}
    for round_ in range(args.rounds):
        for command in COMMANDS if round_ % 2 == 0 else reversed(COMMANDS):
            results[command].append(round(seconds(command, args.source, args.repeats), 3))
    for command, values in results.items():
        print(f"{command}: " + ", ".join(f"{value:.2f}" for value in values) + " s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
