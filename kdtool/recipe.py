"""Recipes: YAML -> a typed, validated `Recipe`.

Precedence is defaults < recipe file < ``--set key.path=value`` overrides. ``${VAR}`` in any string
is replaced from the environment (data roots, mostly). Every problem is a `RecipeError` naming the
file and the key path; unknown keys get a "did you mean" suggestion. Numbers must be finite (a NaN
limit would switch a check off), and YAML is read with bounded depth and alias expansion.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      create_model, field_validator, model_serializer, model_validator)

from kdtool.errors import KdtoolError, closest, validation_message


class RecipeError(KdtoolError):
    """The recipe file or an override is malformed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# numpy's legacy seeding (np.random.seed, sklearn's random_state) accepts 0 <= seed < 2**32.
MAX_SEED = 2**32 - 1
MAX_BATCH = 1 << 16
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]


def _distinct(values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError("values must not repeat")
    return values


BatchSizes = Annotated[list[BatchSize], Field(min_length=1, max_length=16), AfterValidator(_distinct)]


# ---------------------------------------------------------------- data
class DataConfig(_Section):
    name: str = "digits"
    root: Optional[str] = None
    download: bool = False
    image_size: int = Field(32, ge=8, le=1024)
    val_fraction: float = Field(0.2, ge=0.01, le=0.9, description="digits only: held-out share")
    split_seed: Seed = 0
    train_fraction: float = Field(1.0, gt=0, le=1, description="stratified few-shot subset")
    batch_size: BatchSize = Field(64, description="global batch of original images")
    eval_batch_size: BatchSize = 256
    workers: int = Field(0, ge=0, le=256)
    pin_memory: bool = True
    bad_images: Literal["fail", "skip"] = "fail"
    decode: Literal["cpu", "accelerator"] = Field(
        "cpu", description="imagefolder with JDA views made on the accelerator: where baseline RGB/grey JPEGs are "
        "decoded; accelerator = the workers read the bytes and the training process decodes them in batches "
        "(nvJPEG on CUDA; a pixel may differ from Pillow's by a few levels), other files on the CPU as with cpu")

    @model_validator(mode="after")
    def _decode_on_the_accelerator_needs_imagefolder(self):
        if self.decode == "accelerator" and self.name != "imagefolder":
            raise ValueError(f"decode: accelerator has no effect on dataset {self.name!r} (imagefolder JPEGs only)")
        return self


# ---------------------------------------------------------------- models
class NormalizationConfig(_Section):
    """The per-channel (RGB) mean and std, on [0, 1] images, that a model expects."""
    mean: list[Annotated[float, Field(ge=0, le=1)]] = Field(min_length=3, max_length=3)
    std: list[Annotated[float, Field(ge=1e-3, le=1)]] = Field(min_length=3, max_length=3)


class ModelConfig(_Section):
    name: str = Field(description="a registry name (resnet8, resnet18, ...) or timm:<name>[.<tag>]")
    weights: Optional[str] = Field(None, description="null = random init; a torchvision weights enum name, "
                                   "for timm 'pretrained' or a tag; or a checkpoint path")
    normalization: Optional[Annotated[
        Union[Annotated[Literal["dataset"], Tag("dataset")], Annotated[NormalizationConfig, Tag("values")]],
        Discriminator(lambda v: "values" if isinstance(v, (dict, NormalizationConfig)) else "dataset"),
    ]] = Field(None, description="null = the pretrained weights' own (else the dataset's); 'dataset'; or {mean, std}")


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
            raise ValueError(f"schedule.milestones: must lie in 1..{self.epochs} (train.epochs)")
        return self

    @model_validator(mode="after")
    def _warmup_within_epochs(self):
        if self.schedule.warmup_epochs > self.epochs:
            raise ValueError(f"schedule.warmup_epochs: {self.schedule.warmup_epochs:g} is beyond epochs "
                             f"({self.epochs}): the learning rate would never reach its value")
        return self


# The JDA policies kdtool.augment.POLICIES holds (a test keeps the two equal): checked here, so that
# `recipe check`, a sweep's plan and distill refuse the same names, whether or not a section is used.
JDA_POLICIES = ("cifar100", "cifar10", "imagenet", "digits", "rotation")


def _jda_policy(name: Optional[str]) -> Optional[str]:
    if name is not None and name not in JDA_POLICIES:
        raise ValueError(f"unknown JDA policy {name!r}{closest(name, JDA_POLICIES)}; "
                         f"known: {', '.join(sorted(JDA_POLICIES))}")
    return name


class JDAConfig(_Section):
    policy: Annotated[Optional[str], AfterValidator(_jda_policy)] = Field(
        None, description="cifar100 | cifar10 | imagenet (the authors' chains) | digits (the CIFAR-100 chain, "
                          "under the quickstart's name) | rotation (views turned by 90/180/270 degrees); null = off")
    p: Optional[float] = Field(None, ge=0, le=1, description="firing probability; null = the policy's")
    views: int = Field(1, ge=1, le=8, description="augmented views per original image")
    teacher_sees_views: bool = True
    device: Literal["auto", "loader", "accelerator"] = Field(
        "auto", description="where views of images of differing sizes (imagefolder) are made: the loader "
        "workers, one image at a time, or the accelerator, batched (the workers only read and decode); "
        "auto = accelerator when training on CUDA, else loader. Both give the same pixels. Images of one "
        "size (digits, cifar100) always get their views batched on the accelerator")


class AugmentConfig(_Section):
    jda: JDAConfig = JDAConfig()


class TeacherConfig(ModelConfig):
    train: TrainConfig = Field(default_factory=TrainConfig, description="used only when weights is null")
    augment: AugmentConfig = Field(default_factory=AugmentConfig,
                                   description="JDA views for training the teacher when weights is null (off by "
                                               "default: the paper's teacher never sees augmented samples)")


# ---------------------------------------------------------------- method and augmentation
class MethodConfig(_Section):
    """Settings every distillation method shares (so `--set method.name=X` works over any of them).

    The combiner (`kdtool.losses.Objective`) reads alpha and kd_weight, once for every method:
    ``kd_weight * (alpha * CE + (1 - alpha) * the method's term at temperature T)``; CE weighs
    kd_weight * alpha, the term kd_weight * (1 - alpha).
    """
    name: str = "ccd"
    temperature: float = Field(4.0, gt=0, le=100)
    alpha: float = Field(0.5, ge=0, lt=1, description="share of the cross-entropy term (below 1: at 1 nothing is "
                                                       "distilled, use method vanilla)")
    kd_weight: float = Field(2.0, gt=0, le=1000, description="scale of the whole loss")


class VanillaMethod(_Section):
    """Cross-entropy alone; no teacher, so no temperature or weights."""
    name: Literal["vanilla"] = "vanilla"


class KDMethod(MethodConfig):
    """Hinton KD on every sample."""
    name: Literal["kd"] = "kd"


class CCDMethod(MethodConfig):
    """Cosine Confidence Distillation (the paper's method)."""
    name: Literal["ccd"] = "ccd"


class DKDMethod(MethodConfig):
    """Decoupled KD (Zhao et al., CVPR 2022); defaults are the authors' CIFAR-100 ones (mdistiller
    mdistiller/engine/cfg.py: CE_WEIGHT 1, ALPHA 1, BETA 8, T 4, WARMUP 20; CE 1 + DKD 1 is alpha 0.5, kd_weight 2)."""
    name: Literal["dkd"] = "dkd"
    tckd_weight: float = Field(1.0, ge=0, le=1000, description="target-class KL weight (the paper's alpha)")
    nckd_weight: float = Field(8.0, ge=0, le=1000, description="non-target-class KL weight (the paper's beta)")
    warmup_epochs: float = Field(20.0, ge=0, le=10_000, description="epochs over which the DKD term ramps up; 0 = none")
    warmup_ramp: Literal["per_epoch", "per_step"] = Field(
        "per_epoch", description="per_epoch: min(e / warmup_epochs, 1) with e the 1-based epoch number (the authors'); "
                                 "per_step: a continuous ramp from 0 at the first step")

    @model_validator(mode="after")
    def _ramp_needs_warmup(self):
        if self.warmup_ramp != "per_epoch" and self.warmup_epochs == 0:
            raise ValueError("warmup_ramp per_step has no effect with warmup_epochs 0 (no warm-up)")
        return self


class DISTMethod(MethodConfig):
    """DIST (Huang et al., NeurIPS 2022): Pearson relations of softmax(z / T) within and across samples.
    Defaults are the authors' CIFAR-100 ones (hunto/image_classification_sota
    configs/strategies/distill/dist_cifar.yaml: ori_loss_weight 1, kd_loss_weight 2, kd dist_t4)."""
    name: Literal["dist"] = "dist"
    alpha: float = Field(1 / 3, ge=0, lt=1, description="share of the cross-entropy term; 1/3 with kd_weight 3 is "
                                                         "the authors' CE 1 + DIST 2")
    kd_weight: float = Field(3.0, gt=0, le=1000, description="scale of the whole loss")
    inter_weight: float = Field(1.0, ge=0, le=1000, description="inter-class relation weight (the paper's beta)")
    intra_weight: float = Field(1.0, ge=0, le=1000, description="intra-class relation weight (the paper's gamma)")


# One class per method, chosen by `name`; a new method adds its class here and its term in kdtool.losses.
MethodSettings = Annotated[
    Union[VanillaMethod, KDMethod, CCDMethod, DKDMethod, DISTMethod], Field(discriminator="name")
]
METHOD_SETTINGS: dict[str, type[_Section]] = {
    cls.model_fields["name"].default: cls for cls in get_args(get_args(MethodSettings)[0])
}


class _MethodTableBase(_Section):
    @model_serializer(mode="wrap")
    def _given_entries_only(self, handler):
        return {name: entry for name, entry in handler(self).items() if entry is not None}


# `methods:` in a recipe: settings kept per method; the entry of the method `method.name` selects fills the keys
# the `method` section leaves unset (so a recipe can carry the authors' settings of every method).
MethodTable = create_model("MethodTable", __base__=_MethodTableBase, **{
    name: (Optional[cls], Field(None, description=f"settings of method {name}"))
    for name, cls in METHOD_SETTINGS.items()
})


def resolve_method_section(data: Any) -> Any:
    """Recipe data with `method` completed from `methods.<method.name>` (the method's own keys win)."""
    if not isinstance(data, dict) or not isinstance(data.get("method", {}), dict):
        return data
    method = {"name": "ccd", **data.get("method", {})}
    table, name = data.get("methods"), method["name"]
    entry = table.get(name) if isinstance(table, dict) and isinstance(name, str) else None
    if isinstance(entry, dict):
        method = {**entry, **method}
    return {**data, "method": method}


def _tracker_name(name: str) -> str:
    from accelerate.utils import LoggerType  # the trackers this Accelerate version knows (1.15: aim ... trackio)

    known = sorted(t for t in LoggerType.list() if t != "all")
    if name not in known:
        raise ValueError(f"unknown tracker {name!r}{closest(name, known)}; known: {', '.join(known)}")
    return name


TrackerName = Annotated[str, AfterValidator(_tracker_name)]


class RuntimeConfig(_Section):
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false
    cpu: bool = Field(False, description="force the CPU even where a GPU is present")
    channels_last: bool = True
    compile: bool = False
    threads: Optional[int] = Field(None, ge=1, le=1024, description="torch intra-op threads; null = torch default")
    log_with: Annotated[list[TrackerName], AfterValidator(_distinct)] = Field(
        default_factory=list, max_length=16, description="experiment trackers Accelerate knows (tensorboard, wandb, mlflow, ...)")
    log_every: int = Field(10, ge=1, le=1_000_000, description="optimizer steps between loss/lr records to the trackers")
    sync_batchnorm: bool = Field(False, description="with several processes, BatchNorm statistics over the "
                                 "global batch (torch SyncBatchNorm on CUDA, kdtool's all-reduced one elsewhere)")


# ---------------------------------------------------------------- export and bench
class Int8Config(_Section):
    enabled: bool = True
    calibration_images: int = Field(256, ge=1)
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    reduce_range: Optional[bool] = Field(None, description="null = decide from the CPU (no VNNI -> true)")
    max_top1_drop: float = Field(1.0, ge=0, description="points vs the float student before fallback")
    fallback_budget: int = Field(8, ge=0, description="max nodes kept in float by the fallback")
    calibration_batch_size: BatchSize = Field(16, description="images per calibration/sensitivity inference")


class TensorRTConfig(_Section):
    min_batch: BatchSize = 1
    opt_batch: BatchSize = 8
    max_batch: BatchSize = 32
    workspace_mib: int = Field(1024, ge=16, le=1 << 24)

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("min_batch, opt_batch, max_batch: need min_batch <= opt_batch <= max_batch")
        return self


# ONNX opsets kdtool can write: torch 2.14's TorchScript exporter (dynamo=False) goes up to 20
# (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET); 17 is kdtool's floor (LayerNorm,
# the Q/DQ forms ONNX Runtime 1.32 and TensorRT 10 take).
OPSETS = range(17, 21)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _plain_name(value: str) -> str:
    if not _PLAIN_NAME.fullmatch(value):
        raise ValueError("must be a plain name: up to 128 letters, digits, '_', '.', '-', starting with a letter "
                         "or digit (no path separators, not '.' or '..')")
    return value


# Run and bundle names: one path component that cannot escape the directory it is put in.
PlainName = Annotated[str, AfterValidator(_plain_name)]


class ExportConfig(_Section):
    enabled: bool = True
    root: str = Field("export", min_length=1, max_length=1024, description="directory holding bundles")
    name: Optional[PlainName] = Field(None, description="bundle name; null = the recipe name")
    opset: int = Field(17, description=f"ONNX opset, {OPSETS.start}..{OPSETS.stop - 1}")
    verify_batch_sizes: BatchSizes = Field(default_factory=lambda: [1, 7, 32])
    verify_images: int = Field(256, ge=1, description="validation images compared against PyTorch per batch size")
    reference_images: int = Field(1000, ge=1, le=100_000, description="validation images carried in the bundle for "
                                  "bench (uint8, labels, teacher/student logits); capped at 64 MiB and the val set")
    max_abs_diff: float = Field(1e-3, gt=0)
    min_cosine: float = Field(0.9999, gt=0, le=1)
    min_top1_agreement: float = Field(0.99, gt=0, le=1)
    fp16: bool = True
    fp16_max_abs_diff: float = Field(0.05, gt=0, description="FP16 vs PyTorch float; looser than fp32")
    fp16_min_cosine: float = Field(0.999, gt=0, le=1)
    fp16_min_top1_agreement: float = Field(0.98, gt=0, le=1)
    int8: Int8Config = Int8Config()
    tensorrt: TensorRTConfig = TensorRTConfig()

    @field_validator("opset")
    @classmethod
    def _supported_opset(cls, value: int) -> int:
        if value not in OPSETS:
            raise ValueError(f"opset {value} is not supported: use {OPSETS.start}..{OPSETS.stop - 1} "
                             f"(torch's TorchScript ONNX exporter writes up to {OPSETS.stop - 1})")
        return value

    @field_validator("root")
    @classmethod
    def _sane_root(cls, value: str) -> str:
        if not value.isprintable() or ".." in Path(value).parts:
            raise ValueError("must be a directory path without '..' components or control characters")
        return value


class GateConfig(_Section):
    max_top1_drop: dict[Literal["fp32", "fp16", "int8"], Annotated[float, Field(ge=0, le=100)]] = Field(
        default_factory=lambda: {"fp32": 0.5, "fp16": 0.5, "int8": 1.5},
        description="per precision (fp32, fp16, int8), points vs the float student",
    )
    min_teacher_agreement: float = Field(0.0, ge=0, le=100, description="percent of val images")


class BenchConfig(_Section):
    enabled: bool = True
    batch_sizes: BatchSizes = Field(default_factory=lambda: [1, 8, 32])
    warmup: int = Field(5, ge=0, le=100_000)
    iters: int = Field(50, ge=1, le=10_000_000)
    duration: Optional[float] = Field(None, gt=0, le=86_400, description="seconds per case; overrides iters")
    threads: Optional[int] = Field(None, ge=1, le=1024)
    include_copies: bool = True
    cuda_graphs: bool = False
    gate: GateConfig = GateConfig()


# ---------------------------------------------------------------- the recipe
class Recipe(_Section):
    name: PlainName
    seed: Seed = 0
    data: DataConfig = DataConfig()
    teacher: TeacherConfig
    student: ModelConfig
    methods: MethodTable = Field(default_factory=MethodTable, description="per-method settings; method.name's fills "
                                 "the keys the method section leaves unset")
    method: MethodSettings = Field(default_factory=CCDMethod)
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    export: ExportConfig = ExportConfig()
    bench: BenchConfig = BenchConfig()

    @model_validator(mode="before")
    @classmethod
    def _complete_method(cls, data):
        return resolve_method_section(data)

    @model_validator(mode="after")
    def _accelerator_decoding_needs_accelerator_views(self):
        trained = [("augment", self.augment)] + ([("teacher.augment", self.teacher.augment)] if self.teacher.weights is None else [])
        for where, augment in trained:
            if self.data.decode == "accelerator" and augment.jda.device == "loader":
                raise ValueError(f"data.decode: accelerator has no effect with {where}.jda.device: loader "
                                 f"(the loader workers decode the images to make the views)")
        return self

    @model_validator(mode="after")
    def _smoothing_has_a_ce_term(self):
        if self.train.label_smoothing > 0 and getattr(self.method, "alpha", 1) == 0:
            raise ValueError("train.label_smoothing has no effect with method.alpha 0 (no cross-entropy term)")
        return self

    @model_validator(mode="after")
    def _method_warmup_within_epochs(self):
        warmup = getattr(self.method, "warmup_epochs", None)
        if warmup is not None and warmup > self.train.epochs:
            raise ValueError(f"method.warmup_epochs: {warmup:g} is beyond train.epochs ({self.train.epochs}): "
                             f"the {self.method.name} term would never reach its weight (0 = no warm-up)")
        return self

    def digest(self) -> str:
        """sha256 of the resolved recipe, for provenance."""
        return hashlib.sha256(dump_recipe(self).encode()).hexdigest()


# ---------------------------------------------------------------- reading YAML within bounds
MAX_YAML_DEPTH = 32  # a recipe nests 4 levels
MAX_YAML_NODES = 10_000  # values once aliases are expanded; a full recipe has ~150
MAX_RECIPE_BYTES = 1 << 20


class YAMLLimitError(yaml.YAMLError):
    """A YAML document past kdtool's bounds: too deep, too large once aliases expand, or a recursive alias."""


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing documents that would blow up once their aliases are expanded,
    and a key given twice in one mapping (PyYAML would keep the last one silently).

    Aliases share nodes, so ten lines can describe 10**9 values (a "billion laughs") or a list that
    contains itself; kdtool copies and walks recipes as plain trees, so the expanded size and
    depth are what count. Both are measured while composing, bottom-up, before anything is built.
    With `aliases` False, any alias is refused (sweep specs).
    """

    def __init__(self, stream, aliases: bool = True):
        super().__init__(stream)
        self._aliases = aliases
        self._depth = 0
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, height)

    def construct_mapping(self, node, deep=False):  # PyYAML >= 5.1 constructor API
        seen = set()
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            if (key.tag, key.value) in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key.value!r} given twice", key.start_mark)
            seen.add((key.tag, key.value))
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent, index):
        line = self.peek_event().start_mark.line + 1
        if self.check_event(yaml.AliasEvent):
            if not self._aliases:
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed here",
                                                  self.peek_event().start_mark)
            anchor = self.peek_event().anchor
            target = self.anchors.get(anchor)
            if target is not None and id(target) not in self._measured:
                raise YAMLLimitError(f"line {line}: alias *{anchor} is used inside the value it names (a recursive alias)")
            node = super().compose_node(parent, index)
        else:
            self._depth += 1
            if self._depth > MAX_YAML_DEPTH:
                raise YAMLLimitError(f"line {line}: nested deeper than {MAX_YAML_DEPTH} levels")
            try:
                node = super().compose_node(parent, index)
            finally:
                self._depth -= 1
            self._measured[id(node)] = self._measure(node, line)
        if self._depth + self._measured[id(node)][1] > MAX_YAML_DEPTH:
            raise YAMLLimitError(f"line {line}: nested deeper than {MAX_YAML_DEPTH} levels once aliases are expanded")
        return node

    def _measure(self, node: yaml.Node, line: int) -> tuple[int, int]:
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        sizes = [self._measured[id(child)] for child in children]
        size = 1 + sum(count for count, _ in sizes)
        if size > MAX_YAML_NODES:
            raise YAMLLimitError(f"line {line}: more than {MAX_YAML_NODES} values once aliases are expanded")
        return size, 1 + max((height for _, height in sizes), default=0)


def parse_yaml(text: str, aliases: bool = True) -> Any:
    """``yaml.safe_load`` within kdtool's bounds on depth and alias expansion, refusing repeated keys
    (and, with `aliases` False, any alias); raises yaml.YAMLError."""
    loader = BoundedLoader(text, aliases)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml_file(path: str | os.PathLike, what: str, aliases: bool = True) -> Any:
    """The data of a small YAML file (a recipe, a sweep spec): the one reader of kdtool's YAML files.

    RecipeError naming `what` and the file when it is missing, over 1 MiB, not UTF-8, or bad YAML
    (with the line and column), past the bounds of `parse_yaml`, or repeats a key.
    """
    path = Path(path)
    check_input_file(path, what)
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {path.stat().st_size} bytes is too large for a {what} (at most {MAX_RECIPE_BYTES})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file (UTF-8 YAML expected)") from None
    try:
        return parse_yaml(text, aliases)
    except YAMLLimitError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}: YAML error{where}: {problem}") from None


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
        raise RecipeError(f"--set {_shorten(text)}: expected key.path=value")
    if path.count(".") >= MAX_YAML_DEPTH:
        raise RecipeError(f"--set {_shorten(text)}: key path deeper than {MAX_YAML_DEPTH} levels")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except YAMLLimitError as exc:
        raise RecipeError(f"--set {_shorten(text)}: {exc}") from None
    except yaml.YAMLError:
        value = raw
    return path.split("."), value


def _shorten(text: str, limit: int = 60) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


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


def _union_tags(annotation) -> dict[str, Optional[type[BaseModel]]]:
    """The tags of a tagged union inside `annotation` (pydantic puts them in error locations), each with
    the section model it stands for (None for a plain value)."""
    tags: dict[str, Optional[type[BaseModel]]] = {}
    for arg in get_args(annotation):
        tag = next((m.tag for m in getattr(arg, "__metadata__", ()) if isinstance(m, Tag)), None)
        if tag is not None:
            inner = get_args(arg)[0]
            tags[tag] = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
        else:
            tags.update(_union_tags(arg))
    return tags


def _key_path(loc: tuple) -> tuple[tuple, Optional[type[BaseModel]]]:
    """An error location without pydantic's union tags (('method', 'dkd', 'x') -> ('method', 'x')),
    and the section model it ends in (None past the sections)."""
    model, path, parts = Recipe, [], list(loc)
    while parts:
        part = parts.pop(0)
        path.append(part)
        field = model.model_fields.get(str(part)) if model is not None else None
        annotation = getattr(field, "annotation", None)
        tags = _union_tags(annotation)
        if field is not None and field.discriminator and parts and str(parts[0]) in METHOD_SETTINGS:
            model = METHOD_SETTINGS[str(parts.pop(0))]
        elif parts and str(parts[0]) in tags:  # a tagged union's tag ('values' of a normalization mapping)
            model = tags[str(parts.pop(0))]
        else:
            model = _section_model(annotation)
    return tuple(path), model


def _section_model(annotation) -> Optional[type[BaseModel]]:
    """The section model an annotation holds (`Section` or `Optional[Section]`), or None."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _not_for_method(path: tuple, section: Optional[type[BaseModel]]) -> Optional[str]:
    """The refusal of another method's setting in the method section ("has no effect for ..."), or None."""
    owners = [name for name, cls in METHOD_SETTINGS.items() if str(path[-1]) in cls.model_fields]
    if path[:-1] != ("method",) or not owners or section is None:
        return None
    chosen = section.model_fields["name"].default
    return (f"method.{path[-1]} has no effect for method.name {chosen} (a setting of method "
            f"{' / '.join(owners)}); remove it, or keep it under methods.<name>")


def _describe(error: dict) -> str:
    loc = tuple(error["loc"])
    path, _ = _key_path(loc)
    key = ".".join(str(p) for p in path) or "(top level)"
    if error["type"] == "extra_forbidden":
        _, section = _key_path(loc[:-1])
        known = list(section.model_fields) if section else []
        return _not_for_method(path, section) or f"unknown key {key}{closest(path[-1], known)}"
    if not path:  # a check across sections: its message names the keys
        return error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    value = error.get("input")
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error" and isinstance(value, dict):  # a section's check across its keys names them
        return f"{key + '.' if path else ''}{message}"
    if loc and loc[-1] == "[key]" and error["type"] == "literal_error":  # a mapping whose keys are a fixed set
        choices = re.findall(r"'([^']*)'", error["ctx"]["expected"])
        return f"unknown key {key.removesuffix('.[key]')}{closest(path[-2], choices)}; known: {', '.join(choices)}"
    if error["type"] == "union_tag_invalid" and path == ("method",):
        tag = error["ctx"]["tag"]
        return f"{key}.name: unknown method {tag!r}{closest(tag, METHOD_SETTINGS)}; known: {', '.join(sorted(METHOD_SETTINGS))}"
    message = f"{key}: {message[:1].lower() + message[1:]}"
    if isinstance(value, (dict, list)):  # a check over a section: the message says what is wrong
        return message
    shown = repr(value)
    return f"{message} (got {shown if len(shown) <= 60 else shown[:57] + '...'})"


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
        raise RecipeError(f"{source}: {validation_message(exc, _describe)}") from exc


def check_input_file(path: Path, what: str) -> None:
    """RecipeError naming `path` unless it is a regular file this process can read (never opens a FIFO)."""
    if not path.exists():
        raise RecipeError(f"{what} not found: {path}" + (" (a broken link)" if path.is_symlink() else ""))
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "a FIFO" if path.is_fifo() else "a device or socket"
        raise RecipeError(f"{what} {path} is not a regular file (it is {kind})")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise RecipeError(f"{what} {path} is not readable ({exc.strerror or exc})") from None


def load_recipe(path: str | os.PathLike, overrides=()) -> Recipe:
    """Read, interpolate, override and validate a YAML recipe file."""
    return recipe_from_dict(read_yaml_file(path, "recipe"), str(path), overrides)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what a run directory keeps)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe atomically."""
    from kdtool.io import write_text_atomic

    write_text_atomic(Path(path), dump_recipe(recipe))
