"""One training step: JDA views, frozen-teacher logits, the loss, backward and (when syncing) the update."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from accelerate import Accelerator
from torch import nn

from kdtool.augment import TrainViews
from kdtool.data import DataInfo, normalize
from kdtool.losses import LossFn
from kdtool.recipe import TrainConfig


@dataclass
class Teacher:
    """A frozen teacher for `fit`. Its logits feed the loss when `in_loss` (evaluation always reports
    the student's agreement with it); with `sees_views` False it sees the originals only and its
    logits are repeated for the JDA views."""

    model: nn.Module
    in_loss: bool = True
    sees_views: bool = True


@dataclass
class TrainStep:
    """Everything one step uses that does not change from step to step (the step number is passed in)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: LossFn
    accelerator: Accelerator
    info: DataInfo
    train_cfg: TrainConfig
    seed: int
    steps_per_epoch: int
    memory_format: torch.memory_format
    teacher: Optional[Teacher] = None
    train_views: Optional[TrainViews] = None

    @property
    def views(self) -> int:
        return self.train_views.views if self.train_views is not None else 0

    def inputs(self, images, step: int) -> torch.Tensor:
        """A loader batch's images (opaque to the loop) -> the normalised joint batch [originals; view 1; ...]."""
        views = self.train_views or TrainViews(None, 0, self.seed)
        return normalize(views(images, step, self.accelerator), self.info).contiguous(memory_format=self.memory_format)

    def teacher_logits(self, inputs: torch.Tensor, batch: int) -> Optional[torch.Tensor]:
        if self.teacher is None or not self.teacher.in_loss:
            return None
        with torch.no_grad(), self.accelerator.autocast():
            if self.views and not self.teacher.sees_views:
                return self.teacher.model(inputs[:batch]).repeat(1 + self.views, 1)
            return self.teacher.model(inputs)

    def __call__(self, images, targets: torch.Tensor, step: int, syncing: bool) -> dict:
        """Forward and backward one batch; the optimizer steps only when `syncing`. Returns the loss parts."""
        inputs = self.inputs(images, step)
        teacher_logits = self.teacher_logits(inputs, targets.shape[0])
        with contextlib.nullcontext() if syncing else self.accelerator.no_sync(self.model):
            parts = self.loss_fn(self.model(inputs), teacher_logits, targets, self.views,
                                 epoch=step / self.steps_per_epoch)
            self.accelerator.backward(parts["loss"] / self.train_cfg.grad_accum)
        if syncing:
            if self.train_cfg.clip_grad_norm:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.train_cfg.clip_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return parts
