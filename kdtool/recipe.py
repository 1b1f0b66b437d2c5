"""Recipes: YAML -> a typed, validated `Recipe`.

Precedence is defaults < recipe file < ``--set key.path=value`` overrides. ``${VAR}`` in any string
is replaced from the environment (data roots, mostly). Every problem is a `RecipeError` naming the
file and the key path; unknown keys get a "did you mean" suggestion.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdtool.errors import KdtoolError, closest


class RecipeError(KdtoolError):
    """The recipe file or an override is malformed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- data
class DataConfig(_Section):
    name: str = "digits"
    root: Optional[str] = None
    download: bool = False
    image_size: int = Field(32, ge=8, le=1024)
    val_fraction: float = Field(0.2, gt=0, lt=1, description="digits only: held-out share")
    split_seed: int = 0
    train_fraction: float = Field(1.0, gt=0, le=1, description="stratified few-shot subset")
    batch_size: int = Field(64, ge=1, description="global batch of original images")
    eval_batch_size: int = Field(256, ge=1)
    workers: int = Field(0, ge=0)
    pin_memory: bool = True
    bad_images: Literal["fail", "skip"] = "fail"


# ---------------------------------------------------------------- models
class ModelConfig(_Section):
    name: str
    weights: Optional[str] = Field(None, description="torchvision weights enum name or a checkpoint path")


# ---------------------------------------------------------------- training
class OptimizerConfig(_Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)


class ScheduleConfig(_Section):
    name: Literal["multistep", "cosine", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=list, description="epochs, multistep only")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0)
    min_lr: float = Field(0.0, ge=0)


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    grad_accum: int = Field(1, ge=1)
    clip_grad_norm: Optional[float] = Field(None, gt=0)
    eval_every: int = Field(1, ge=1, description="epochs between evaluations")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many optimizer steps (smoke tests)")

    @model_validator(mode="after")
    def _milestones_within_epochs(self):
        if any(m <= 0 or m > self.epochs for m in self.schedule.milestones):
            raise ValueError(f"schedule.milestones must lie in 1..{self.epochs} (train.epochs)")
        return self


class TeacherConfig(ModelConfig):
    train: TrainConfig = Field(default_factory=TrainConfig, description="used only when weights is null")


# ---------------------------------------------------------------- method and augmentation
class MethodConfig(_Section):
    name: str = "ccd"
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the cross-entropy term")
    kd_weight: float = Field(2.0, ge=0)


class JDAConfig(_Section):
    policy: Optional[str] = Field(None, description="cifar100 | cifar10 | imagenet | digits; null = off")
    p: Optional[float] = Field(None, ge=0, le=1, description="firing probability; null = the policy's")
    views: int = Field(1, ge=1, le=8, description="augmented views per original image")
    teacher_sees_views: bool = True


class AugmentConfig(_Section):
    jda: JDAConfig = JDAConfig()


class RuntimeConfig(_Section):
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false
    cpu: bool = Field(False, description="force the CPU even where a GPU is present")
    channels_last: bool = True
    compile: bool = False
    threads: Optional[int] = Field(None, ge=1, description="torch intra-op threads; null = torch default")


# ---------------------------------------------------------------- export and bench
class Int8Config(_Section):
    enabled: bool = True
    calibration_images: int = Field(256, ge=1)
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    reduce_range: Optional[bool] = Field(None, description="null = decide from the CPU (no VNNI -> true)")
    max_top1_drop: float = Field(1.0, ge=0, description="points vs the float student before fallback")
    fallback_budget: int = Field(8, ge=0, description="max nodes kept in float by the fallback")
    calibration_batch_size: int = Field(16, ge=1, description="images per calibration/sensitivity inference")


class TensorRTConfig(_Section):
    min_batch: int = Field(1, ge=1)
    opt_batch: int = Field(8, ge=1)
    max_batch: int = Field(32, ge=1)
    workspace_mib: int = Field(1024, ge=16)


class ExportConfig(_Section):
    enabled: bool = True
    root: str = "export"
    name: Optional[str] = Field(None, description="bundle name; null = the recipe name")
    opset: int = Field(17, ge=17)
    verify_batch_sizes: list[int] = Field(default_factory=lambda: [1, 7, 32])
    verify_images: int = Field(256, ge=1, description="validation images compared against PyTorch per batch size")
    max_abs_diff: float = Field(1e-3, gt=0)
    min_cosine: float = Field(0.9999, gt=0, le=1)
    min_top1_agreement: float = Field(0.99, gt=0, le=1)
    fp16: bool = True
    fp16_max_abs_diff: float = Field(0.05, gt=0, description="FP16 vs PyTorch float; looser than fp32")
    fp16_min_cosine: float = Field(0.999, gt=0, le=1)
    fp16_min_top1_agreement: float = Field(0.98, gt=0, le=1)
    int8: Int8Config = Int8Config()
    tensorrt: TensorRTConfig = TensorRTConfig()


class GateConfig(_Section):
    max_top1_drop: dict[str, float] = Field(
        default_factory=lambda: {"fp32": 0.5, "fp16": 0.5, "int8": 1.5},
        description="per precision, points vs the float student",
    )
    min_teacher_agreement: float = Field(0.0, ge=0, le=100, description="percent of val images")


class BenchConfig(_Section):
    enabled: bool = True
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 32])
    warmup: int = Field(5, ge=0)
    iters: int = Field(50, ge=1)
    duration: Optional[float] = Field(None, gt=0, description="seconds per case; overrides iters")
    threads: Optional[int] = Field(None, ge=1)
    include_copies: bool = True
    cuda_graphs: bool = False
    gate: GateConfig = GateConfig()


# ---------------------------------------------------------------- the recipe
class Recipe(_Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    data: DataConfig = DataConfig()
    teacher: TeacherConfig
    student: ModelConfig
    method: MethodConfig = MethodConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    export: ExportConfig = ExportConfig()
    bench: BenchConfig = BenchConfig()

    def digest(self) -> str:
        """sha256 of the resolved recipe, for provenance."""
        return hashlib.sha256(dump_recipe(self).encode()).hexdigest()


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _interpolate(node: Any, key: str, source: str) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{key}.{k}" if key else str(k), source) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{key}[{i}]", source) for i, v in enumerate(node)]
    if isinstance(node, str):
        def env(match: re.Match) -> str:
            if match.group(1) not in os.environ:
                raise RecipeError(f"{source}: {key}: environment variable ${{{match.group(1)}}} is not set")
            return os.environ[match.group(1)]
        return _ENV.sub(env, node)
    return node


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a', 'b'], value typed as YAML would type it)."""
    path, sep, raw = text.partition("=")
    if not sep or not path or any(not part for part in path.split(".")):
        raise RecipeError(f"--set {text!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path.split("."), value


def apply_overrides(data: dict, overrides) -> dict:
    """Return a copy of `data` with every ``key.path=value`` applied."""
    data = _deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {'.'.join(keys[:depth + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def _deepcopy(node):
    if isinstance(node, dict):
        return {k: _deepcopy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_deepcopy(v) for v in node]
    return node


def _field_names(path: tuple) -> list[str]:
    """Valid keys of the section at `path`, for "did you mean" suggestions."""
    model = Recipe
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe(error: dict) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"unknown key {key}{closest(loc[-1], _field_names(loc[:-1]))}"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    value = error.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{key}: {error['msg'].lower()} (got {shown})"


def recipe_from_dict(data: Any, source: str = "<recipe>", overrides=()) -> Recipe:
    """Validate plain data (as loaded from YAML) into a `Recipe`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the recipe must be a mapping of keys, got {type(data).__name__}")
    data = _interpolate(apply_overrides(data, overrides), "", source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise RecipeError(f"{source}: {_describe(first)}{more}") from exc


def load_recipe(path: str | os.PathLike, overrides=()) -> Recipe:
    """Read, interpolate, override and validate a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file (UTF-8 YAML expected)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}: YAML syntax error{where}: {problem}") from None
    return recipe_from_dict(data, str(path), overrides)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what a run directory keeps)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe atomically."""
    from kdtool.io import write_text_atomic

    write_text_atomic(Path(path), dump_recipe(recipe))
