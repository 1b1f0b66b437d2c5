"""The manifest of a bundle (manifest.json, format kdtool-bundle version 3): one pydantic model, written by
export and read by bench and `export --rebuild`; the keys, precisions, kinds and targets of its artefacts
come from the artefact table (kdtool.bundle.artefacts). export/README.md documents every key.

A manifest of another format version is refused in one line naming the kdtool that wrote it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdtool.bundle.artefacts import ARTEFACTS, ENGINE_SOURCES, FILE_SUFFIXES, FORMATS, PRECISIONS, TARGETS
from kdtool.bundle.layout import FORMAT_NAME, MANIFEST_FILE, MAX_MANIFEST_BYTES, bundle_file, check_inside_bundle
from kdtool.errors import KdtoolError, validation_message
from kdtool.io import atomic_path, sha256_file

FORMAT_VERSION = 3  # 2 -> 3: targets name devices (any, cpu, gpu, tensorrt) instead of ONNX Runtime builds
PREPROCESSING = "uint8 /255 then (x-mean)/std"

BundlePath = Annotated[str, AfterValidator(check_inside_bundle)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Text = Annotated[str, Field(max_length=4096)]
Count = Annotated[int, Field(ge=0, le=1 << 40)]
Positive = Annotated[int, Field(ge=1, le=1 << 31)]
ArtefactKey = Literal[tuple(ARTEFACTS)]
Precision = Literal[PRECISIONS]
Format = Literal[FORMATS]
Target = Literal[tuple(TARGETS)]


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
    precision: Precision
    kind: Format
    target: Target
    verification: Verification
    quantization: Optional[Quantization] = None
    source: Optional[BundlePath] = None
    engine: Optional[EngineInfo] = None
    timing_cache: Optional[BundlePath] = None

    @model_validator(mode="after")
    def _consistent(self):
        suffix = FILE_SUFFIXES[self.kind]
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
            if (entry.precision, entry.kind, entry.target) != (spec.precision, spec.format, spec.target):
                raise ValueError(f"artefacts.{key} must be precision {spec.precision}, kind {spec.format}, target "
                                 f"{spec.target} (got {entry.precision}, {entry.kind}, {entry.target})")
            if key in ENGINE_SOURCES and entry.source != self.artefacts.get(ENGINE_SOURCES[key], entry).file:
                raise ValueError(f"artefacts.{key}.source must be the file of artefacts.{ENGINE_SOURCES[key]}")
        return self

    def dump(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def _other_format_version(raw: bytes) -> str | None:
    """'format version N, written by kdtool V' when `raw` is a kdtool manifest of another version, else None."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None  # not JSON: the schema's error names it
    if not isinstance(data, dict) or not isinstance(data.get("format"), dict):
        return None
    version, versions = data["format"].get("version"), data.get("versions")
    if data["format"].get("name") != FORMAT_NAME or type(version) is not int or version == FORMAT_VERSION:
        return None  # this version, or not a version: the schema's error names it
    writer = versions.get("kdtool") if isinstance(versions, dict) else None
    writer = f"kdtool {str(writer)[:64]}" if writer else "a kdtool that recorded no version"
    return f"format version {str(version)[:32]}, written by {writer}"


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
    raw = path.read_bytes()
    written_by = _other_format_version(raw)
    if written_by:
        raise KdtoolError(f"bundle manifest {path} is {written_by}; this kdtool reads format version {FORMAT_VERSION}: "
                          f"export the bundle again with this kdtool (or bench it with the kdtool that wrote it)")
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as exc:
        raise KdtoolError(f"bundle manifest {path} does not fit the kdtool bundle format: {validation_message(exc)}") from None


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


