"""Per-model input normalisation: each model sees the inputs its weights were trained for.

The shared batch (uint8, or [0, 1] floats after JDA) is normalised once, for the STUDENT, with
`with_normalization(info, plan.student)`; the frozen teacher is wrapped in `Renormalize`, which maps
that batch to the teacher's own normalisation on the device (one per-channel affine map) before its
forward. A model's normalisation is, in order: the recipe's (``normalization: {mean, std}`` or
``dataset``), its pretrained weights' metadata (torchvision's weights enum ``transforms()``, timm's
``pretrained_cfg``), else the dataset's. Random init and local weight files take the dataset's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from kdtool.data import DataInfo
from kdtool.errors import KdtoolError
from kdtool.models import TIMM_PREFIX, timm_pretrained_cfg, timm_pretrained_tag, torchvision_weights
from kdtool.recipe import ModelConfig, NormalizationConfig, Recipe

DATASET = "dataset"
RECIPE = "recipe"


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std on [0, 1] images, and why a model gets them ('recipe', 'dataset', the weights)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    why: str
    pretrained_size: Optional[int] = None  # input side the weights were trained at (informational)
    interpolation: Optional[str] = None

    def same_values(self, other: "Normalization") -> bool:
        return self.mean == other.mean and self.std == other.std

    def describe(self, image_size: Optional[int] = None) -> str:
        """'mean [..] std [..] (why; trained at N px, interp)' for `kdtool recipe check`."""
        numbers = f"mean {_rounded(self.mean)} std {_rounded(self.std)}"
        notes = [self.why]
        if self.pretrained_size is not None:
            notes.append(f"weights trained at {self.pretrained_size} px, {self.interpolation}")
            if image_size is not None and image_size != self.pretrained_size:
                notes.append(f"data is {image_size} px and is not resized")
        return f"{numbers} ({'; '.join(notes)})"


@dataclass(frozen=True)
class NormalizationPlan:
    student: Normalization
    teacher: Normalization


def _rounded(values: tuple[float, ...]) -> list[float]:
    return [round(v, 4) for v in values]


def dataset_normalization(info: DataInfo) -> Normalization:
    return Normalization(tuple(info.mean), tuple(info.std), DATASET)


def weights_normalization(cfg: ModelConfig) -> Optional[Normalization]:
    """The normalisation `cfg`'s pretrained weights were trained with; None for random init or a local file."""
    if cfg.name.startswith(TIMM_PREFIX):
        tag = timm_pretrained_tag(cfg.name, cfg.weights)
        if tag is None:
            return None
        pretrained = timm_pretrained_cfg(cfg.name, tag)
        if len(pretrained.mean) != 3 or len(pretrained.std) != 3:
            raise KdtoolError(f"{cfg.name}: timm pretrained_cfg has {len(pretrained.mean)}-channel mean/std; "
                              f"kdtool feeds RGB (3 channels)")
        return Normalization(tuple(pretrained.mean), tuple(pretrained.std),
                             f"timm pretrained_cfg {pretrained.architecture}.{pretrained.tag}",
                             pretrained.input_size[-1], pretrained.interpolation)
    weights = torchvision_weights(cfg.name, cfg.weights)
    if weights is None:
        return None
    preset = weights.transforms()  # torchvision's ImageClassification preset of these weights
    return Normalization(tuple(preset.mean), tuple(preset.std), f"torchvision weights {weights.name}",
                         preset.crop_size[0], preset.interpolation.value)


def own_normalization(cfg: ModelConfig) -> Optional[Normalization]:
    """What `cfg` asks for itself: the recipe's override, else its weights'; None = the dataset's."""
    if isinstance(cfg.normalization, NormalizationConfig):
        return Normalization(tuple(cfg.normalization.mean), tuple(cfg.normalization.std), RECIPE)
    if cfg.normalization == DATASET:
        return None
    return weights_normalization(cfg)


def normalization_plan(recipe: Recipe, info: DataInfo) -> NormalizationPlan:
    """The student's and the teacher's normalisation for `recipe` on the dataset described by `info`."""
    dataset = dataset_normalization(info)
    return NormalizationPlan(student=own_normalization(recipe.student) or dataset,
                             teacher=own_normalization(recipe.teacher) or dataset)


def describe_normalization(recipe: Recipe, info: Optional[DataInfo] = None) -> list[str]:
    """One line per model saying which normalisation it gets and why (`info` None: dataset values unknown)."""
    lines = []
    for role, cfg in (("student", recipe.student), ("teacher", recipe.teacher)):
        chosen = own_normalization(cfg) or (dataset_normalization(info) if info is not None else None)
        text = chosen.describe(recipe.data.image_size) if chosen else f"the dataset's mean/std ({DATASET})"
        if recipe.teacher.weights is None and role == "teacher":
            text += "; the teacher is trained in the run with it"
        lines.append(f"{role} {cfg.name}: {text}")
    return lines


def with_normalization(info: DataInfo, normalization: Normalization) -> DataInfo:
    """`info` with `normalization`'s mean/std: what a model's batches, evaluation and bundle normalise with."""
    return dataclasses.replace(info, mean=tuple(normalization.mean), std=tuple(normalization.std))


def _channels(values: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


class Renormalize(nn.Module):
    """Runs `model` (which expects `target` normalisation) on batches normalised with `source`.

    x_target = (x_source * std_s + mean_s - mean_t) / std_t, one per-channel affine map on the batch's device.
    """

    def __init__(self, model: nn.Module, source: Normalization, target: Normalization):
        super().__init__()
        self.model = model
        scale = _channels(source.std) / _channels(target.std)
        shift = (_channels(source.mean) - _channels(target.mean)) / _channels(target.std)
        self.register_buffer("scale", scale, persistent=False)  # not in state_dict: the model's keys stay its own
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype)))


def teacher_on_student_inputs(teacher: nn.Module, plan: NormalizationPlan) -> nn.Module:
    """`teacher` taking the student-normalised batch: wrapped in `Renormalize` unless both expect the same."""
    if plan.teacher.same_values(plan.student):
        return teacher
    return Renormalize(teacher, plan.student, plan.teacher)
