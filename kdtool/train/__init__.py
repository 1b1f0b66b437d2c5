"""The training stage on HF Accelerate: teacher training (CE) and distillation share one loop.

`distill(recipe, run_dir)` is the whole stage: train the teacher when the recipe names no teacher
weights, then distil the student. `fit(...)` is the loop itself, usable on its own with any model.
Device placement, DDP and mixed precision go through the `Accelerator` only, so the same code
runs on one CPU, one GPU or `accelerate launch` across GPUs and nodes.

    setup     Accelerator (with the recipe's trackers), optimizer, learning-rate schedule, seeds
    step      one training step (views, teacher logits, loss, backward, update)
    loop      train_one_epoch, evaluate, and `fit`'s epoch loop over them
    state     the state that changes per step; checkpoint save (finiteness checked) and resume
    signals   SIGINT/SIGTERM -> save at the next step boundary, then stop
    tracking  experiment trackers through Accelerate (TensorBoard, W&B, MLflow, ...)
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from typing import Optional

from accelerate import Accelerator
from torch import nn

from kdtool.augment import TrainViews, build_train_views
from kdtool.data import Datasets
from kdtool.errors import KdtoolError
from kdtool.io import write_json_atomic
from kdtool.losses import LossFn, build_loss
from kdtool.preflight import preflight
from kdtool.preprocess import normalization_plan, teacher_on_student_inputs, with_normalization
from kdtool.recipe import MethodConfig, Recipe, dump_recipe, load_recipe, save_recipe
from kdtool.rundir import (
    BEST, LAST, RECIPE_FILE, SUMMARY_FILE, TEACHER_DIR, check_run_target, claim, clear_run, has_checkpoint, has_content,
    is_finished, load_student, load_teacher, read_state, run_lock,
)
from kdtool.train.loop import FitResult, evaluate, fit, train_one_epoch
from kdtool.train.setup import build_accelerator, build_optimizer, discarded_unless_checkpointed, lr_factor
from kdtool.train.signals import StopRequest, stop_on_signals
from kdtool.train.state import TrainState
from kdtool.train.step import Teacher, TrainStep
from kdtool.train.tracking import tracking

__all__ = [
    "FitResult", "Teacher", "TrainState", "TrainStep", "build_accelerator", "build_optimizer", "distill", "evaluate",
    "fit", "load_student", "load_teacher", "lr_factor", "prepare_run_dir", "train_one_epoch", "train_teacher",
]


def prepare_run_dir(run_dir: Path, recipe: Recipe, *, resume: bool, overwrite: bool) -> None:
    """Create, check or clear the run directory (already checked by `check_run_target`).

    An existing run is continued only with `resume` and replaced only with `overwrite`.
    """
    saved = run_dir / RECIPE_FILE
    if resume:
        if not saved.exists() or not (has_checkpoint(run_dir) or has_checkpoint(run_dir / TEACHER_DIR)):
            raise KdtoolError(f"--resume: nothing to resume in {run_dir} (no checkpoint)")
        before = load_recipe(saved)
        if dump_recipe(before) != dump_recipe(recipe):
            changed = _first_difference(before.model_dump(), recipe.model_dump())
            raise KdtoolError(f"--resume: the recipe differs from the one {run_dir} was started with (at {changed})")
        return
    if has_content(run_dir):
        if not overwrite:
            raise KdtoolError(f"run directory {run_dir} exists; pass --resume to continue it or --overwrite to replace it")
        clear_run(run_dir)
    claim(run_dir)
    save_recipe(recipe, saved)


def _first_difference(a, b, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip(".") or "(top level)"


def train_teacher(recipe: Recipe, teacher: nn.Module, datasets: Datasets, teacher_dir: Path, accelerator: Accelerator,
                  *, resume: bool, progress: bool, stop: Optional[StopRequest] = None) -> None:
    """Train the teacher with cross-entropy into `teacher_dir` (nothing to do when it finished before),
    on batches normalised as the teacher asks (kdtool.preprocess)."""
    if is_finished(teacher_dir):
        return
    own = with_normalization(datasets.info, normalization_plan(recipe, datasets.info).teacher)
    loss_fn = build_loss(MethodConfig(name="vanilla"), recipe.teacher.train.label_smoothing)[0]
    fit(teacher, replace(datasets, info=own), loss_fn=loss_fn, train_cfg=recipe.teacher.train, data_cfg=recipe.data, runtime=recipe.runtime, accelerator=accelerator,
        out_dir=teacher_dir, seed=recipe.seed, train_views=build_train_views(recipe.teacher.augment.jda, recipe.seed),
        resume=resume, label="teacher", progress=progress, stop=stop)


def _tracker_resume_step(run_dir: Path, recipe: Recipe) -> int:
    """The tracker step a resumed run continues after: its newest checkpoint's, the student's following the teacher's."""
    teacher_dir = run_dir / TEACHER_DIR
    teacher_steps = 0
    if recipe.teacher.weights is None:
        if not is_finished(teacher_dir):
            return read_state(teacher_dir / LAST)["step"] if has_checkpoint(teacher_dir) else 0
        teacher_steps = read_state(teacher_dir / LAST)["step"]
    return teacher_steps + (read_state(run_dir / LAST)["step"] if has_checkpoint(run_dir) else 0)


def distill(recipe: Recipe, run_dir: Path, *, resume: bool = False, overwrite: bool = False,
            progress: bool = True, accelerator: Optional[Accelerator] = None) -> dict:
    """The distil stage: train the teacher if needed, then the student. Returns the run summary."""
    run_dir = Path(run_dir)
    # Everything that can be wrong with the input is checked before the run directory is touched.
    checked = preflight(recipe)
    datasets, student, teacher = checked.datasets, checked.student, checked.teacher
    loss_fn, needs_teacher, train_views = checked.loss_fn, checked.needs_teacher, checked.train_views
    accelerator = accelerator or build_accelerator(recipe.runtime, run_dir)
    if accelerator.is_main_process:
        check_run_target(run_dir)  # before the lock file is created in it
    made = not (run_dir.exists() or run_dir.is_symlink())
    with run_lock(run_dir) if accelerator.is_main_process else contextlib.nullcontext():
        if accelerator.is_main_process:
            prepare_run_dir(run_dir, recipe, resume=resume, overwrite=overwrite)
        fresh = accelerator.is_main_process and not resume
        with discarded_unless_checkpointed(run_dir, made=made) if fresh else contextlib.nullcontext():
            accelerator.wait_for_everyone()
            resumed_at = _tracker_resume_step(run_dir, recipe) if resume else None
            with tracking(accelerator, recipe.name, recipe.model_dump(mode="json"), resumed_at):
                teacher_spec = Teacher(teacher, in_loss=needs_teacher, sees_views=recipe.augment.jda.teacher_sees_views)
                with stop_on_signals() as stop:  # one request from the teacher's first step to the student's last
                    summary = _train_stages(recipe, datasets, run_dir, accelerator, student, teacher_spec, loss_fn,
                                            train_views, stop, resume=resume, progress=progress)
        if accelerator.is_main_process:
            write_json_atomic(run_dir / SUMMARY_FILE, summary)
        return summary


def _train_stages(recipe: Recipe, datasets: Datasets, run_dir: Path, accelerator: Accelerator, student: nn.Module,
                  teacher: Teacher, loss_fn: LossFn, train_views: TrainViews, stop: StopRequest, *, resume: bool,
                  progress: bool) -> dict:
    """Teacher (unless the recipe names its weights), then student; the summary of both.

    The student's batches are normalised for the student; the teacher maps them to its own normalisation."""
    summary: dict = {"recipe": recipe.name, "run_dir": str(run_dir)}
    plan = normalization_plan(recipe, datasets.info)
    teacher_steps = 0
    if recipe.teacher.weights is None:
        teacher_dir = run_dir / TEACHER_DIR
        train_teacher(recipe, teacher.model, datasets, teacher_dir, accelerator, resume=resume, progress=progress,
                      stop=stop)
        summary["teacher"] = read_state(teacher_dir / BEST)["metrics"]
        teacher_steps = read_state(teacher_dir / LAST)["step"]
        teacher = replace(teacher, model=load_teacher(run_dir, recipe, datasets.info))
    else:
        teacher = replace(teacher, model=teacher_on_student_inputs(teacher.model, plan))
    if not is_finished(run_dir):
        student_data = replace(datasets, info=with_normalization(datasets.info, plan.student))
        fit(student, student_data, loss_fn=loss_fn, train_cfg=recipe.train, data_cfg=recipe.data, runtime=recipe.runtime,
            accelerator=accelerator, out_dir=run_dir, seed=recipe.seed, teacher=teacher, train_views=train_views,
            resume=resume, label="student", progress=progress, log_step_offset=teacher_steps, stop=stop)
    summary["student"] = read_state(run_dir / BEST)["metrics"]
    return summary
