"""Start-up time of the command line: `kdtool --help` and `kdtool COMMAND --help`, against a bare
interpreter that imports Click, side by side in one run (fresh processes, median of --repeats).

Target: every --help under 0.5 s. `python -X importtime -c 'import kdtool.cli'` shows what is imported.

    python benchmarks/cli_startup.py --repeats 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = [[], ["distill"], ["run"], ["export"], ["bench"], ["sweep"], ["recipe", "check"]]


def median_seconds(argv: list[str], repeats: int) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    baseline = median_seconds([sys.executable, "-c", "import click"], args.repeats)
    print(f"python -c 'import click': {baseline:.3f} s (baseline)")
    worst = 0.0
    for command in COMMANDS:
        seconds = median_seconds([sys.executable, "-m", "kdtool.cli", *command, "--help"], args.repeats)
        worst = max(worst, seconds)
        print(f"kdtool {' '.join(command + ['--help']):<22} {seconds:.3f} s  ({seconds / baseline:.2f}x the baseline)")
    print(f"slowest --help: {worst:.3f} s (target < 0.5 s): {'met' if worst < 0.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
