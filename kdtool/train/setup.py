"""Building blocks of a training run: the Accelerator, the optimizer, the learning-rate schedule, per-epoch seeds."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from torch import nn

from kdtool.recipe import OptimizerConfig, RuntimeConfig, TrainConfig
from kdtool.rundir import CHECKPOINTS_DIR, LOCK_FILE, MARKER_FILE, TEACHER_DIR, clear_run
from kdtool.train.tracking import LOGS_DIR, check_trackers


def build_accelerator(runtime: RuntimeConfig, run_dir: Optional[Path] = None) -> Accelerator:
    """One Accelerator per process; global batches are split across processes.

    With `run_dir`, the recipe's experiment trackers (`runtime.log_with`) are set up to log under
    `run_dir/logs`; a tracker whose package is missing is refused here, before anything trains.
    """
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    trackers = {}
    if run_dir is not None and runtime.log_with:
        check_trackers(runtime.log_with)
        project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / LOGS_DIR))
        trackers = {"log_with": list(runtime.log_with), "project_config": project}
    return Accelerator(
        cpu=runtime.cpu,
        mixed_precision=runtime.mixed_precision,
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
        **trackers,
    )


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov when asked and momentum > 0) or AdamW over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Learning-rate multiplier after `step` optimizer steps: linear warm-up, then the schedule."""
    schedule = cfg.schedule
    warmup = schedule.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    epoch = step / steps_per_epoch
    if schedule.name == "multistep":
        return schedule.gamma ** sum(epoch >= m for m in schedule.milestones)
    if schedule.name == "cosine":
        total = cfg.epochs * steps_per_epoch
        progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
        floor = schedule.min_lr / cfg.optimizer.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """A per-optimizer-step LambdaLR following `lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch))


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed every RNG is reset to at the start of `epoch`: the state there depends on (seed, epoch) alone."""
    return (seed * 1000 + epoch) % 2**32  # numpy's seed range; seeds below ~4.3M map as before


def _holds_checkpoints(run_dir: Path) -> bool:
    return any((directory / CHECKPOINTS_DIR).exists() for directory in (run_dir, run_dir / TEACHER_DIR))


@contextlib.contextmanager
def discarded_unless_checkpointed(run_dir: Path, *, made: bool):
    """A fresh run in `run_dir` (created, or emptied by --overwrite, by this process, which holds its lock)
    that stops before its first checkpoint leaves nothing behind: bad data found by the first batch, a
    loss that is not finite at once. The directory is emptied, and removed when this run made it, so
    the corrected retry is not refused as an existing run."""
    try:
        yield
    except BaseException:
        if not _holds_checkpoints(run_dir):
            clear_run(run_dir)  # keeps only the lock and the marker
            if made:
                (run_dir / LOCK_FILE).unlink(missing_ok=True)  # the lock is released when its handle closes
                # The marker goes last and only from an otherwise empty directory: a directory left with
                # anything in it (a write that raced the stop) stays recognisably kdtool's, so a retry may replace it.
                if [path.name for path in run_dir.iterdir()] == [MARKER_FILE]:
                    (run_dir / MARKER_FILE).unlink()
                    with contextlib.suppress(OSError):  # the original error is the one to report
                        run_dir.rmdir()
        raise
