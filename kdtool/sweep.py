"""Sweeps: a grid of recipe overrides x seeds, distilled from shared teachers and tabulated.

A grid axis is either a recipe key with its values (``augment.jda.p: [0, 0.3]``) or a named set of
variants, each a mapping of overrides (``method: {kd: {method.name: kd}, kd+jda: {...}}``), so
that keys which must change together (method and policy; data fraction, batch size and epochs)
change together. Cells are every combination of axis values x seeds.

Teachers are trained once per distinct teacher setup: the base recipe (its seed and its data,
whatever fraction a cell trains on) plus a cell's ``teacher.*`` overrides, into
``<teacher home>/teacher`` (no teacher overrides) or ``<teacher home>/teacher,<overrides>``.
The teacher home is the sweep directory unless a spec names another sweep directory, which lets
several sweeps share one teacher. A cell whose recipe names teacher weights uses them.

Before any training every cell's full recipe is resolved and checked (schema, models, method,
JDA policy, data, teacher weights), duplicates are refused and cell names are made unique. A
sweep directory carries kdtool's sweep marker; a sweep run again skips finished cells (refusing
one that was made with another recipe) and resumes an unfinished one.

A sweep spec (YAML) names the base recipe, fixed overrides, the grid, seeds and the output::

    title: KD alone vs KD + rotation vs KD + JDA     # optional, shown by benchmarks/findings.py
    recipe: ../quickstart.yaml                       # relative to the spec file
    out: runs/findings/a_rotation                    # relative to the working directory
    teacher_home: runs/findings/teacher              # optional: where the shared teacher lives
    seeds: 3
    executor: {name: ray, cpus_per_cell: 1}          # optional: cells as Ray tasks (kdtool.sweep_executors)
    set: {data.image_size: 16}
    grid:
      augmentation:
        none: {augment.jda.policy: null}
        jda: {augment.jda.policy: digits}
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import logging
import math
import re
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kdtool.augment import build_train_views
from kdtool.data import DataInfo
from kdtool.errors import KdtoolError, validation_message
from kdtool.io import write_text_atomic
from kdtool.losses import build_loss
from kdtool.preflight import check_data, check_model, check_views
from kdtool.recipe import (
    Recipe, RecipeError, dump_recipe, load_recipe, parse_override, read_yaml_file, save_recipe,
)
from kdtool.rundir import (
    BEST, LAST, RECIPE_FILE, SWEEP_KIND, check_run_target, claim, is_dangling, is_owned, run_lock,
)
from kdtool.sweep_executors import (
    EXECUTORS, FAILED, CellJob, ExecutorConfig, Outcome, TeacherJob, executor_config, finished_summary,
)
from kdtool.tables import markdown_table

log = logging.getLogger(__name__)
RESULTS_FILE = "results.csv"
TABLE_MD = "table.md"
TABLE_CSV = "table.csv"
PLOT_FILE = "plot.png"
METRICS = {"student_val_top1": "student top-1 (%)", "student_val_teacher_agreement": "teacher agreement (%)",
           "teacher_val_top1": "teacher top-1 (%)"}
# Every cell must share these with its teacher (the teacher is trained on the base recipe's data,
# and agreement is measured on one validation set), so no grid axis may change them.
_FIXED_KEYS = ("seed", "data.name", "data.root", "data.split_seed", "data.val_fraction", "data.image_size")
_TEACHER_KEY, _TEACHER_WEIGHTS = "teacher", "teacher.weights"
_AXIS_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
MAX_SEEDS = 1000  # runs per combination (a sweep spec's seeds and --seeds)
MAX_CELLS = 10_000  # runs in a sweep, planned and checked before any trains
_MAX_NAME = 120  # characters of a readable cell name before it is shortened (file names stop at 255 bytes)


@dataclass(frozen=True)
class Choice:
    """One value of a grid axis: the label the tables show and the overrides it applies."""

    label: Any
    overrides: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: a choice on every axis, and a seed."""

    choices: tuple[tuple[str, Choice], ...]  # (axis, choice) in grid order
    seed: int

    @property
    def values(self) -> dict:
        return {axis: choice.label for axis, choice in self.choices}

    @property
    def overrides(self) -> list[str]:
        return [override(k, v) for _, choice in self.choices for k, v in choice.overrides] + [f"seed={self.seed}"]

    @property
    def teacher_overrides(self) -> list[str]:
        """The overrides that change how this cell's teacher is trained."""
        return [override(k, v) for _, choice in self.choices for k, v in choice.overrides
                if _under(k, _TEACHER_KEY) and not _under(k, _TEACHER_WEIGHTS)]

    @property
    def name(self) -> str:
        return safe_name([f"{axis}={_show(choice.label)}" for axis, choice in self.choices] + [f"seed={self.seed}"])


def override(key: str, value) -> str:
    """``key=value`` with the value written so that parse_override reads it back unchanged."""
    return f"{key}={json.dumps(value)}"


def _under(key: str, section: str) -> bool:
    return key == section or key.startswith(section + ".")


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def safe_name(parts: list[str]) -> str:
    """A directory name for `parts`: readable when it can be, unique always.

    Characters outside [A-Za-z0-9._=,+-] become "_"; a name that changed, or is too long, gets "~"
    and a hash of the original, so two different originals never share a name ("~" never survives
    the substitution, so a hashed name cannot equal a plain one).
    """
    raw = ",".join(parts)
    clean = re.sub(r"[^A-Za-z0-9._=,+-]", "_", raw)
    if clean == raw and len(raw) <= _MAX_NAME:
        return raw
    return f"{clean[:_MAX_NAME]}~{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


# ------------------------------------------------------------------ the grid
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


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def _axis_choices(axis: str, values) -> list[Choice]:
    """An axis's values as Choices: a list (of `axis`'s values) or a mapping label -> overrides."""
    if isinstance(values, Mapping):
        choices = []
        for label, overrides in values.items():
            if not isinstance(overrides, Mapping) or not overrides:
                raise KdtoolError(f"grid {axis}: {label!r} must map recipe keys to values, got {overrides!r}")
            choices.append(Choice(label, tuple(overrides.items())))
        return choices
    if not isinstance(values, (list, tuple)):
        raise KdtoolError(f"grid {axis}: expected a list of values or a mapping of named overrides")
    return [Choice(_label(value), ((axis, value),)) for value in values]


def _label(value):
    """A grid value as tables and names show it: itself when a scalar, else its canonical JSON text
    (mappings and lists are unhashable, and a table groups rows by their labels)."""
    return _canonical(value) if isinstance(value, (Mapping, list, tuple)) else value


def _check_axis(axis: str, choices: list[Choice]) -> None:
    """Refuse an empty axis, a value or a set of overrides given twice, and keys the teacher fixes."""
    if not choices:
        raise KdtoolError(f"grid {axis}: no values")
    labels, effects = {}, {}
    for choice in choices:
        for key, _ in choice.overrides:
            if not isinstance(key, str) or any(not part for part in key.split(".")):
                raise KdtoolError(f"grid {axis}: {key!r} is not a recipe key path")
            fixed = next((f for f in _FIXED_KEYS if _under(key, f) or _under(f, key)), None)
            if fixed:
                raise KdtoolError(f"grid {axis}: {key} cannot vary: every cell shares {fixed} with its teacher "
                                  f"and the others (use seeds for seeds, set for fixed values)")
        label, effect = _canonical(choice.label), _canonical(sorted(choice.overrides))
        if label in labels or effect in effects:
            twin = labels.get(label, effects.get(effect))
            raise KdtoolError(f"grid {axis}: {_show(choice.label)} and {_show(twin)} are the same value; "
                              f"give each value once")
        labels[label] = effects[effect] = choice.label


def normalise_grid(grid: Mapping) -> dict[str, list[Choice]]:
    """A grid (axis -> list of values, or axis -> {label: overrides}) as checked Choices per axis."""
    if not grid:
        raise KdtoolError("a sweep needs at least one grid axis (--grid KEY=V1,V2,...)")
    axes: dict[str, list[Choice]] = {}
    set_by: dict[str, str] = {}
    for axis, values in grid.items():
        if not isinstance(axis, str) or not _AXIS_NAME.match(axis):
            raise KdtoolError(f"grid axis {axis!r}: use letters, digits and ._+- only")
        axes[axis] = _axis_choices(axis, values)
        _check_axis(axis, axes[axis])
        for key in {key for choice in axes[axis] for key, _ in choice.overrides}:
            other = next((k for k in set_by if _under(key, k) or _under(k, key)), None)
            if other is not None:
                raise KdtoolError(f"grid: {key} is set by axis {axis} and {other} by axis {set_by[other]}; "
                                  f"one key, one axis")
            set_by[key] = axis
    return axes


def sweep_cells(grid: Mapping, seeds: int, base_seed: int) -> list[Cell]:
    """Every combination of the grid's values, each with seeds base_seed, base_seed + 1, ...
    (at most MAX_SEEDS seeds and MAX_CELLS cells)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS:
        raise KdtoolError(f"--seeds: runs per combination must be 1..{MAX_SEEDS}, got {seeds!r}")
    axes = normalise_grid(grid)
    count = math.prod(len(choices) for choices in axes.values()) * seeds
    if count > MAX_CELLS:
        raise KdtoolError(f"the sweep has {count} runs ({' x '.join(str(len(c)) for c in axes.values())} values x "
                          f"{seeds} seeds); at most {MAX_CELLS}")
    combos = itertools.product(*[[(axis, choice) for choice in choices] for axis, choices in axes.items()])
    cells = [Cell(combo, base_seed + i) for combo in combos for i in range(seeds)]
    seen: dict[str, Cell] = {}
    for cell in cells:  # names differing only in case would share a directory on macOS and Windows
        twin = seen.setdefault(cell.name.lower(), cell)
        if twin is not cell:
            raise KdtoolError(f"sweep cells {twin.name} and {cell.name} would share one directory; "
                              f"give grid values that differ by more than case")
    return cells


# ------------------------------------------------------------------ planning and checking
@dataclass
class SweepPlan:
    """What a sweep will do: every cell's resolved recipe, and the teachers to train first."""

    base: Recipe
    cells: list[Cell]
    recipes: list[Recipe]  # cell i's recipe, teacher.weights filled in
    teachers: dict[Path, Recipe]  # teacher directory -> the recipe its teacher is trained from


def _flat(node: Mapping, prefix: str) -> dict[str, Any]:
    """A nested mapping as {"a.b.c": leaf value}."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_ABSENT = object()  # a key one of two flattened mappings lacks


def teacher_dir_name(base: Recipe, teacher: Recipe) -> str:
    """The directory, in the teacher home, of the teacher `teacher` trains: "teacher" when it is the base
    recipe's, else named by the resolved settings (not the override texts) in which it differs."""
    def settings(recipe: Recipe) -> dict[str, Any]:
        return _flat(recipe.teacher.model_dump(mode="json", exclude={"weights"}), f"{_TEACHER_KEY}.")

    before = settings(base)
    changed = [override(key, value) for key, value in settings(teacher).items() if before.get(key, _ABSENT) != value]
    changed += [override(key, None) for key in before if key not in settings(teacher)]
    return "teacher" if not changed else safe_name(["teacher", *changed])


def plan_sweep(recipe_path, grid: Mapping, seeds: int, overrides, teacher_home: Path) -> SweepPlan:
    """Resolve every cell's recipe (one line naming the cell when one is invalid); train nothing.

    A cell whose teacher overrides change nothing about the resolved teacher shares the base teacher."""
    base = load_recipe(recipe_path, overrides)
    cells = sweep_cells(grid, seeds, base.seed)
    recipes, teachers = [], {}
    for cell in cells:
        try:
            weights = load_recipe(recipe_path, [*overrides, *cell.overrides]).teacher.weights
            if weights is None:
                teacher = load_recipe(recipe_path, [*overrides, *cell.teacher_overrides])
                directory = teacher_home / teacher_dir_name(base, teacher)
                teachers.setdefault(directory, teacher)
                weights = str((directory / BEST).absolute())
            recipes.append(load_recipe(recipe_path, [*overrides, *cell.overrides, override(_TEACHER_WEIGHTS, weights)]))
        except RecipeError as exc:
            raise KdtoolError(f"sweep cell {cell.name}: {exc}") from None
    return SweepPlan(base, cells, recipes, teachers)


def _parts_to_check(recipe: Recipe, planned: set[str], info: DataInfo) -> list[tuple[str, Any, Any]]:
    """(what, identity, check) for each part distill builds from `recipe` (kdtool.preflight) on the data
    `info` describes. A planned teacher (trained by the sweep) is tried without weights: its
    architecture at the input size is what can be wrong before it exists."""
    jda, method, smoothing, data = recipe.augment.jda, recipe.method, recipe.train.label_smoothing, recipe.data
    teacher_weights = None if recipe.teacher.weights in planned else recipe.teacher.weights
    return [
        ("student", [recipe.student.model_dump(), data.model_dump()],
         lambda: check_model("student", recipe.student.name, recipe.student.weights, info, new_head=True)),
        ("teacher", [recipe.teacher.name, teacher_weights, data.model_dump()],
         lambda: check_model("teacher", recipe.teacher.name, teacher_weights, info)),
        ("method", [method.model_dump(), smoothing], lambda: build_loss(method, smoothing)),
        ("views", [jda.model_dump(), recipe.teacher.augment.jda.model_dump()], lambda: check_views(recipe)),
    ]


def check_plan(plan: SweepPlan, sweep_dir: Optional[Path] = None) -> None:
    """Check, once per distinct part, what every cell needs before training: the data, both models run on a
    dummy batch of the cell's input size (kdtool.preflight), method, views, given teacher weights; the
    teachers' views; what killed runs left in the teachers' and (with `sweep_dir`) the cells' directories;
    and refuse two cells that resolve to the same recipe. One line names the cell or the teacher."""
    infos: dict[str, DataInfo] = {}  # per distinct data section
    done: set[str] = set()  # parts checked (models are tried, not kept)
    cell_of_recipe: dict[str, Cell] = {}
    planned = {str((directory / BEST).absolute()) for directory in plan.teachers}
    for directory, teacher in plan.teachers.items():
        check_leftovers(directory, "teacher")
        try:
            build_train_views(teacher.teacher.augment.jda, teacher.seed)
        except KdtoolError as exc:
            raise KdtoolError(f"sweep teacher {directory.name}: {exc}") from None
    for cell, recipe in zip(plan.cells, plan.recipes):
        if sweep_dir is not None:
            check_leftovers(Path(sweep_dir) / cell.name, "sweep cell")
        twin = cell_of_recipe.setdefault(dump_recipe(recipe), cell)
        if twin is not cell:
            raise KdtoolError(f"sweep cells {twin.name} and {cell.name} resolve to the same recipe "
                              f"(a grid value given twice?); give each value once")
        try:
            data_key = _canonical(recipe.data.model_dump())
            if data_key not in infos:
                infos[data_key] = check_data(recipe.data).info
            for what, identity, check in _parts_to_check(recipe, planned, infos[data_key]):
                key = f"{what}:{_canonical(identity)}"
                if key not in done:
                    check()
                    done.add(key)
        except KdtoolError as exc:
            raise KdtoolError(f"sweep cell {cell.name}: {exc}") from None


def check_leftovers(directory: Path, what: str) -> None:
    """Refuse, before anything trains, a cell's or teacher's directory whose checkpoints a killed run left
    broken (a dangling `last`/`best`, `best` without `last`), with advice a sweep can follow."""
    links = {which: Path(directory) / which for which in (LAST, BEST)}
    broken = [link for link in links.values() if is_dangling(link)]
    if not broken and links[BEST].exists() and not links[LAST].exists():
        broken = [links[LAST]]
    if broken:
        raise KdtoolError(f"{what} directory {directory}: {broken[0]} is missing or a broken link (a run killed while "
                          f"writing it?); remove {directory} to train that {what} again, or restore the checkpoint")


# ------------------------------------------------------------------ running
def _check_same_teacher_setup(recipe: Recipe, sweep_dir: Path) -> None:
    """Refuse a sweep directory whose teachers were trained from another seed, data or teacher."""
    saved = sweep_dir / RECIPE_FILE
    if saved.exists():
        before = load_recipe(saved).model_dump()
        for section in ("seed", "data", "teacher"):
            if before[section] != recipe.model_dump()[section]:
                raise KdtoolError(f"sweep directory {sweep_dir} was started with a different {section!r}; "
                                  "its teachers do not fit this recipe (use another --out or teacher home)")
    save_recipe(recipe, saved)


def _claim_sweep_dir(directory: Path) -> None:
    if not is_owned(directory, SWEEP_KIND):
        claim(directory, SWEEP_KIND)


@contextlib.contextmanager
def claimed_teacher_home(plan: SweepPlan, teacher_home: Path, *, shared: bool):
    """While the plan's teachers train: a `shared` teacher home (not the sweep directory) locked, marked
    and checked here (the sweep directory is the caller's)."""
    if not (plan.teachers and shared):
        yield
        return
    with run_lock(teacher_home):
        _claim_sweep_dir(teacher_home)
        _check_same_teacher_setup(plan.base, teacher_home)
        yield


def sweep_jobs(plan: SweepPlan, sweep_dir: Path) -> tuple[list[TeacherJob], list[CellJob]]:
    """The plan as executor jobs: its teachers, and its cells each naming the planned teacher it waits for."""
    teachers = [TeacherJob(directory, recipe) for directory, recipe in plan.teachers.items()]
    planned = {str((job.directory / BEST).absolute()): job.directory for job in teachers}
    cells = [CellJob(i, cell.name, recipe, sweep_dir / cell.name, planned.get(recipe.teacher.weights))
             for i, (cell, recipe) in enumerate(zip(plan.cells, plan.recipes))]
    return teachers, cells


def execute(plan: SweepPlan, sweep_dir: Path, executor: ExecutorConfig, progress: bool, keys: list[str]) -> list[dict]:
    """Run the plan's teachers and cells on `executor`; each cell, as it ends, is shown and goes into the
    reports (the cells finished so far, in grid order). The rows of every cell, in grid order."""
    teachers, cells = sweep_jobs(plan, sweep_dir)
    outcomes: dict[int, Outcome] = {}

    def report(outcome: Outcome) -> None:  # one line per finished cell: a log file gets no progress bar
        outcomes[outcome.index] = outcome
        name = cells[outcome.index].name
        if outcome.failed:
            log.warning("[%d/%d] %s: FAILED: %s", len(outcomes), len(cells), name, outcome.reason)
        else:
            shown = ", ".join(f"{label}={_fmt(_metric(outcome.result, m))}" for m, label in METRICS.items())
            log.info("[%d/%d] %s: %s (%s)", len(outcomes), len(cells), name, shown, outcome.what)
        rows = [_row(plan.cells[i], outcomes[i], cells[i].run_dir) for i in sorted(outcomes)]
        write_reports(rows, keys, sweep_dir)

    for job in cells:  # before anything runs: a stale cell of another sweep is bad input, not a failed cell
        finished_summary(job.recipe, job.run_dir)
    EXECUTORS[executor.name](teachers, cells, executor, progress, report)
    return [_row(cell, outcomes[i], job.run_dir) for i, (cell, job) in enumerate(zip(plan.cells, cells))]


def _metric(result: Optional[dict], metric: str):
    return (result or {}).get("student", {}).get(metric.removeprefix("student_"))


def _row(cell: Cell, outcome: Outcome, run_dir: Path) -> dict:
    return {**cell.values, "seed": cell.seed, **{metric: _metric(outcome.result, metric) for metric in METRICS},
            "status": FAILED if outcome.failed else "ok", "reason": outcome.reason, "run_dir": str(run_dir)}


def run_sweep(recipe_path, grid: Mapping, seeds: int, overrides=(), out: Optional[Path] = None,
              progress: bool = True, teacher_home: Optional[Path] = None,
              executor: Optional[ExecutorConfig] = None) -> list[dict]:
    """Run every grid combination x seeds; write results, tables and plot into the sweep directory.

    `grid` maps a recipe key to its values, or an axis name to ``{label: {key: value, ...}}``.
    Everything is checked before anything trains. `executor` says where cells run (default:
    serially in this process). Returns one row per cell: the axis values, the seed, the student's
    best metrics (and its teacher's top-1), ``status`` ("ok" or "failed") with the failure's
    one-line ``reason``, the run directory. A failed cell does not stop the others.
    """
    if seeds < 1:
        raise KdtoolError(f"--seeds must be >= 1, got {seeds}")
    executor = executor or ExecutorConfig()
    base = load_recipe(recipe_path, overrides)
    sweep_dir = Path(out) if out is not None else Path("runs") / f"{base.name}-sweep"
    teacher_home = Path(teacher_home) if teacher_home is not None else sweep_dir
    plan = plan_sweep(recipe_path, grid, seeds, overrides, teacher_home)
    check_plan(plan, sweep_dir)
    for directory in dict.fromkeys([sweep_dir, teacher_home]):
        check_run_target(directory, kind=SWEEP_KIND)
    with run_lock(sweep_dir):
        _claim_sweep_dir(sweep_dir)
        if teacher_home == sweep_dir:
            _check_same_teacher_setup(base, sweep_dir)
        else:
            save_recipe(base, sweep_dir / RECIPE_FILE)
        with claimed_teacher_home(plan, teacher_home, shared=teacher_home != sweep_dir):
            rows = execute(plan, sweep_dir, executor, progress, list(normalise_grid(grid)))
    return rows


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def summarise(rows: list[dict], keys=None) -> list[dict]:
    """Per grid combination: n (cells that finished), failed (cells that did not) and mean/std
    (sample std; 0 for one seed) of each metric over the finished cells."""
    if keys is None:
        keys = [k for k in rows[0] if k not in ("seed", "run_dir", "status", "reason", *METRICS)] if rows else []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    table = []
    for combo, members in groups.items():
        failed = sum(m.get("status") == FAILED for m in members)
        entry = {**dict(zip(keys, combo)), "n": len(members) - failed, "failed": failed}
        for metric in METRICS:
            values = [m[metric] for m in members if m.get(metric) is not None]
            entry[f"{metric}_mean"] = statistics.fmean(values) if values else None
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
        table.append(entry)
    return table


def write_reports(rows: list[dict], keys: list[str], sweep_dir: Path) -> None:
    """results.csv (per cell), table.csv and table.md (per combination, then each failed cell and why), plot.png."""
    table = summarise(rows, keys)
    _write_csv(sweep_dir / RESULTS_FILE, rows)
    _write_csv(sweep_dir / TABLE_CSV, table)
    cells = [[_show(entry[k]) for k in keys]
             + [f"{entry['n']} + {entry['failed']} failed" if entry["failed"] else str(entry["n"])]
             + [f"{_fmt(entry[m + '_mean'])} ± {_fmt(entry[m + '_std'])}" for m in METRICS] for entry in table]
    lines = [markdown_table([*keys, "n", *METRICS.values()], cells)]
    failed = [row for row in rows if row.get("status") == FAILED]
    if failed:
        lines += ["", "Failed cells:", ""] + [f"- {Path(row['run_dir']).name}: {row['reason']}" for row in failed]
    write_text_atomic(sweep_dir / TABLE_MD, "\n".join(lines) + "\n")
    plot_table([entry for entry in table if entry["student_val_top1_mean"] is not None], keys, sweep_dir / PLOT_FILE)


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


# ------------------------------------------------------------------ sweep spec files
class SweepSpec(BaseModel):
    """A sweep spec file: everything `kdtool sweep SPEC` runs, in one place."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field("", description="what the sweep asks, for reports")
    recipe: str = Field(..., min_length=1, description="base recipe, relative to the spec file")
    out: str = Field(..., min_length=1, description="sweep directory, relative to the working directory")
    teacher_home: Optional[str] = Field(None, min_length=1, description="sweep directory holding shared teachers")
    seeds: int = Field(1, ge=1, le=MAX_SEEDS)
    set: dict[str, Any] = Field(default_factory=dict, description="fixed overrides, key.path: value")
    grid: dict[str, Union[list[Any], dict[str, dict[str, Any]]]] = Field(..., min_length=1)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig, description="where the cells run")

    def recipe_path(self, spec_path: Path) -> Path:
        return Path(spec_path).parent / self.recipe

    def overrides(self) -> list[str]:
        return [override(key, value) for key, value in self.set.items()]


def load_spec(path) -> SweepSpec:
    """Read and validate a sweep spec file; one line naming the file and key when it is wrong."""
    path = Path(path)
    data = read_yaml_file(path, "sweep spec", aliases=False)
    if isinstance(data, dict) and "grid" not in data and "teacher" in data:
        raise KdtoolError(f"{path} is a recipe, not a sweep spec: give the grid with --grid KEY=V1,V2,...")
    if not isinstance(data, dict):
        raise KdtoolError(f"{path}: a sweep spec is a mapping of keys, got {type(data).__name__}")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise KdtoolError(f"{path}: {validation_message(exc)}") from None


def refuse_spec_as_recipe(path) -> None:
    """Refuse a sweep spec file given where a recipe is expected (``kdtool sweep SPEC --grid ...``): its
    grid, seeds and base recipe would be read as recipe keys."""
    try:
        data = read_yaml_file(path, "recipe")  # never opens a FIFO
    except RecipeError:
        return  # loading it as a recipe says why in its own words
    if isinstance(data, dict) and "teacher" not in data and ("grid" in data or "recipe" in data):
        raise KdtoolError(f"{path} is a sweep spec, not a recipe: its grid is in the file; drop --grid "
                          f"(or give a recipe with --grid)")


def run_spec(spec_path, *, seeds: Optional[int] = None, overrides=(), out: Optional[Path] = None,
             progress: bool = True, executor: Optional[Mapping] = None) -> list[dict]:
    """Run the sweep a spec file describes; `seeds`, `overrides` (added last), `out` and `executor`
    settings (e.g. ``{"name": "ray"}``) replace its own."""
    spec = load_spec(spec_path)
    teacher_home = Path(spec.teacher_home) if spec.teacher_home else None
    return run_sweep(spec.recipe_path(spec_path), spec.grid, seeds or spec.seeds, [*spec.overrides(), *overrides],
                     Path(out) if out is not None else Path(spec.out), progress, teacher_home,
                     executor_config(executor or {}, spec.executor))
