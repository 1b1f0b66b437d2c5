"""Recipe fuzz soak: the CI fuzz's cases (tests/reliability/test_recipe_fuzz.py), 10,000 by default,
counting what goes wrong instead of stopping at the first failure.

    python benchmarks/recipe_fuzz_soak.py [--examples 10000] [--seed 0]

Prints the number of cases, of tracebacks, of wrong exit codes, of errors not on one line and of
errors not naming the culprit (target: 0 each), and the first example of each. Exit 1 if any.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reliability"))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from test_recipe_fuzz import cases, outcome  # noqa: E402

KINDS = {"traceback": "tracebacks", "exit code": "wrong exit codes", "not one error line": "errors not on one line",
         "culprit": "errors not naming the culprit"}


def soak(examples: int, random_seed: int) -> tuple[int, collections.Counter, dict]:
    """Run `examples` generated cases; return (cases run, failures per kind, first failure per kind)."""
    failures, first, count = collections.Counter(), {}, [0]

    @seed(random_seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(cases)
    def run(case):
        count[0] += 1
        result = outcome(case)
        if result != "ok":
            kind = next(k for k in KINDS if result.startswith(k))
            failures[kind] += 1
            first.setdefault(kind, (case, result))

    run()
    return count[0], failures, first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    count, failures, first = soak(args.examples, args.seed)
    print(f"recipe fuzz soak: {count} cases in {time.perf_counter() - start:.0f} s (seed {args.seed})")
    for kind, label in KINDS.items():
        print(f"  {label}: {failures[kind]}")
    for kind, (case, result) in first.items():
        print(f"first {KINDS[kind]}: {result}\n  overrides={case.overrides}\n  text={case.text[:300]!r}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
