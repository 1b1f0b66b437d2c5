"""Assemble docs/findings.md from the finished sweeps of the paper's findings.

For every spec in recipes/sweeps/ (sorted by file name) it writes the spec's title, the command
that reproduces it, and the sweep's table (mean ± sample std over seeds, with n), read from
<out>/table.csv. The hand-written 'what the numbers show' paragraph of each finding lives in
docs/findings.md between ``<!-- notes:NAME -->`` and ``<!-- /notes:NAME -->`` and is kept
as it is when the file is rebuilt; a sweep that has not run yet is listed with its command.

    python benchmarks/findings.py                 # after the sweeps, from the repository root
    python benchmarks/findings.py --check         # exit 1 when a sweep has not finished
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

from kdtool.sweep import METRICS, TABLE_CSV, load_spec

REPO = Path(__file__).resolve().parents[1]
NOTES = re.compile(r"<!-- notes:(?P<name>[\w.-]+) -->\n(?P<text>.*?)<!-- /notes:(?P=name) -->", re.S)
PENDING = "_Not written yet: run the sweep, read the table, then say what it shows and what it does not._\n"
HEADER = """# The paper's findings, measured on the digits

Each table comes from one command (a sweep spec in `recipes/sweeps/`): scikit-learn's digits at
16x16, a resnet14 teacher trained once on the full training set with plain cross-entropy (shared
by every sweep, in `runs/findings/teacher`), resnet8 students, about 180 optimizer steps each.
Figures are val top-1 (%) on the 360 held-out digits, mean ± sample standard deviation over the
seeds (n per row); each teacher is one run, so its top-1 has no spread. Regenerate with
`python benchmarks/findings.py` after the sweeps; the paragraphs are written by hand.
"""


def read_table(sweep_dir: Path) -> list[dict] | None:
    path = sweep_dir / TABLE_CSV
    if not path.is_file():
        return None
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _cell(entry: dict, metric: str) -> str:
    mean, std = entry.get(f"{metric}_mean"), entry.get(f"{metric}_std")
    if not mean:
        return "-"
    if metric.startswith("teacher_"):  # one teacher per setup: its figure, without a spread
        return f"{float(mean):.2f}"
    return f"{float(mean):.2f} ± {float(std):.2f}"


def markdown_table(table: list[dict]) -> str:
    """The sweep's table.csv as a markdown table."""
    keys = [k for k in table[0] if k != "n" and not k.endswith(("_mean", "_std"))]
    header = [*keys, "n", *METRICS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        lines.append("| " + " | ".join([*(entry[k] for k in keys), entry["n"], *(_cell(entry, m) for m in METRICS)]) + " |")
    return "\n".join(lines) + "\n"


def section(spec_path: Path, notes: dict[str, str]) -> tuple[str, bool]:
    """One finding's markdown, and whether its sweep has finished."""
    spec, name = load_spec(spec_path), spec_path.stem
    table = read_table(Path(spec.out))
    shown = spec_path.relative_to(REPO) if spec_path.is_relative_to(REPO) else spec_path
    command = f"kdtool sweep {shown}"
    parts = [f"## {spec.title or name}\n", f"```bash\n{command}\n```\n"]
    if table is None:
        parts.append(f"Not run yet (no `{spec.out}/{TABLE_CSV}`).\n")
    else:
        seeds = sorted({entry["n"] for entry in table})
        parts.append(f"Seeds per row: {', '.join(seeds)}. Table: `{spec.out}/{TABLE_CSV}`.\n")
        parts.append(markdown_table(table))
    parts.append(f"<!-- notes:{name} -->\n{notes.get(name, PENDING)}<!-- /notes:{name} -->\n")
    return "\n".join(parts), table is not None


def build(specs_dir: Path, doc: Path) -> tuple[str, list[str]]:
    """The new findings.md text, and the names of the specs whose sweeps have not finished."""
    notes = {m["name"]: m["text"] for m in NOTES.finditer(doc.read_text())} if doc.is_file() else {}
    sections, missing = [], []
    for spec_path in sorted(specs_dir.glob("*.yaml")):
        text, done = section(spec_path.resolve(), notes)
        sections.append(text)
        if not done:
            missing.append(spec_path.stem)
    return "\n".join([HEADER, *sections]), missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", type=Path, default=REPO / "recipes" / "sweeps")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "findings.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when a sweep has not finished")
    args = parser.parse_args()
    text, missing = build(args.specs, args.doc)
    args.doc.write_text(text)
    print(f"wrote {args.doc}" + (f"; not run yet: {', '.join(missing)}" if missing else ""))
    return 1 if args.check and missing else 0


if __name__ == "__main__":
    sys.exit(main())
