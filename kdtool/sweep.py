"""Sweeps: a grid of recipe overrides x seeds, distilled from one shared teacher and tabulated.

The teacher is trained once into ``<sweep>/teacher`` (unless the recipe names teacher weights)
and every cell's recipe points ``teacher.weights`` at it, so the grid may not vary the teacher or
the data split. Each cell is a run directory under the sweep directory, named from its overrides;
a sweep that is run again skips finished cells and resumes an unfinished one.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import set_seed
from tqdm.auto import tqdm

from kdtool.data import build_datasets
from kdtool.errors import KdtoolError
from kdtool.io import write_text_atomic
from kdtool.models import build_model
from kdtool.recipe import Recipe, RecipeError, load_recipe, parse_override, save_recipe
from kdtool.rundir import SUMMARY_FILE, is_finished, run_lock
from kdtool.train import build_accelerator, distill, train_teacher

RESULTS_FILE = "results.csv"
TABLE_MD = "table.md"
TABLE_CSV = "table.csv"
PLOT_FILE = "plot.png"
METRICS = {"student_val_top1": "student top-1 (%)", "student_val_teacher_agreement": "teacher agreement (%)"}
# The shared teacher fixes these: a grid over them would compare cells against the wrong teacher.
_FIXED_KEYS = ("teacher", "data.split_seed", "seed")


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: a combination of grid values and a seed."""

    values: tuple[tuple[str, object], ...]  # (key, value) in grid order
    seed: int

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={json.dumps(value)}" for key, value in self.values] + [f"seed={self.seed}"]

    @property
    def name(self) -> str:
        shown = [f"{key}={_show(value)}" for key, value in self.values] + [f"seed={self.seed}"]
        return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(shown))


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def parse_grid(specs) -> dict[str, list]:
    """``["method.name=kd,ccd", "augment.jda.p=0,0.3"]`` -> ``{key: [values typed as YAML]}``."""
    grid: dict[str, list] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        if not sep or not key or not raw:
            raise KdtoolError(f"--grid {spec!r}: expected key.path=value1,value2,...")
        if key in grid:
            raise KdtoolError(f"--grid {key}: given twice")
        grid[key] = [parse_override(f"{key}={text}")[1] for text in raw.split(",")]
    return grid


def check_grid(recipe_path: Path, grid: dict[str, list], overrides=()) -> None:
    """Refuse keys the shared teacher fixes, and values the recipe schema rejects."""
    if not grid:
        raise KdtoolError("a sweep needs at least one --grid key")
    for key, values in grid.items():
        if any(key == fixed or key.startswith(fixed + ".") for fixed in _FIXED_KEYS):
            raise KdtoolError(f"--grid {key}: the sweep shares one teacher and data split, so it cannot vary "
                              f"{', '.join(_FIXED_KEYS)} (use --seeds for seeds, --set for fixed values)")
        for value in values:
            try:
                load_recipe(recipe_path, [*overrides, f"{key}={json.dumps(value)}"])
            except RecipeError as exc:
                raise KdtoolError(f"--grid {key}: {exc}") from None


def sweep_cells(grid: dict[str, list], seeds: int, base_seed: int) -> list[Cell]:
    """Every combination of grid values, each with seeds base_seed, base_seed + 1, ..."""
    combos = itertools.product(*[[(key, value) for value in values] for key, values in grid.items()])
    return [Cell(combo, base_seed + i) for combo in combos for i in range(seeds)]


def train_shared_teacher(recipe: Recipe, sweep_dir: Path, progress: bool) -> Path:
    """Train (or resume, or reuse) the sweep's teacher in ``sweep_dir/teacher``; its best checkpoint."""
    teacher_dir = sweep_dir / "teacher"
    datasets = build_datasets(recipe.data)
    set_seed(recipe.seed)  # the same initialisation as a single distill run of this recipe
    teacher = build_model(recipe.teacher.name, datasets.info.num_classes)
    train_teacher(recipe, teacher, datasets, teacher_dir, build_accelerator(recipe.runtime),
                  resume=(teacher_dir / "last").exists(), progress=progress)
    return (teacher_dir / "best").absolute()


def _check_same_teacher_setup(recipe: Recipe, sweep_dir: Path) -> None:
    saved = sweep_dir / "recipe.yaml"
    if saved.exists():
        before = load_recipe(saved).model_dump()
        for section in ("seed", "data", "teacher"):
            if before[section] != recipe.model_dump()[section]:
                raise KdtoolError(f"sweep directory {sweep_dir} was started with a different {section!r}; "
                                  "its teacher does not fit this recipe (use another --out)")
    save_recipe(recipe, saved)


def run_cell(recipe: Recipe, run_dir: Path, progress: bool) -> tuple[dict, str]:
    """Distil one cell: skip it when finished, resume it when started. (summary, what happened)."""
    summary_path = run_dir / SUMMARY_FILE
    if summary_path.exists():
        return json.loads(summary_path.read_text()), "done before"
    resume = (run_dir / "last").exists()
    summary = distill(recipe, run_dir, resume=resume, overwrite=not resume, progress=progress)
    return summary, "resumed" if resume else "trained"


def run_sweep(recipe_path, grid: dict[str, list], seeds: int, overrides=(), out: Path | None = None,
              progress: bool = True) -> list[dict]:
    """Run every grid combination x seeds over one teacher; write results, tables and plot.

    Returns one row per cell: the grid values, the seed, the student's best metrics, the run dir.
    """
    if seeds < 1:
        raise KdtoolError(f"--seeds must be >= 1, got {seeds}")
    base = load_recipe(recipe_path, overrides)
    check_grid(recipe_path, grid, overrides)
    sweep_dir = Path(out) if out is not None else Path("runs") / f"{base.name}-sweep"
    cells = sweep_cells(grid, seeds, base.seed)
    rows = []
    with run_lock(sweep_dir):
        _check_same_teacher_setup(base, sweep_dir)
        teacher = base.teacher.weights or str(train_shared_teacher(base, sweep_dir, progress))
        bar = tqdm(total=len(cells), desc="sweep", unit="cell", dynamic_ncols=True, disable=not progress)
        for done, cell in enumerate(cells, 1):
            recipe = load_recipe(recipe_path, [*overrides, *cell.overrides, f"teacher.weights={json.dumps(teacher)}"])
            summary, what = run_cell(recipe, sweep_dir / cell.name, progress)
            student = summary.get("student", {})
            rows.append({**dict(cell.values), "seed": cell.seed,
                         **{metric: student.get(metric.removeprefix("student_")) for metric in METRICS},
                         "run_dir": str(sweep_dir / cell.name)})
            shown = ", ".join(f"{label}={_fmt(rows[-1][m])}" for m, label in METRICS.items())
            bar.update()
            tqdm.write(f"[{done}/{len(cells)}] {cell.name}: {shown} ({what})")
        bar.close()
        write_reports(rows, list(grid), sweep_dir)
    return rows


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def summarise(rows: list[dict], keys=None) -> list[dict]:
    """Per grid combination: n and mean/std (sample std; 0 for one seed) of each metric."""
    if keys is None:
        keys = [k for k in rows[0] if k not in ("seed", "run_dir", *METRICS)] if rows else []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    table = []
    for combo, members in groups.items():
        entry = {**dict(zip(keys, combo)), "n": len(members)}
        for metric in METRICS:
            values = [m[metric] for m in members if m[metric] is not None]
            entry[f"{metric}_mean"] = statistics.fmean(values) if values else None
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        table.append(entry)
    return table


def write_reports(rows: list[dict], keys: list[str], sweep_dir: Path) -> None:
    """results.csv (per cell), table.csv and table.md (per combination), plot.png."""
    table = summarise(rows, keys)
    _write_csv(sweep_dir / RESULTS_FILE, rows)
    _write_csv(sweep_dir / TABLE_CSV, table)
    header = [*keys, "n", *METRICS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        cells = [_show(entry[k]) for k in keys] + [str(entry["n"])]
        cells += [f"{_fmt(entry[m + '_mean'])} ± {_fmt(entry[m + '_std'])}" for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    write_text_atomic(sweep_dir / TABLE_MD, "\n".join(lines) + "\n")
    plot_table(table, keys, sweep_dir / PLOT_FILE)


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_table(table: list[dict], keys: list[str], path: Path) -> None:
    """Mean student top-1 with std error bars: a line over the first numeric grid key per
    combination of the others, or one point per combination when no key is numeric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std = "student_val_top1_mean", "student_val_top1_std"
    numeric = [k for k in keys if all(_is_number(e[k]) for e in table) and len({e[k] for e in table}) > 1]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if numeric:
        x_key = numeric[0]
        others = [k for k in keys if k != x_key]
        lines: dict[tuple, list[dict]] = {}
        for entry in table:
            lines.setdefault(tuple(entry[k] for k in others), []).append(entry)
        for combo, entries in lines.items():
            entries.sort(key=lambda e: e[x_key])
            label = ", ".join(f"{k}={_show(v)}" for k, v in zip(others, combo)) or None
            ax.errorbar([e[x_key] for e in entries], [e[mean] for e in entries],
                        yerr=[e[std] for e in entries], marker="o", capsize=3, label=label)
        ax.set_xlabel(x_key)
        if others:
            ax.legend(fontsize=8)
    else:
        labels = [", ".join(f"{k}={_show(e[k])}" for k in keys) for e in table]
        ax.errorbar(range(len(table)), [e[mean] for e in table], yerr=[e[std] for e in table],
                    fmt="o", capsize=3)
        ax.set_xticks(range(len(table)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("student val top-1 (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
