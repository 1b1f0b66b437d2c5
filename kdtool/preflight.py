"""Checked before anything trains: what `distill` builds from a recipe, built and tried once.

`distill` (and so `run`), `recipe check` and every cell of `kdtool sweep` go through these
functions, so they agree on what is valid: the data (and a batch that fits its training set), both
models with their weights, each pushed one dummy batch of the recipe's input size (a model that
cannot take that size, or does not fit in memory, is one line naming the model and the size), the
method's loss, and the JDA views of the student and of a teacher trained in the run.

The dummy batch is zeros, run on the CPU in eval mode under ``torch.no_grad()``: it uses no random
numbers (training draws exactly what it drew without the check) and changes no BatchNorm statistics.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from accelerate.utils import set_seed
from torch import nn

from kdtool.augment import TrainViews, build_train_views
from kdtool.data import DATASETS, DataInfo, Datasets, build_datasets
from kdtool.errors import KdtoolError
from kdtool.losses import LossFn, build_loss
from kdtool.models import build_model, check_model_name
from kdtool.recipe import DataConfig, JDAConfig, Recipe, ScheduleConfig, TrainConfig

DUMMY_BATCH = 2  # images in the batch each model is tried on (BatchNorm in eval mode takes any size)


@dataclass
class Checked:
    """What `preflight` built: distill trains exactly these."""

    datasets: Datasets
    student: nn.Module
    teacher: nn.Module
    loss_fn: LossFn
    needs_teacher: bool
    train_views: TrainViews


def check_data(cfg: DataConfig) -> Datasets:
    """The recipe's datasets; refuses a batch larger than the (few-shot) training set."""
    _named("data.name", lambda: DATASETS[cfg.name])
    try:
        datasets = build_datasets(cfg)
    except Exception as exc:  # noqa: BLE001 - only the allocator's refusal is turned into a line here
        if not _is_out_of_memory(exc):
            raise
        raise KdtoolError(f"data: the {cfg.name} set at {cfg.image_size}x{cfg.image_size} (data.image_size) does not "
                          f"fit in memory: {_first_line(exc)}") from None
    if cfg.batch_size > len(datasets.train):
        raise KdtoolError(f"data.batch_size: {cfg.batch_size} is larger than the {len(datasets.train)} training images")
    return datasets


def _named(key: str, check) -> None:
    """Run `check`; its KdtoolError names the recipe key it is about."""
    try:
        check()
    except KdtoolError as exc:
        raise KdtoolError(f"{key}: {exc}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    tried = re.search(r"tried to allocate (\d+) bytes", text)  # torch's CPU allocator
    if tried:
        return f"tried to allocate {int(tried.group(1)) / 2**20:.0f} MiB more"
    return next(iter(text.splitlines()), "")[:200] or type(exc).__name__


def _is_out_of_memory(exc: BaseException) -> bool:
    """An allocator failure: Python's MemoryError, torch.OutOfMemoryError (torch >= 2.5; CUDA), the CPU allocator's
    RuntimeError ("can't allocate memory")."""
    text = str(exc).lower()
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text or (
        "out of memory" in text)


def _refusal(role: str, name: str, size: int, stage: str, exc: BaseException) -> KdtoolError:
    where = f"{role} {name} at {size}x{size} inputs (data.image_size {size})"
    if _is_out_of_memory(exc):
        doing = "building it" if stage == "built" else f"one batch of {DUMMY_BATCH}"
        return KdtoolError(f"{where} does not fit in memory ({doing}): {_first_line(exc)}")
    return KdtoolError(f"{where} cannot be {stage}: {_first_line(exc)}")


def try_forward(model: nn.Module, role: str, name: str, info: DataInfo) -> None:
    """Push one dummy batch of `info`'s size through `model`; one line naming model and size when it fails."""
    size = info.image_size
    was_training = model.training
    try:
        with torch.no_grad():
            output = model.eval()(torch.zeros(DUMMY_BATCH, 3, size, size))
    except Exception as exc:  # noqa: BLE001 - any failure of a model's forward (shape, kernel, allocator) is one line
        raise _refusal(role, name, size, "run", exc) from None
    finally:
        model.train(was_training)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if shape != (DUMMY_BATCH, info.num_classes):
        raise KdtoolError(f"{role} {name} at {size}x{size} inputs gives outputs of shape {shape}, not "
                          f"({DUMMY_BATCH}, {info.num_classes}) logits for the dataset's {info.num_classes} classes")


def check_model(role: str, name: str, weights: str | None, info: DataInfo, *, new_head: bool = False) -> nn.Module:
    """Build a model as distill does (weights loaded) and try it on one dummy batch of the recipe's size."""
    _named(f"{role}.name", lambda: check_model_name(name))
    try:
        model = build_model(name, info.num_classes, weights, new_head=new_head, image_size=info.image_size)
    except KdtoolError as exc:
        raise KdtoolError(f"{role}.weights: {exc}" if weights is not None else str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a constructor refusing the size, or the allocator refusing the weights
        raise _refusal(role, name, info.image_size, "built", exc) from None
    try_forward(model, role, name, info)
    return model


def check_models(recipe: Recipe, info: DataInfo) -> tuple[nn.Module, nn.Module]:
    """The recipe's student and teacher, built and tried. A student may start from pretrained features for
    other classes (a fresh classifier); a teacher may not."""
    student = check_model("student", recipe.student.name, recipe.student.weights, info, new_head=True)
    teacher = check_model("teacher", recipe.teacher.name, recipe.teacher.weights, info)
    return student, teacher


def check_views(recipe: Recipe) -> TrainViews:
    """The student's JDA views, and (only built, for its errors) the views of a teacher trained in the run."""
    if recipe.teacher.weights is None:
        build_train_views(recipe.teacher.augment.jda, recipe.seed)
    return build_train_views(recipe.augment.jda, recipe.seed)


def preflight(recipe: Recipe) -> Checked:
    """Everything distill needs, built and checked before a run directory is touched."""
    datasets = check_data(recipe.data)
    set_seed(recipe.seed)  # model initialisation depends on the seed alone
    student, teacher = check_models(recipe, datasets.info)
    loss_fn, needs_teacher = build_loss(recipe.method, recipe.train.label_smoothing)
    return Checked(datasets, student, teacher, loss_fn, needs_teacher, check_views(recipe))


# ------------------------------------------------------------------ settings nothing reads
def _changed(section, fields, prefix: str) -> list[str]:
    """The `fields` of `section` set to something other than their default, as key paths."""
    default = type(section)()
    return [f"{prefix}.{f}" for f in fields if getattr(section, f) != getattr(default, f)]


def _unused_in_schedule(schedule: ScheduleConfig, prefix: str) -> list[str]:
    unused = [] if schedule.name == "multistep" else _changed(schedule, ("milestones", "gamma"), prefix)
    return unused + ([] if schedule.name == "cosine" else _changed(schedule, ("min_lr",), prefix))


def _unused_in_views(jda: JDAConfig, prefix: str) -> list[str]:
    return _changed(jda, ("p", "views", "teacher_sees_views"), prefix) if jda.policy is None else []


def unused_settings(recipe: Recipe) -> list[str]:
    """Settings given a non-default value that nothing reads, each with why (`recipe check` lists them,
    distill warns): the training of a teacher that has weights, JDA settings with JDA off, schedule
    settings of another schedule."""
    notes = []
    teacher = recipe.teacher
    if teacher.weights is not None:
        ignored = [name for name, default in (("train", TrainConfig()), ("augment", type(teacher.augment)()))
                   if getattr(teacher, name) != default]
        notes += [f"teacher.{name}: the teacher has weights (teacher.weights) and is not trained" for name in ignored]
    else:
        notes += [f"{key}: teacher.augment.jda.policy is null" for key in
                  _unused_in_views(teacher.augment.jda, "teacher.augment.jda")]
        notes += [f"{key}: teacher.train.schedule.name is {teacher.train.schedule.name}" for key in
                  _unused_in_schedule(teacher.train.schedule, "teacher.train.schedule")]
    notes += [f"{key}: augment.jda.policy is null" for key in _unused_in_views(recipe.augment.jda, "augment.jda")]
    notes += [f"{key}: train.schedule.name is {recipe.train.schedule.name}" for key in
              _unused_in_schedule(recipe.train.schedule, "train.schedule")]
    return notes  # a method setting the chosen method does not read is refused by the recipe schema
