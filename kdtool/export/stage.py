"""The export stage: a run's best student -> a verified, self-describing, portable deploy bundle.

A bundle is written into a staging directory and renamed into place at the end, so a bundle directory
that exists is complete; the bundle's lock is held throughout (bench takes the same lock). The artefact
table, the layout and the manifest model live in the `kdtool.bundle` package; `export/README.md`
documents every manifest key.
`rebuild_engines` needs only the bundle: its ONNX sources, its recipe and its manifest.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch

from kdtool import bundle
from kdtool.bundle import (
    ARTEFACTS, ENGINE_SOURCES, MANIFEST_FILE, STAGING_MARKER, TIMING_CACHE_FILE, Manifest, bundle_lock,
    check_bundle_target, check_file, clean_leftovers, file_entry, is_bundle, read_manifest, write_manifest,
)
from kdtool.data import DataInfo, Datasets, build_datasets
from kdtool.errors import CheckFailed, KdtoolError
from kdtool.evaluate import topk_accuracy
from kdtool.export.images import PREPROCESSING, ValidationBatches, calibration_set, first_images, preprocess
from kdtool.export.onnx_export import (
    BATCH_DIM, EXPORTER, INPUT_NAME, OUTPUT_NAME, compare_logits, export_onnx, torch_logits, verify_logits,
)
from kdtool.export.quantize import (
    QuantScheme, choose_reduce_range, convert_fp16, cpu_flags, cpu_scheme, quantize_with_fallback, tensorrt_qdq_violations,
    tensorrt_scheme,
)
from kdtool.export.runner import ort_session, run_batched
from kdtool.export.tensorrt import build_engine, require_tensorrt
from kdtool.io import sha256_file, staging_dir
from kdtool.preprocess import normalization_plan, with_normalization
from kdtool.recipe import Recipe, dump_recipe, load_recipe
from kdtool.rundir import RECIPE_FILE, best_checkpoint, find_latest_run, load_student, load_teacher  # noqa: F401
from kdtool.rundir import run_recipe as _run_recipe

INT8_SCHEMES = {"int8": "cpu", "int8_trt": "tensorrt"}  # artefact key -> scheme

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ finding things
def run_recipe(run_dir: Path, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe a run was made with, with ``export.*`` overrides applied."""
    outside = [text for text in overrides if not text.startswith("export.")]
    if outside:
        raise KdtoolError(f"--set {outside[0]!r}: export may only override keys under export.")
    return _run_recipe(run_dir, overrides)


def bundle_dir_for(recipe: Recipe) -> Path:
    """The bundle directory a recipe names: export.root / (export.name or the recipe name), never outside the root."""
    return bundle.bundle_dir_for(recipe.export.root, recipe.export.name or recipe.name)


def _check_writable(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KdtoolError(f"cannot create the bundle directory {target}: {exc.strerror}") from None
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise KdtoolError(f"cannot write the bundle directory {target}: {target.parent} is not writable")


def _reporter(progress: bool):
    def say(message: str) -> None:
        if progress:
            log.info("[export] %s", message)
    return say


# ------------------------------------------------------------------ the stage
def export_bundle(run_dir: Path, *, out: Path | None = None, trt: bool = False, overwrite: bool = False,
                  rebuild: bool = False, progress: bool = True, overrides: Sequence[str] = ()) -> Path:
    """Export the run's best student to a verified, portable bundle; returns the bundle directory.

    `overrides` are ``export.key=value`` strings applied to the run's recipe. With `rebuild` and an
    existing bundle, only its TensorRT engines are rebuilt for this machine (`rebuild_engines`).
    An existing directory is replaced only with `overwrite`, and only if it is a kdtool bundle.
    """
    run_dir = Path(run_dir)
    recipe = run_recipe(run_dir, overrides)
    target = Path(out) if out is not None else bundle_dir_for(recipe)
    if rebuild and is_bundle(target):
        return rebuild_engines(target, overrides=overrides, progress=progress)
    check_bundle_target(target)
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise KdtoolError(f"bundle directory {target} exists; pass --overwrite to replace it")
    checkpoint = best_checkpoint(run_dir)
    _check_writable(target)
    if trt:
        require_tensorrt()  # before minutes of work, not after
    say = _reporter(progress)
    with bundle_lock(target):
        clean_leftovers(target)
        datasets = build_datasets(recipe.data)
        model = load_student(run_dir, recipe, datasets.info)
        teacher = load_teacher(run_dir, recipe, datasets.info)  # takes the student's inputs
        normalization = normalization_plan(recipe, datasets.info).student
        student_data = replace(datasets, info=with_normalization(datasets.info, normalization))
        with staging_dir(target, overwrite=overwrite) as staging:
            (staging / STAGING_MARKER).touch()
            artefacts, calibration = _onnx_artefacts(staging, model, student_data, recipe, say)
            reference = _reference_set(staging, model, teacher, student_data, recipe, say)
            if trt:
                artefacts.update(_engines(staging, artefacts, recipe, student_data.info.image_size, say))
            (staging / RECIPE_FILE).write_text(dump_recipe(recipe))
            manifest = _manifest(recipe, student_data.info, normalization.why, run_dir, checkpoint, calibration,
                                 reference, _with_files(staging, artefacts), trt)
            write_manifest(staging, manifest)
            (staging / STAGING_MARKER).unlink()
    say(f"bundle written to {target}")
    return target


def _onnx_artefacts(staging: Path, model: torch.nn.Module, datasets: Datasets, recipe: Recipe, say) -> tuple[dict, dict | None]:
    """FP32, INT8 (CPU and TensorRT) and FP16 ONNX models, each verified; returns (artefacts, calibration)."""
    cfg, info = recipe.export, datasets.info
    validation = ValidationBatches(datasets.val, info, recipe.data)
    images, _ = validation.head(cfg.verify_images)
    reference = torch_logits(model, images)
    say(f"exporting ONNX (opset {cfg.opset}) and checking it against PyTorch at batch sizes {cfg.verify_batch_sizes}")
    fp32 = staging / ARTEFACTS["fp32"].file
    export_onnx(model, fp32, image_size=info.image_size, opset=cfg.opset)
    artefacts = {"fp32": {"verification": verify_logits(
        "FP32 ONNX", ort_session(fp32), images, reference, batch_sizes=cfg.verify_batch_sizes,
        max_abs_diff=cfg.max_abs_diff, min_cosine=cfg.min_cosine, min_top1_agreement=cfg.min_top1_agreement)}}
    calibration = None
    if cfg.int8.enabled:
        calibration_images = calibration_set(datasets.train, info, cfg.int8.calibration_images, recipe.seed)
        float_top1 = topk_accuracy(*_float_logits(model, validation), ks=(1,))["top1"]
        reduce_range, reason = choose_reduce_range(cfg.int8.reduce_range, cpu_flags())
        for key, scheme in (("int8", cpu_scheme(reduce_range, reason)), ("int8_trt", tensorrt_scheme())):
            artefacts[key] = _int8_artefact(staging, key, scheme, calibration_images.images, validation, images,
                                            reference, float_top1, recipe, say)
        calibration = _calibration_description(calibration_images, cfg.int8.method)
    if cfg.fp16:
        say("converting to FP16 (float16 compute, float32 inputs/outputs)")
        convert_fp16(fp32, staging / ARTEFACTS["fp16"].file)
        artefacts["fp16"] = {"verification": _verify_fp16(staging / ARTEFACTS["fp16"].file, images, reference, recipe)}
    return artefacts, calibration


def _float_logits(model: torch.nn.Module, validation: ValidationBatches) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = [], []
    for batch_images, batch_labels in validation:
        logits.append(torch_logits(model, batch_images))
        labels.append(batch_labels)
    return np.concatenate(logits), np.concatenate(labels)


def _int8_artefact(staging: Path, key: str, scheme: QuantScheme, calibration: np.ndarray, validation: ValidationBatches,
                   images: np.ndarray, reference: np.ndarray, float_top1: float, recipe: Recipe, say) -> dict:
    int8_cfg = recipe.export.int8
    numerics = "emulated Q/DQ in float" if scheme.emulated else "ONNX Runtime CPU kernels"
    say(f"quantising to INT8 Q/DQ for {ARTEFACTS[key].target} ({scheme.name}) on {len(calibration)} training images "
        f"({int8_cfg.method}, per_channel={int8_cfg.per_channel}, reduce_range={scheme.reduce_range}); "
        f"judged on {numerics}; float top-1 {float_top1:.2f}%")
    path = staging / ARTEFACTS[key].file
    result = quantize_with_fallback(staging / ARTEFACTS["fp32"].file, path, calibration=calibration,
                                    validation=validation, input_name=INPUT_NAME, cfg=int8_cfg, scheme=scheme,
                                    float_top1=float_top1)
    say(f"{key} top-1 {result.int8_top1:.2f}% (drop {result.top1_drop:.2f} points, "
        f"{len(result.kept_in_float)} node(s) kept in float)")
    if scheme.symmetric:
        violations = tensorrt_qdq_violations(onnx.load(str(path)))
        if violations:
            raise CheckFailed(f"the {key} artefact breaks TensorRT's Q/DQ constraints: {violations[0]}")
    described = scheme.describe(int8_cfg.per_channel)
    versus = compare_logits(reference, run_batched(ort_session(path, emulated=scheme.emulated), images, 32))
    return {
        "quantization": described,
        "verification": {
            "vs_pytorch": {"images": int(len(images)), **versus},
            "accuracy": {"split": "val", "images": len(validation), "numerics": described["numerics"],
                         "float_top1": round(result.float_top1, 4), "int8_top1": round(result.int8_top1, 4),
                         "top1_drop": round(result.top1_drop, 4), "max_top1_drop": int8_cfg.max_top1_drop},
            "fallback": {"kept_in_float": result.kept_in_float, "budget": int8_cfg.fallback_budget,
                         "sensitivity_top": result.sensitivity, "steps": result.steps,
                         "sensitivity_metric": "SQNR (dB) lost across the node: worst dequantised-input SQNR - "
                                               "output SQNR, Q/DQ vs float activations on the calibration images"},
        },
    }


def _calibration_description(calibration, method: str) -> dict:
    return {"images": len(calibration.indices), "split": "train",
            "selection": f"seeded permutation of the training set (seed {calibration.seed}), first N, sorted",
            "indices": calibration.indices,
            "transform": f"the training transform with torch seeded to {calibration.seed}, then {PREPROCESSING}",
            "method": method}


def _verify_fp16(path: Path, images, reference, recipe: Recipe) -> dict | str:
    cfg = recipe.export
    try:
        session = ort_session(path)
    except KdtoolError as exc:
        return f"unverified: ONNX Runtime (CPU) cannot run it: {exc}"
    return verify_logits("FP16 ONNX", session, images, reference, batch_sizes=cfg.verify_batch_sizes,
                         max_abs_diff=cfg.fp16_max_abs_diff, min_cosine=cfg.fp16_min_cosine,
                         min_top1_agreement=cfg.fp16_min_top1_agreement)


def _reference_set(staging: Path, model: torch.nn.Module, teacher: torch.nn.Module, datasets: Datasets, recipe: Recipe,
                   say) -> dict:
    """The first N validation images (uint8), labels, teacher and float-student logits, saved into the bundle.
    `datasets.info` holds the student's normalisation, which both models take."""
    info = datasets.info
    count = bundle.reference_count(recipe.export.reference_images, len(datasets.val), info.image_size,
                                   info.num_classes)
    images, labels = first_images(datasets.val, recipe.data, count)
    inputs = preprocess(torch.from_numpy(images), info)
    arrays = {"images": images, "labels": labels,
              "teacher_logits": torch_logits(teacher, inputs).astype(np.float32),
              "student_logits": torch_logits(model, inputs).astype(np.float32)}
    say(f"reference set: {len(labels)} validation images with labels, teacher and float-student logits")
    return bundle.write_reference(staging, arrays, "val", f"the first {len(labels)} validation images in loader order")


# ------------------------------------------------------------------ TensorRT
def _engines(bundle_dir: Path, artefacts: dict, recipe: Recipe, image_size: int, say) -> dict:
    """Strongly typed TensorRT engines from the FP16 and TensorRT-INT8 ONNX artefacts, sharing one timing cache."""
    built = {}
    for key, source in ENGINE_SOURCES.items():
        if source not in artefacts:
            say(f"no {key} engine: the bundle has no {source} artefact")
            continue
        spec = ARTEFACTS[key]
        say(f"building TensorRT {spec.precision} engine (strongly typed) from {ARTEFACTS[source].file}")
        engine = build_engine(bundle_dir / ARTEFACTS[source].file, bundle_dir / spec.file, precision=spec.precision,
                              input_name=INPUT_NAME, image_size=image_size, cfg=recipe.export.tensorrt,
                              timing_cache=bundle_dir / TIMING_CACHE_FILE)
        built[key] = {"verification": "unverified: engines are checked on the GPU by `kdtool bench`",
                      "source": ARTEFACTS[source].file, "engine": engine, "timing_cache": TIMING_CACHE_FILE}
    if not built:
        raise KdtoolError("--trt: no engine to build (export.fp16 and export.int8.enabled are both off)")
    return built


def rebuild_engines(bundle_dir: Path, *, overrides: Sequence[str] = (), progress: bool = True) -> Path:
    """Rebuild a bundle's TensorRT engines for this machine from its own ONNX models, recipe and manifest
    (no run directory needed); `overrides` may change ``export.tensorrt.*``."""
    bundle_dir = Path(bundle_dir)
    outside = [text for text in overrides if not text.startswith("export.tensorrt.")]
    if outside:
        raise KdtoolError(f"--set {outside[0]!r}: --rebuild may only override keys under export.tensorrt.")
    require_tensorrt()
    say = _reporter(progress)
    check_bundle_target(bundle_dir)
    with bundle_lock(bundle_dir):
        clean_leftovers(bundle_dir)
        manifest = read_manifest(bundle_dir)
        recipe = _bundle_recipe(bundle_dir, manifest, overrides)
        onnx_keys = [key for key, entry in manifest.artefacts.items() if entry.kind == "onnx"]
        for key in onnx_keys:
            check_file(bundle_dir, manifest.artefacts[key], f"artefact {key!r}")
        with staging_dir(bundle_dir, overwrite=True) as staging:
            (staging / STAGING_MARKER).touch()
            copy_for_rebuild(bundle_dir, staging)
            (staging / RECIPE_FILE).write_text(dump_recipe(recipe))
            kept = {key: manifest.artefacts[key].model_dump(mode="json") for key in onnx_keys}
            engines = _engines(staging, kept, recipe, manifest.preprocessing.image_size, say)
            data = manifest.model_dump(mode="json")
            data["artefacts"] = {**kept, **_with_files(staging, engines)}
            data["versions"] = _versions(with_tensorrt=True)
            write_manifest(staging, _validated(data))
            (staging / STAGING_MARKER).unlink()
    say(f"engines rebuilt in {bundle_dir}")
    return bundle_dir


def copy_for_rebuild(bundle_dir: Path, staging: Path) -> None:
    """Everything of the bundle but its engines, manifest and recipe into `staging`: the ONNX sources, the
    reference set, and the timing cache, which the engine builds then reuse (TensorRT starts a fresh one when
    it was made on another GPU or TensorRT version: kdtool.export.tensorrt)."""
    bundle.bundle_file(bundle_dir, TIMING_CACHE_FILE, "TensorRT timing cache")  # never through a symlink
    shutil.copytree(bundle_dir, staging, dirs_exist_ok=True, symlinks=True,
                    ignore=shutil.ignore_patterns("*.engine", MANIFEST_FILE, RECIPE_FILE))


def _bundle_recipe(bundle_dir: Path, manifest: Manifest, overrides: Sequence[str]) -> Recipe:
    """The bundle's recipe.yaml, checked against the manifest's recipe_sha256, with `overrides` applied."""
    path = bundle.bundle_file(bundle_dir, RECIPE_FILE, "bundle recipe")
    if not path.is_file():
        raise KdtoolError(f"the bundle's recipe {path} is missing")
    if load_recipe(path).digest() != manifest.provenance.recipe_sha256:
        raise KdtoolError(f"{path} does not match provenance.recipe_sha256 in the manifest (edited? export again)")
    return load_recipe(path, overrides)


# ------------------------------------------------------------------ the manifest
def _with_files(bundle_dir: Path, artefacts: dict) -> dict:
    """Each artefact entry completed with its file, sha256, size, precision, kind and target."""
    complete = {}
    for key, entry in artefacts.items():
        spec = ARTEFACTS[key]
        complete[key] = {**file_entry(bundle_dir, spec.file), "precision": spec.precision, "kind": spec.format,
                         "target": spec.target, **{k: v for k, v in entry.items() if k not in ("file", "sha256", "size_bytes")}}
    return complete


def _versions(with_tensorrt: bool) -> dict:
    import onnx
    import onnxruntime

    versions = {"kdtool": metadata.version("kdtool"), "python": platform.python_version(), "torch": torch.__version__,
                "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if with_tensorrt:
        versions["tensorrt"] = require_tensorrt().__version__
    return versions


def _validated(data: dict) -> Manifest:
    """`data` read back through the manifest model, exactly as bench will read it (a bug here is not user input)."""
    return Manifest.model_validate_json(json.dumps(data))


def _manifest(recipe: Recipe, info: DataInfo, normalization: str, run_dir: Path, checkpoint: Path,
              calibration: dict | None, reference: dict, artefacts: dict, trt: bool) -> Manifest:
    size = info.image_size
    return _validated({
        "format": {"name": bundle.FORMAT_NAME, "version": bundle.FORMAT_VERSION},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"name": recipe.student.name, "num_classes": info.num_classes, "teacher": recipe.teacher.name},
        "preprocessing": {
            "image_size": size, "height": size, "width": size, "layout": "NCHW", "channels": "RGB",
            "dtype": "float32", "pipeline": PREPROCESSING, "scale": 1 / 255,
            "mean": [float(v) for v in info.mean], "std": [float(v) for v in info.std],
            "normalization": normalization,
            "class_names": [str(name) for name in info.class_names],
        },
        "opset": recipe.export.opset,
        "input": {"name": INPUT_NAME, "shape": [BATCH_DIM, 3, size, size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": [BATCH_DIM, info.num_classes], "dtype": "float32"},
        "provenance": {
            "run_dir": str(Path(run_dir).resolve()), "recipe": RECIPE_FILE, "recipe_sha256": recipe.digest(),
            "checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": sha256_file(checkpoint),
            "exporter": EXPORTER,
        },
        "calibration": calibration,
        "reference": reference,
        "versions": _versions(with_tensorrt=trt),
        "artefacts": artefacts,
    })
