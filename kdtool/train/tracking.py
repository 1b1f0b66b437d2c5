"""Experiment trackers (TensorBoard, W&B, MLflow, ... whatever Accelerate knows) for a run.

The Accelerator is built with ``log_with`` and a logging directory (``build_accelerator``); a run
starts the trackers once with the resolved recipe as their config (`tracking`), and the loop logs
through ``Accelerator.log``, which acts on the main process only: every `runtime.log_every`
optimizer steps the loss parts and learning rate (``student/step/loss``, ``student/step/lr``, ...),
and each epoch's record (``student/epoch/val_top1``, ...). Teacher and student share one tracker
run: their values are named ``teacher/...`` and ``student/...`` and their steps follow
each other (the student's continue after the teacher's last), so a resumed run continues its
curves instead of restarting them (TensorBoard is told to hide what a killed process logged past
the checkpoint it resumes from).
"""
from __future__ import annotations

import contextlib
import json
from typing import Optional

from accelerate import Accelerator

from kdtool.errors import KdtoolError

LOGS_DIR = "logs"
# What to install for a tracker; the others are named by their own package.
TRACKER_EXTRAS = {"tensorboard": "kdtool[tensorboard]", "wandb": "kdtool[wandb]", "mlflow": "kdtool[mlflow]"}


def check_trackers(names) -> None:
    """KdtoolError naming what to install when a tracker's package is missing (Accelerate would skip it silently)."""
    from accelerate.tracking import get_available_trackers  # accelerate >= 0.15

    available = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in available:
            raise KdtoolError(f"runtime.log_with: the {name} tracker is not installed; "
                              f"pip install '{TRACKER_EXTRAS.get(name, name)}'")


def flat_config(data: dict, prefix: str = "") -> dict:
    """A nested recipe as flat `a.b.c` keys with values every tracker takes (bool, int, float, str)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


@contextlib.contextmanager
def tracking(accelerator: Accelerator, project: str, config: dict, resumed_at: Optional[int] = None):
    """Start the accelerator's trackers for one run; finish them on exit.

    A run resumed from a checkpoint taken at step `resumed_at` continues after it: TensorBoard
    hides what the stopped process logged past that step (its later steps are logged again).

    Finishing calls each tracker's `finish()` rather than `Accelerator.end_training()`, which also
    destroys the process group that the caller's next run in this process may still need.
    """
    if not accelerator.log_with:
        yield
        return
    init_kwargs = {"tensorboard": {"purge_step": resumed_at + 1}} if resumed_at is not None else {}
    accelerator.init_trackers(project, config=flat_config(config), init_kwargs=init_kwargs)
    try:
        yield
    finally:
        for tracker in accelerator.trackers:
            tracker.finish()
        accelerator.trackers.clear()


def log_values(accelerator: Accelerator, prefix: str, values: dict, step: int) -> None:
    """Log the numeric `values` as `prefix/name` at `step` (on the main process, when trackers run)."""
    if accelerator.trackers:
        numbers = {f"{prefix}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        accelerator.log(numbers, step=step)
