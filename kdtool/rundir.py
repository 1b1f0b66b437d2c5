"""The layout of a run directory, in one place: file names, the ownership marker, the lock, and
loading what a run holds (its recipe, its student and teacher).

    runs/<name>/
      .kdtool-run                    marker: this directory was made by kdtool (JSON: kind, created)
      .lock                          held (flock) by the kdtool process working on the run
      recipe.yaml                    the resolved recipe
      metrics.jsonl                  one JSON record per epoch
      checkpoints/epoch-NNNN/        model.safetensors, state.safetensors, state.json (see kdtool.checkpoint)
      last -> checkpoints/...        the newest checkpoint
      best -> checkpoints/...        the best student by val top-1
      teacher/                       the same layout, for a teacher trained in this run
      summary.json

train, export, bench and sweep import this module; it imports nothing of theirs.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

from torch import nn

from kdtool.data import DataInfo
from kdtool.errors import KdtoolError
from kdtool.io import (
    check_replaceable, clear_directory, exclusive_lock, newest_owned, read_json_object, write_json_atomic,
)
from kdtool.models import build_model
from kdtool.preprocess import normalization_plan, teacher_on_student_inputs
from kdtool.recipe import Recipe, load_recipe

MARKER_FILE = ".kdtool-run"
LOCK_FILE = ".lock"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_WEIGHTS = "model.safetensors"
STATE_WEIGHTS = "state.safetensors"  # optimizer tensors
STATE_FILE = "state.json"  # epoch, step, optimizer groups, scheduler, RNG seed, metrics
LAST, BEST = "last", "best"
TEACHER_DIR = "teacher"
RUN_KIND = "run"
SWEEP_KIND = "sweep"

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ ownership
def is_owned(directory: Path, kind: str = RUN_KIND) -> bool:
    """Whether `directory` holds kdtool's marker for `kind` (a run, or a sweep)."""
    marker = Path(directory) / MARKER_FILE
    if not marker.is_file() or marker.is_symlink():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("kind") == kind
    except (OSError, ValueError, AttributeError):
        return False


def claim(directory: Path, kind: str = RUN_KIND) -> None:
    """Create `directory` if needed and mark it as kdtool's own `kind`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / MARKER_FILE, {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def check_run_target(directory: Path, *, kind: str = RUN_KIND) -> None:
    """KdtoolError unless `directory` may become (or be replaced as) a `kind` directory.

    Allowed: absent, empty, or holding kdtool's marker of the same kind. Never the working
    directory, its parents, the home directory, `/`, or a symlink.
    """
    check_replaceable(directory, MARKER_FILE, f"{kind} directory")
    directory = Path(directory)
    if directory.is_dir() and (directory / MARKER_FILE).is_file() and not is_owned(directory, kind):
        raise KdtoolError(f"refusing to use {directory}: it is a kdtool directory of another kind, not a {kind}")


def has_content(directory: Path) -> bool:
    """Whether `directory` holds anything besides the lock and the marker."""
    directory = Path(directory)
    return directory.is_dir() and any(p.name not in (LOCK_FILE, MARKER_FILE) for p in directory.iterdir())


def clear_run(directory: Path) -> None:
    """Empty an owned run directory (checked by `check_run_target` first), keeping lock and marker."""
    clear_directory(directory, keep=(LOCK_FILE, MARKER_FILE))


def run_lock(directory: Path):
    """Refuse a second kdtool process on the same run (or sweep) directory (a context manager)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return exclusive_lock(directory / LOCK_FILE, f"run directory {directory}")


# ------------------------------------------------------------------ reading a run
def read_state(checkpoint: Path) -> dict:
    """The JSON state of a checkpoint directory (or of the `last`/`best` link to one)."""
    return read_json_object(Path(checkpoint) / STATE_FILE, "checkpoint state")


def is_dangling(link: Path) -> bool:
    """Whether `link` is a symlink whose target is gone (a checkpoint a killed or cleaned run lost)."""
    return link.is_symlink() and not link.exists()


def checkpoint_link(directory: Path, which: str) -> Path:
    """`directory/last` or `directory/best`, refused with one line when the link dangles."""
    link = Path(directory) / which
    if is_dangling(link):
        raise KdtoolError(f"{link} is a broken link (its checkpoint is gone); "
                          f"start again with --overwrite or restore the checkpoint")
    return link


def has_checkpoint(directory: Path, which: str = LAST) -> bool:
    """Whether `directory` has a usable `which` checkpoint (a dangling link raises, it is not 'none')."""
    return checkpoint_link(directory, which).exists()


def is_finished(directory: Path) -> bool:
    """Whether the training in `directory` (a run, or its teacher/) ran to its last epoch."""
    return has_checkpoint(directory, LAST) and read_state(Path(directory) / LAST).get("finished", False)


def run_recipe(run_dir: Path, overrides=()) -> Recipe:
    """The resolved recipe a run was made with (with `overrides` applied)."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise KdtoolError(f"{run_dir} is not a run directory (no {RECIPE_FILE})")
    return load_recipe(path, overrides)


def best_checkpoint(run_dir: Path) -> Path:
    """The weights file of the run's best student."""
    checkpoint = checkpoint_link(run_dir, BEST) / CHECKPOINT_WEIGHTS
    if not checkpoint.is_file():
        raise KdtoolError(f"run {run_dir} has no best student checkpoint ({checkpoint} is missing; "
                          f"did distillation finish an epoch?)")
    return checkpoint


def find_latest_run(runs_root: Path = Path("runs")) -> Path:
    """The run under `runs_root` whose `best` checkpoint is the most recent (it must hold recipe.yaml)."""
    runs_root = Path(runs_root)

    def finished(run: Path) -> bool:
        return (run / RECIPE_FILE).is_file() and (run / BEST / CHECKPOINT_WEIGHTS).is_file()

    latest = newest_owned(runs_root, finished, dated_by=lambda run: run / BEST / CHECKPOINT_WEIGHTS)
    if latest is None:
        raise KdtoolError(f"no finished run under {runs_root}/ (a run dir with {RECIPE_FILE} and a best checkpoint); "
                          f"run `kdtool distill RECIPE` first or name the run directory")
    log.info("no run named: using the newest finished run, %s", latest)
    return latest


def teacher_source(run_dir: Path, recipe: Recipe) -> str:
    """Where the teacher's weights are: the recipe's, or the teacher trained in this run."""
    return recipe.teacher.weights or str(checkpoint_link(Path(run_dir) / TEACHER_DIR, BEST))


def load_teacher(run_dir: Path, recipe: Recipe, info: DataInfo) -> nn.Module:
    """The run's teacher, frozen, on the CPU, taking batches normalised for the student (see kdtool.preprocess)."""
    teacher = build_model(recipe.teacher.name, info.num_classes, teacher_source(run_dir, recipe),
                          image_size=info.image_size).eval().requires_grad_(False)
    return teacher_on_student_inputs(teacher, normalization_plan(recipe, info))


def load_student(run_dir: Path, recipe: Recipe, info: DataInfo, which: str = BEST) -> nn.Module:
    """The run's student from its `best` (or `last`) checkpoint, in eval mode, on the CPU."""
    checkpoint = checkpoint_link(run_dir, which)
    if not checkpoint.exists():
        raise KdtoolError(f"run {run_dir} has no {which} student checkpoint (did distillation finish an epoch?)")
    return build_model(recipe.student.name, info.num_classes, str(checkpoint), image_size=info.image_size).eval()


def teacher_dir(run_dir: Path) -> Path:
    return Path(run_dir) / TEACHER_DIR


def summary(run_dir: Path) -> Optional[dict]:
    """The run's summary.json, or None before the run finished."""
    path = Path(run_dir) / SUMMARY_FILE
    return read_json_object(path, "run summary") if path.is_file() else None
