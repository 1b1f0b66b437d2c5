"""The layout of a deploy bundle, in one place: file names, the manifest (one pydantic model, written by
export and read by bench and `export --rebuild`), the reference set, ownership, the lock, finding bundles.

    export/<name>/
      manifest.json                  the Manifest below (format kdtool-bundle, version 2)
      recipe.yaml                    the resolved recipe of the run (with `--set export.*` overrides)
      model.fp32.onnx                float32, dynamic batch             target: onnxruntime (any provider)
      model.fp16.onnx                float16 compute, float32 I/O       target: onnxruntime-gpu (CUDA/TensorRT EP)
      model.int8.onnx                U8S8 Q/DQ, reduce_range per CPU    target: onnxruntime-cpu
      model.int8_trt.onnx            symmetric INT8 Q/DQ, zero points 0 target: tensorrt (builder, ORT TensorRT EP)
      model.trt_fp16.engine          TensorRT engines (--trt), for the TensorRT version and GPU they were built on
      model.trt_int8.engine
      tensorrt.timing.cache
      reference/{images,labels,teacher_logits,student_logits}.npy   the reference set
      report.{json,md,png}           written by `kdtool bench`
    export/.<name>.lock              held (flock) by the kdtool process exporting or benching the bundle
    export/.<name>.XXXXXXXX.partial  a bundle being written (renamed into place when complete)
    export/.<name>.XXXXXXXX.old      the bundle being replaced, for the instant of the swap

export and bench import this module; it imports nothing of theirs. Arrays are .npy files read with
allow_pickle=False, so no file of a bundle can run code when read.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal, Optional, Union

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdtool.errors import KdtoolError
from kdtool.io import atomic_path, check_replaceable, sha256_file

FORMAT_NAME = "kdtool-bundle"
FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
RECIPE_FILE = "recipe.yaml"
TIMING_CACHE_FILE = "tensorrt.timing.cache"
REPORT_FILES = ("report.json", "report.md", "report.png")
STAGING_MARKER = ".kdtool-bundle-staging"  # inside a .partial directory until it becomes the bundle
PREPROCESSING = "uint8 /255 then (x-mean)/std"
MAX_MANIFEST_BYTES = 16 << 20
REFERENCE_DIR = "reference"
REFERENCE_ARRAYS = ("images", "labels", "teacher_logits", "student_logits")
REFERENCE_BUDGET_BYTES = 64 << 20  # ~400 ImageNet-sized (224x224) images with 1000-class logits


@dataclass(frozen=True)
class ArtefactSpec:
    file: str
    precision: str
    kind: str  # "onnx" or "tensorrt"
    target: str  # the runtime it is made for


# key -> what the artefact is; a manifest entry whose precision, kind or target differs is refused
ARTEFACTS = {
    "fp32": ArtefactSpec("model.fp32.onnx", "fp32", "onnx", "onnxruntime"),
    "fp16": ArtefactSpec("model.fp16.onnx", "fp16", "onnx", "onnxruntime-gpu"),
    "int8": ArtefactSpec("model.int8.onnx", "int8", "onnx", "onnxruntime-cpu"),
    "int8_trt": ArtefactSpec("model.int8_trt.onnx", "int8", "onnx", "tensorrt"),
    "trt_fp16": ArtefactSpec("model.trt_fp16.engine", "fp16", "tensorrt", "tensorrt"),
    "trt_int8": ArtefactSpec("model.trt_int8.engine", "int8", "tensorrt", "tensorrt"),
}
ENGINE_SOURCES = {"trt_fp16": "fp16", "trt_int8": "int8_trt"}  # engine key -> the ONNX artefact it is built from
TARGETS = {
    "onnxruntime": "ONNX Runtime, any execution provider",
    "onnxruntime-cpu": "ONNX Runtime on CPUs (U8S8 integer kernels)",
    "onnxruntime-gpu": "ONNX Runtime with the CUDA or TensorRT execution provider",
    "tensorrt": "TensorRT (the engine builder, native TensorRT, ONNX Runtime's TensorRT execution provider)",
}


class BundleMismatch(KdtoolError):
    """An artefact does not fit what its manifest says (tensor names, shapes, engine target): exit 2."""


# ------------------------------------------------------------------ names and paths
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_plain_name(name: str, what: str) -> str:
    """`name` if it is one path component that cannot escape the directory it is put in, else KdtoolError."""
    if not isinstance(name, str) or not _COMPONENT.fullmatch(name):
        raise KdtoolError(f"{what} {name!r} must be a plain name: up to 128 letters, digits, '_', '.', '-', "
                          f"starting with a letter or digit (no path separators, not '.' or '..')")
    return name


def _inside_bundle(value: str) -> str:
    parts = PurePosixPath(value).parts
    if not 1 <= len(parts) <= 2 or any(not _COMPONENT.fullmatch(part) for part in parts) or "\\" in value:
        raise ValueError("must be a relative path inside the bundle (at most one folder, plain names, no '..')")
    return value


BundlePath = Annotated[str, AfterValidator(_inside_bundle)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Text = Annotated[str, Field(max_length=4096)]
Count = Annotated[int, Field(ge=0, le=1 << 40)]
Positive = Annotated[int, Field(ge=1, le=1 << 31)]


def bundle_dir_for(root: str | Path, name: str) -> Path:
    """`root/name`, the bundle directory a recipe names; KdtoolError when the name could escape `root`."""
    if ".." in Path(root).parts:
        raise KdtoolError(f"export.root {str(root)!r} must not contain '..'")
    return Path(root) / check_plain_name(name, "bundle name (export.name or the recipe name)")


def bundle_file(bundle_dir: Path, relative: str, what: str) -> Path:
    """The file `relative` inside `bundle_dir`, refused when it is a symlink or resolves outside the bundle."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / relative
    for part in [path, *list(path.parents)[: len(PurePosixPath(relative).parts) - 1]]:
        if part.is_symlink():
            raise KdtoolError(f"{what} {path} is a symbolic link; a bundle holds its own files")
    if not path.resolve().is_relative_to(bundle_dir.resolve()):
        raise KdtoolError(f"{what} {path} is outside the bundle {bundle_dir}")
    return path


# ------------------------------------------------------------------ the manifest model
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class FormatInfo(_Model):
    name: Literal["kdtool-bundle"]
    version: int

    @model_validator(mode="after")
    def _supported(self):
        if self.version != FORMAT_VERSION:
            raise ValueError(f"bundle format version {self.version} is not the one this kdtool reads "
                             f"({FORMAT_VERSION}); export the bundle again")
        return self


class ModelInfo(_Model):
    name: Text
    num_classes: Positive
    teacher: Text


class Preprocessing(_Model):
    image_size: Annotated[int, Field(ge=1, le=8192)]
    height: Positive
    width: Positive
    layout: Literal["NCHW"]
    channels: Literal["RGB"]
    dtype: Literal["float32"]
    pipeline: Literal["uint8 /255 then (x-mean)/std"]
    scale: Annotated[float, Field(gt=0.0039215, lt=0.0039216)]  # 1/255
    mean: tuple[float, float, float]
    std: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]
    class_names: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(min_length=1, max_length=1 << 20)]
    normalization: Optional[Annotated[str, Field(max_length=1024)]] = None  # why this mean/std ('dataset', the weights)

    @model_validator(mode="after")
    def _square(self):
        if not self.height == self.width == self.image_size:
            raise ValueError(f"height {self.height} and width {self.width} must equal image_size {self.image_size}")
        return self


TensorName = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.:/-]+$")]


class InputSpec(_Model):
    name: TensorName
    shape: tuple[Literal["batch"], Literal[3], Positive, Positive]
    dtype: Literal["float32"]


class OutputSpec(_Model):
    name: TensorName
    shape: tuple[Literal["batch"], Positive]
    dtype: Literal["float32"]


class Provenance(_Model):
    run_dir: Text  # where the bundle was exported from (informational: bench needs only the bundle)
    recipe: Literal["recipe.yaml"]
    recipe_sha256: Sha256
    checkpoint: Text
    checkpoint_sha256: Sha256
    exporter: Text


class Calibration(_Model):
    images: Positive
    split: Literal["train"]
    selection: Text
    indices: Annotated[list[Count], Field(max_length=1 << 20)]
    transform: Text
    method: Literal["minmax", "entropy", "percentile"]


class Quantization(_Model):
    """How one INT8 artefact was quantised, and on which numerics its accuracy was judged."""

    scheme: Literal["u8s8", "s8s8-symmetric"]
    activation_type: Literal["uint8", "int8"]
    weight_type: Literal["int8"]
    per_channel: bool
    symmetric: bool
    reduce_range: bool
    reduce_range_reason: Text
    op_types: Optional[list[Text]] = None  # None: every op ONNX Runtime's quantiser handles
    numerics: Literal["onnxruntime-cpu-kernels", "emulated-float"]


class Figures(_Model):
    max_abs_diff: float
    min_cosine: float
    top1_agreement: float


class Tolerances(_Model):
    max_abs_diff: float
    min_cosine: float
    min_top1_agreement: float


class LogitCheck(_Model):
    images: Positive
    reference: Text
    tolerances: Tolerances
    batch_sizes: Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,6}$")], Figures], Field(min_length=1)]


class VsPytorch(Figures):
    images: Positive


class AccuracyCheck(_Model):
    split: Text
    images: Positive
    numerics: Literal["onnxruntime-cpu-kernels", "emulated-float"]
    float_top1: float
    int8_top1: float
    top1_drop: float
    max_top1_drop: float


class SensitivityEntry(_Model):
    node: Text
    op_type: Text
    output_sqnr_db: float
    sqnr_lost_db: float


class FallbackStep(_Model):
    kept_in_float: list[Text]
    top1: float
    top1_drop: float


class Fallback(_Model):
    kept_in_float: list[Text]
    budget: Count
    sensitivity_top: list[SensitivityEntry]
    steps: list[FallbackStep]
    sensitivity_metric: Text


class Int8Check(_Model):
    vs_pytorch: VsPytorch
    accuracy: AccuracyCheck
    fallback: Fallback


Unverified = Annotated[str, Field(pattern=r"^unverified: ", max_length=4096)]
Verification = Union[LogitCheck, Int8Check, Unverified]


class BatchProfile(_Model):
    min: Positive
    opt: Positive
    max: Positive

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min <= self.opt <= self.max:
            raise ValueError("needs min <= opt <= max")
        return self


class EngineInfo(_Model):
    """What an engine was built for and with; checked against the machine before it is deserialised."""

    tensorrt_version: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+){1,3}$")]
    gpu: Text
    compute_capability: Annotated[str, Field(pattern=r"^[0-9]{1,2}\.[0-9]{1,2}$")]
    network: Literal["strongly typed"]
    batch_profile: BatchProfile
    workspace_mib: Positive


class FileEntry(_Model):
    file: BundlePath
    sha256: Sha256
    size_bytes: Count


class Artefact(FileEntry):
    precision: Literal["fp32", "fp16", "int8"]
    kind: Literal["onnx", "tensorrt"]
    target: Literal["onnxruntime", "onnxruntime-cpu", "onnxruntime-gpu", "tensorrt"]
    verification: Verification
    quantization: Optional[Quantization] = None
    source: Optional[BundlePath] = None
    engine: Optional[EngineInfo] = None
    timing_cache: Optional[BundlePath] = None

    @model_validator(mode="after")
    def _consistent(self):
        suffix = ".onnx" if self.kind == "onnx" else ".engine"
        if not self.file.endswith(suffix):
            raise ValueError(f"a {self.kind} artefact's file must end in {suffix}, got {self.file!r}")
        if (self.kind == "tensorrt") != (self.engine is not None and self.source is not None):
            raise ValueError("engine and source are given for TensorRT engines, and only for them")
        if (self.kind == "onnx" and self.precision == "int8") != (self.quantization is not None):
            raise ValueError("quantization is given for INT8 ONNX artefacts, and only for them")
        return self


class ReferenceSet(_Model):
    """Validation images (uint8, as `preprocessing` expects), labels, teacher and float-student logits."""

    count: Positive
    split: Text
    selection: Text
    images: FileEntry
    labels: FileEntry
    teacher_logits: FileEntry
    student_logits: FileEntry


ArtefactKey = Literal["fp32", "fp16", "int8", "int8_trt", "trt_fp16", "trt_int8"]


class Manifest(_Model):
    """manifest.json: everything a deployer or `kdtool bench` needs to use the bundle (export/README.md)."""

    format: FormatInfo
    created: Text
    model: ModelInfo
    preprocessing: Preprocessing
    opset: Annotated[int, Field(ge=17, le=20)]
    input: InputSpec
    output: OutputSpec
    provenance: Provenance
    calibration: Optional[Calibration]
    reference: ReferenceSet
    versions: dict[Annotated[str, Field(max_length=64)], Text]
    artefacts: Annotated[dict[ArtefactKey, Artefact], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self):
        size, classes = self.preprocessing.image_size, self.model.num_classes
        if self.input.shape[2:] != (size, size):
            raise ValueError(f"input.shape {list(self.input.shape)} does not match preprocessing.image_size {size}")
        if not self.output.shape[1] == classes == len(self.preprocessing.class_names):
            raise ValueError(f"output.shape {list(self.output.shape)}, model.num_classes {classes} and "
                             f"{len(self.preprocessing.class_names)} class_names disagree")
        for key, entry in self.artefacts.items():
            spec = ARTEFACTS[key]
            if (entry.precision, entry.kind, entry.target) != (spec.precision, spec.kind, spec.target):
                raise ValueError(f"artefacts.{key} must be precision {spec.precision}, kind {spec.kind}, target "
                                 f"{spec.target} (got {entry.precision}, {entry.kind}, {entry.target})")
            if key in ENGINE_SOURCES and entry.source != self.artefacts.get(ENGINE_SOURCES[key], entry).file:
                raise ValueError(f"artefacts.{key}.source must be the file of artefacts.{ENGINE_SOURCES[key]}")
        return self

    def dump(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    return f"{where}: {error['msg']}"


def read_manifest(bundle_dir: Path) -> Manifest:
    """The validated manifest of `bundle_dir`; KdtoolError naming the file and the first key that does not fit."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise KdtoolError(f"bundle directory not found: {bundle_dir}")
    path = bundle_file(bundle_dir, MANIFEST_FILE, "bundle manifest")
    if not path.is_file():
        raise KdtoolError(f"bundle manifest not found: {path} (is {bundle_dir} an export bundle?)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise KdtoolError(f"bundle manifest {path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise KdtoolError(f"bundle manifest {path} does not fit the kdtool bundle format: {_first_error(exc)}") from None


def write_manifest(bundle_dir: Path, manifest: Manifest) -> None:
    with atomic_path(Path(bundle_dir) / MANIFEST_FILE) as tmp:
        tmp.write_text(manifest.dump(), encoding="utf-8")


def check_file(bundle_dir: Path, entry: FileEntry, what: str) -> Path:
    """The path of `entry`, present and of the size and sha256 the manifest says; KdtoolError otherwise."""
    path = bundle_file(bundle_dir, entry.file, what)
    if not path.is_file():
        raise KdtoolError(f"{what} listed in {Path(bundle_dir) / MANIFEST_FILE} is missing: {path}")
    if path.stat().st_size != entry.size_bytes:
        raise KdtoolError(f"{what} {path} is {path.stat().st_size} bytes, the manifest says {entry.size_bytes} "
                          f"(truncated or replaced; export the bundle again)")
    if sha256_file(path) != entry.sha256:
        raise KdtoolError(f"{what} {path} does not match the sha256 in the manifest (replaced? export the bundle again)")
    return path


def file_entry(bundle_dir: Path, relative: str) -> dict:
    """file, sha256 and size_bytes of a file kdtool just wrote into `bundle_dir`."""
    path = Path(bundle_dir) / relative
    return {"file": relative, "sha256": sha256_file(path), "size_bytes": path.stat().st_size}


# ------------------------------------------------------------------ the reference set
@dataclass(frozen=True)
class Reference:
    """The arrays of a reference set, checked against the manifest."""

    images: np.ndarray  # uint8 (N, 3, H, W)
    labels: np.ndarray  # int64 (N,)
    teacher_logits: np.ndarray  # float32 (N, C)
    student_logits: np.ndarray  # float32 (N, C)
    description: str

    def preprocessed(self, start: int, stop: int, pre: Preprocessing) -> np.ndarray:
        """Images [start, stop) as the models take them: uint8 /255, then (x - mean) / std, float32."""
        mean = np.asarray(pre.mean, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(pre.std, np.float32).reshape(1, 3, 1, 1)
        return ((self.images[start:stop].astype(np.float32) / 255 - mean) / std).astype(np.float32)


def reference_count(requested: int, available: int, image_size: int, num_classes: int,
                    budget_bytes: int = REFERENCE_BUDGET_BYTES) -> int:
    """How many reference images a bundle carries: as requested, within the validation set and the byte budget."""
    per_image = 3 * image_size * image_size + 8 + 2 * 4 * num_classes
    return max(1, min(requested, available, budget_bytes // per_image))


def write_reference(staging: Path, arrays: dict[str, np.ndarray], split: str, selection: str) -> dict:
    """Save the reference arrays into `staging`/reference/; returns the manifest's `reference` entry."""
    (Path(staging) / REFERENCE_DIR).mkdir(exist_ok=True)
    entry = {"count": int(len(arrays["labels"])), "split": split, "selection": selection}
    for name in REFERENCE_ARRAYS:
        relative = f"{REFERENCE_DIR}/{name}.npy"
        np.save(Path(staging) / relative, np.ascontiguousarray(arrays[name]), allow_pickle=False)
        entry[name] = file_entry(staging, relative)
    return entry


def _load_array(bundle_dir: Path, entry: FileEntry, name: str, dtype, shape: tuple) -> np.ndarray:
    path = check_file(bundle_dir, entry, f"reference array {name}")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise KdtoolError(f"reference array {path} is not a plain .npy array: {str(exc).splitlines()[0]}") from None
    if array.dtype != dtype or array.shape != shape:
        raise KdtoolError(f"reference array {path} is {array.dtype} {list(array.shape)}, expected "
                          f"{np.dtype(dtype)} {list(shape)}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise KdtoolError(f"reference array {path} holds NaN or infinite values")
    return array


def read_reference(bundle_dir: Path, manifest: Manifest) -> Reference:
    """The bundle's reference set, every array checked (hash, dtype, shape, label range, finiteness)."""
    ref, size, classes = manifest.reference, manifest.preprocessing.image_size, manifest.model.num_classes
    n = ref.count
    labels = _load_array(bundle_dir, ref.labels, "labels", np.int64, (n,))
    if labels.min() < 0 or labels.max() >= classes:
        raise KdtoolError(f"reference array {Path(bundle_dir) / ref.labels.file} has labels outside 0..{classes - 1}")
    return Reference(
        images=_load_array(bundle_dir, ref.images, "images", np.uint8, (n, 3, size, size)),
        labels=labels,
        teacher_logits=_load_array(bundle_dir, ref.teacher_logits, "teacher_logits", np.float32, (n, classes)),
        student_logits=_load_array(bundle_dir, ref.student_logits, "student_logits", np.float32, (n, classes)),
        description=f"the bundle's reference set: {n} {ref.split} images ({ref.selection})",
    )


# ------------------------------------------------------------------ ownership, the lock, leftovers
def is_bundle(directory: Path) -> bool:
    """Whether `directory` is a real directory holding a manifest kdtool wrote (format kdtool-bundle, any version)."""
    directory = Path(directory)
    manifest = directory / MANIFEST_FILE
    if directory.is_symlink() or not directory.is_dir() or manifest.is_symlink() or not manifest.is_file():
        return False
    try:
        if manifest.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        data = json.loads(manifest.read_text(encoding="utf-8"))
        return isinstance(data, dict) and isinstance(data.get("format"), dict) and data["format"].get("name") == FORMAT_NAME
    except (OSError, ValueError, RecursionError):
        return False


def check_bundle_target(target: Path) -> None:
    """KdtoolError unless `target` may become (or be replaced as) a bundle: absent, empty, or a kdtool bundle.

    Never the working directory, its parents, the home directory, `/`, or a symlink (kdtool.io.check_replaceable).
    """
    target = Path(target)
    check_replaceable(target, MANIFEST_FILE, "bundle")
    if target.is_dir() and any(target.iterdir()) and not is_bundle(target):
        raise KdtoolError(f"refusing to replace {target}: its {MANIFEST_FILE} is not a kdtool bundle manifest; "
                          f"choose another directory or remove it yourself")


def lock_file(bundle_dir: Path) -> Path:
    """The lock file of a bundle: beside it, so that it survives the bundle being replaced."""
    bundle_dir = Path(bundle_dir)
    return bundle_dir.parent / f".{bundle_dir.name}.lock"


@contextlib.contextmanager
def bundle_lock(bundle_dir: Path):
    """Hold the bundle's lock (export and bench both take it); refuse at once when another process holds it."""
    path = lock_file(bundle_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise KdtoolError(f"cannot create the bundle lock {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KdtoolError(f"bundle {bundle_dir} is in use by another kdtool process (export or bench)") from None
        yield
    finally:
        os.close(fd)


def _leftover_pattern(name: str) -> re.Pattern:
    # kdtool.io.staging_dir: mkdtemp(prefix=".<name>.", suffix=".partial"); the swap renames the old one to .old
    return re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.(partial|old)")


def clean_leftovers(bundle_dir: Path) -> list[Path]:
    """Remove the .partial/.old directories killed writes of this bundle left (call with the lock held).

    Only real directories named as kdtool names them and holding kdtool's staging marker or a kdtool
    manifest (or nothing) are removed; returns them.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.parent.is_dir():
        return []
    pattern = _leftover_pattern(bundle_dir.name)
    removed = []
    for path in bundle_dir.parent.iterdir():
        if not pattern.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        if not any(path.iterdir()) or (path / STAGING_MARKER).is_file() or is_bundle(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def find_latest_bundle(root: Path = Path("export")) -> Path:
    """The most recently written bundle under `root` (hidden leftovers and symlinks are never picked)."""
    root = Path(root)
    candidates = [] if not root.is_dir() else [
        path for path in root.iterdir() if not path.name.startswith(".") and is_bundle(path)
    ]
    if not candidates:
        raise KdtoolError(f"no bundle (a directory with a kdtool {MANIFEST_FILE}) under {root}/; run `kdtool export` first")
    return max(candidates, key=lambda path: (path / MANIFEST_FILE).stat().st_mtime)


def made_from(bundle_dir: Path, run_dir: Path) -> bool:
    """Whether the bundle in `bundle_dir` was exported from `run_dir` (its provenance names that run)."""
    try:
        data = json.loads((Path(bundle_dir) / MANIFEST_FILE).read_text(encoding="utf-8")) if is_bundle(bundle_dir) else {}
        return Path(data["provenance"]["run_dir"]) == Path(run_dir).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return False
