"""What bench's accuracy rests on: the bundle's reference set, or with `--data` a whole validation set that
is really read.

`--data DIR` is refused (one line, exit 2) when the bundle's dataset takes no root (the embedded digits:
DIR would not be read), when DIR is not a directory, when the training run (teacher and float student) is
not here, and when the data under DIR is not the bundle's: its class count, class names (in order) and
image size must be the manifest's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from kdtool.bench.loading import Bundle
from kdtool.bundle import read_reference
from kdtool.data import DataInfo, build_datasets, build_loader
from kdtool.errors import KdtoolError
from kdtool.evaluate import predict
from kdtool.export.images import preprocess
from kdtool.rundir import RECIPE_FILE, load_student, load_teacher

EVAL_BATCH = 64  # images per accuracy batch fed to a runner (a runner with a smaller maximum takes fewer)


@dataclass
class EvalSet:
    """Images (as re-iterable preprocessed batches), labels, and the teacher's and float student's logits."""

    description: str
    source: str  # "reference" (the bundle's) or "validation" (the run's whole validation set)
    labels: np.ndarray
    teacher_logits: np.ndarray
    student_logits: np.ndarray
    batches: Callable[[], Iterator[np.ndarray]]
    student: torch.nn.Module | None = None  # the float student, when the run is present
    reference_runtime: str = "reference"

    def timing_pool(self, size: int) -> np.ndarray:
        pool, total = [], 0
        for batch in self.batches():
            pool.append(batch)
            total += len(batch)
            if total >= size:
                break
        return np.concatenate(pool)[:size]


def reference_eval_set(bundle: Bundle) -> EvalSet:
    """The bundle's reference set: what it was exported with, no run and no dataset needed."""
    reference = read_reference(bundle.directory, bundle.manifest)
    pre, n = bundle.manifest.preprocessing, len(reference.labels)
    return EvalSet(reference.description, "reference", reference.labels, reference.teacher_logits,
                   reference.student_logits,
                   lambda: (reference.preprocessed(start, start + EVAL_BATCH, pre) for start in range(0, n, EVAL_BATCH)),
                   reference_runtime="pytorch@export")


def _names(names) -> str:
    shown = ", ".join(repr(str(name)) for name in list(names)[:4])
    return shown + (", ..." if len(names) > 4 else "")


def _check_same_data(info: DataInfo, bundle: Bundle, root: Path) -> None:
    """KdtoolError unless the data under `root` has the bundle's classes (count, names, order) and image size."""
    pre, kind = bundle.manifest.preprocessing, bundle.recipe.data.name
    ours, theirs = list(info.class_names), list(pre.class_names)
    if ours != theirs:
        differ = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise KdtoolError(f"--data {root}: read as {kind!r}, it has {len(ours)} classes ({_names(ours)}), the bundle "
                          f"has {len(theirs)} ({_names(theirs)}); they first differ at class {differ}: not the "
                          f"bundle's data")
    if info.image_size != pre.image_size:
        raise KdtoolError(f"--data {root}: images at {info.image_size} px, the bundle takes {pre.image_size} px")


def _validation_data(bundle: Bundle, root: Path):
    """The datasets under `root`, read as the bundle's dataset kind, after the checks above."""
    data = bundle.recipe.data
    if not data.root:
        raise KdtoolError(f"--data {root}: the bundle's dataset {data.name!r} takes no root (its recipe trained "
                          f"without data.root), so {root} would not be read; without --data, bench uses the "
                          f"bundle's reference set")
    if not root.is_dir():
        raise KdtoolError(f"--data {root}: not a directory (a {data.name!r} dataset root expected)")
    data_cfg = data.model_copy(update={"root": str(root), "download": False})
    try:
        datasets = build_datasets(data_cfg)
    except KdtoolError as exc:
        raise KdtoolError(f"--data {root}: not a {data.name!r} dataset root: {exc}") from None
    _check_same_data(datasets.info, bundle, root)
    return datasets, data_cfg


def run_eval_set(bundle: Bundle, data_root: str, device: torch.device) -> EvalSet:
    """The whole validation set under `data_root`, with the teacher and student of the run the bundle names."""
    root = Path(data_root)
    run_dir = Path(bundle.manifest.provenance.run_dir)
    datasets, data_cfg = _validation_data(bundle, root)
    if not (run_dir / RECIPE_FILE).is_file():
        raise KdtoolError(f"--data needs the training run for the teacher and float student: provenance.run_dir "
                          f"{run_dir} is not here (without --data, bench uses the bundle's reference set)")
    recipe, pre = bundle.recipe, bundle.manifest.preprocessing
    info: DataInfo = dataclasses.replace(datasets.info, mean=tuple(pre.mean), std=tuple(pre.std))
    loader = build_loader(datasets.val, data_cfg, train=False)
    teacher = load_teacher(run_dir, recipe, datasets.info).to(device)  # maps the student's inputs to its own
    student = load_student(run_dir, recipe, datasets.info)
    teacher_logits, labels = predict(teacher, loader, info, device=device)
    student_logits, _ = predict(student, loader, info)
    return EvalSet(f"the validation set under {root}: {len(labels)} images, read as {recipe.data.name!r}",
                   "validation", labels.numpy(), teacher_logits.numpy(), student_logits.numpy(),
                   lambda: (preprocess(images, info) for images, _ in loader), student=student,
                   reference_runtime=f"pytorch-{device.type}")
