"""The export stage: a run's best student -> a verified, self-describing deploy bundle.

A bundle is written into a staging directory and renamed into place at the end, so a bundle
directory that exists is complete. `export/README.md` documents every manifest key.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Sequence

import torch

from kdtool.data import DataInfo, Datasets, build_datasets, build_loader
from kdtool.errors import KdtoolError
from kdtool.evaluate import predict, topk_accuracy
from kdtool.export.images import PREPROCESSING, ValidationBatches, calibration_set
from kdtool.export.onnx_export import (
    BATCH_DIM, EXPORTER, INPUT_NAME, OUTPUT_NAME, compare_logits, export_onnx, ort_session, run_batched, torch_logits,
    verify_logits,
)
from kdtool.export.quantize import choose_reduce_range, convert_fp16, cpu_flags, quantize_with_fallback
from kdtool.export.tensorrt import TIMING_CACHE_FILE, build_engine, require_tensorrt
from kdtool.io import read_json_object, sha256_file, staging_dir, write_json_atomic
from kdtool.recipe import Recipe, dump_recipe
from kdtool.rundir import RECIPE_FILE, best_checkpoint, find_latest_run, load_student, run_recipe as _run_recipe

FORMAT_NAME = "kdtool-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FILE = "model.safetensors"
ONNX_FILES = {"fp32": "model.fp32.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
ENGINE_SOURCES = {"trt_fp16": ("fp32", "fp16"), "trt_int8": ("int8", "int8")}  # key -> (onnx artefact, precision)


# ------------------------------------------------------------------ finding things
def read_manifest(bundle_dir: Path) -> dict:
    """The parsed manifest.json of `bundle_dir` (KdtoolError naming the file when absent or corrupt)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise KdtoolError(f"bundle directory not found: {bundle_dir}")
    return read_json_object(bundle_dir / MANIFEST_FILE, f"bundle manifest (is {bundle_dir} an export bundle?)")


def run_recipe(run_dir: Path, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe a run was made with, with ``export.*`` overrides applied."""
    outside = [text for text in overrides if not text.startswith("export.")]
    if outside:
        raise KdtoolError(f"--set {outside[0]!r}: export may only override keys under export.")
    return _run_recipe(run_dir, overrides)


def bundle_dir_for(recipe: Recipe) -> Path:
    return Path(recipe.export.root) / (recipe.export.name or recipe.name)


def _check_writable(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KdtoolError(f"cannot create the bundle directory {target}: {exc.strerror}") from None
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise KdtoolError(f"cannot write the bundle directory {target}: {target.parent} is not writable")


# ------------------------------------------------------------------ the stage
def export_bundle(run_dir: Path, *, out: Path | None = None, trt: bool = False, overwrite: bool = False,
                  rebuild: bool = False, progress: bool = True, overrides: Sequence[str] = ()) -> Path:
    """Export the run's best student to a verified bundle; returns the bundle directory.

    `overrides` are ``export.key=value`` strings applied to the run's recipe. With `rebuild`
    and an existing bundle, only its TensorRT engines are rebuilt for this machine.
    """
    run_dir = Path(run_dir)
    recipe = run_recipe(run_dir, overrides)
    target = Path(out) if out is not None else bundle_dir_for(recipe)
    say = _reporter(progress)
    if rebuild and (target / MANIFEST_FILE).is_file():
        return rebuild_engines(target, recipe, say)
    if target.exists() and not overwrite:
        raise KdtoolError(f"bundle directory {target} exists; pass --overwrite to replace it")
    checkpoint = best_checkpoint(run_dir)
    _check_writable(target)
    if trt:
        require_tensorrt()  # before minutes of work, not after
    datasets = build_datasets(recipe.data)
    model = load_student(run_dir, recipe, datasets.info.num_classes)
    with staging_dir(target, overwrite=overwrite) as staging:
        artefacts, calibration = _onnx_artefacts(staging, model, datasets, recipe, say)
        if trt:
            artefacts.update(_engines(staging, artefacts, recipe, say))
        (staging / RECIPE_FILE).write_text(dump_recipe(recipe))
        _hash_artefacts(staging, artefacts)
        manifest = _manifest(recipe, datasets.info, run_dir, checkpoint, calibration, artefacts, trt)
        write_json_atomic(staging / MANIFEST_FILE, manifest)
    say(f"bundle written to {target}")
    return target


def _reporter(progress: bool):
    def say(message: str) -> None:
        if progress:
            print(f"[export] {message}", file=sys.stderr, flush=True)
    return say


def _onnx_artefacts(staging: Path, model: torch.nn.Module, datasets: Datasets, recipe: Recipe, say) -> tuple[dict, dict | None]:
    """FP32, INT8 and FP16 ONNX models, each verified; returns (artefacts, calibration description)."""
    cfg, info = recipe.export, datasets.info
    validation = ValidationBatches(datasets.val, info, recipe.data)
    images, _ = validation.head(cfg.verify_images)
    reference = torch_logits(model, images)
    artefacts: dict[str, dict] = {}

    say(f"exporting ONNX (opset {cfg.opset}) and checking it against PyTorch at batch sizes {cfg.verify_batch_sizes}")
    fp32 = staging / ONNX_FILES["fp32"]
    export_onnx(model, fp32, image_size=info.image_size, opset=cfg.opset)
    artefacts["fp32"] = _artefact("fp32", "fp32", "onnx", verify_logits(
        "FP32 ONNX", ort_session(fp32), images, reference, batch_sizes=cfg.verify_batch_sizes,
        max_abs_diff=cfg.max_abs_diff, min_cosine=cfg.min_cosine, min_top1_agreement=cfg.min_top1_agreement))

    calibration = None
    if cfg.int8.enabled:
        artefacts["int8"], calibration = _int8_artefact(staging, model, datasets, recipe, validation, images, reference, say)

    if cfg.fp16:
        say("converting to FP16 (float32 inputs/outputs)")
        convert_fp16(fp32, staging / ONNX_FILES["fp16"])
        artefacts["fp16"] = _artefact("fp16", "fp16", "onnx", _verify_fp16(staging / ONNX_FILES["fp16"], images, reference, recipe))
    return artefacts, calibration


def _int8_artefact(staging: Path, model, datasets: Datasets, recipe: Recipe, validation: ValidationBatches,
                   images, reference, say) -> tuple[dict, dict]:
    int8_cfg = recipe.export.int8
    calibration = calibration_set(datasets.train, datasets.info, int8_cfg.calibration_images, recipe.seed)
    reduce_range, reason = choose_reduce_range(int8_cfg.reduce_range, cpu_flags())
    logits, labels = predict(model, build_loader(datasets.val, recipe.data, train=False), datasets.info)
    float_top1 = topk_accuracy(logits, labels, ks=(1,))["top1"]
    say(f"quantising to INT8 Q/DQ on {len(calibration.indices)} training images ({int8_cfg.method}, "
        f"per_channel={int8_cfg.per_channel}, reduce_range={reduce_range}); float top-1 {float_top1:.2f}%")
    path = staging / ONNX_FILES["int8"]
    result = quantize_with_fallback(staging / ONNX_FILES["fp32"], path, calibration=calibration.images,
                                    validation=validation, input_name=INPUT_NAME, cfg=int8_cfg,
                                    reduce_range=reduce_range, float_top1=float_top1)
    say(f"INT8 top-1 {result.int8_top1:.2f}% (drop {result.top1_drop:.2f} points, "
        f"{len(result.kept_in_float)} node(s) kept in float)")
    verification = {
        "vs_pytorch": {"images": int(len(images)), **compare_logits(reference, run_batched(ort_session(path), images, 32))},
        "accuracy": {"split": "val", "images": len(validation), "float_top1": round(result.float_top1, 4),
                     "int8_top1": round(result.int8_top1, 4), "top1_drop": round(result.top1_drop, 4),
                     "max_top1_drop": int8_cfg.max_top1_drop},
        "fallback": {"kept_in_float": result.kept_in_float, "budget": int8_cfg.fallback_budget,
                     "sensitivity_top": result.sensitivity, "steps": result.steps,
                     "sensitivity_metric": "SQNR (dB) lost across the node: worst dequantised-input SQNR - output "
                                           "SQNR, Q/DQ vs float activations on the calibration images"},
    }
    description = {
        "images": len(calibration.indices), "split": "train",
        "selection": f"seeded permutation of the training set (seed {calibration.seed}), first N, sorted",
        "indices": calibration.indices,
        "transform": f"the training transform with torch seeded to {calibration.seed}, then {PREPROCESSING}",
        "method": int8_cfg.method, "per_channel": int8_cfg.per_channel,
        "reduce_range": reduce_range, "reduce_range_reason": reason,
        "format": "QDQ", "activation_type": "uint8", "weight_type": "int8",
    }
    return _artefact("int8", "int8", "onnx", verification), description


def _verify_fp16(path: Path, images, reference, recipe: Recipe) -> dict | str:
    cfg = recipe.export
    try:
        session = ort_session(path)
    except KdtoolError as exc:
        return f"unverified: ONNX Runtime (CPU) cannot run it: {exc}"
    return verify_logits("FP16 ONNX", session, images, reference, batch_sizes=cfg.verify_batch_sizes,
                         max_abs_diff=cfg.fp16_max_abs_diff, min_cosine=cfg.fp16_min_cosine,
                         min_top1_agreement=cfg.fp16_min_top1_agreement)


def _artefact(key: str, precision: str, kind: str, verification, **extra) -> dict:
    return {"file": _file_of(key), "precision": precision, "kind": kind,
            "verification": verification, **extra}


def _file_of(key: str) -> str:
    return ONNX_FILES.get(key) or f"model.{key}.engine"


# ------------------------------------------------------------------ TensorRT
def _engines(bundle: Path, artefacts: dict, recipe: Recipe, say) -> dict:
    """TensorRT engines for the ONNX artefacts present, sharing one timing cache in the bundle."""
    built = {}
    for key, (source, precision) in ENGINE_SOURCES.items():
        if source not in artefacts:
            continue
        say(f"building TensorRT {precision} engine from {artefacts[source]['file']}")
        engine = build_engine(bundle / artefacts[source]["file"], bundle / _file_of(key), precision=precision,
                              input_name=INPUT_NAME, image_size=recipe.data.image_size, cfg=recipe.export.tensorrt,
                              timing_cache=bundle / TIMING_CACHE_FILE)
        built[key] = _artefact(key, precision, "tensorrt",
                               "unverified: engines are checked on the GPU by `kdtool bench`",
                               source=artefacts[source]["file"], engine=engine, timing_cache=TIMING_CACHE_FILE)
    return built


def rebuild_engines(bundle_dir: Path, recipe: Recipe, say=print) -> Path:
    """Rebuild an existing bundle's TensorRT engines for this machine, keeping its ONNX models."""
    require_tensorrt()
    manifest = read_manifest(bundle_dir)
    with staging_dir(bundle_dir, overwrite=True) as staging:
        shutil.copytree(bundle_dir, staging, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.engine", TIMING_CACHE_FILE, MANIFEST_FILE))
        onnx_artefacts = {key: entry for key, entry in manifest["artefacts"].items() if entry["kind"] == "onnx"}
        manifest["artefacts"] = {**onnx_artefacts, **_engines(staging, onnx_artefacts, recipe, say)}
        _hash_artefacts(staging, manifest["artefacts"])
        manifest["versions"] = _versions(with_tensorrt=True)
        write_json_atomic(staging / MANIFEST_FILE, manifest)
    return Path(bundle_dir)


# ------------------------------------------------------------------ the manifest
def _hash_artefacts(bundle: Path, artefacts: dict) -> None:
    for entry in artefacts.values():
        entry["sha256"] = sha256_file(bundle / entry["file"])
        entry["size_bytes"] = (bundle / entry["file"]).stat().st_size


def _versions(with_tensorrt: bool) -> dict:
    import onnx
    import onnxruntime

    versions = {"kdtool": metadata.version("kdtool"), "python": platform.python_version(), "torch": torch.__version__,
                "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if with_tensorrt:
        versions["tensorrt"] = require_tensorrt().__version__
    return versions


def _manifest(recipe: Recipe, info: DataInfo, run_dir: Path, checkpoint: Path, calibration: dict | None,
              artefacts: dict, trt: bool) -> dict:
    size = info.image_size
    return {
        "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"name": recipe.student.name, "num_classes": info.num_classes, "teacher": recipe.teacher.name},
        "preprocessing": {
            "image_size": size, "height": size, "width": size, "layout": "NCHW", "channels": "RGB",
            "dtype": "float32", "pipeline": PREPROCESSING, "scale": 1 / 255,
            "mean": list(info.mean), "std": list(info.std), "class_names": list(info.class_names),
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
        "versions": _versions(with_tensorrt=trt),
        "artefacts": artefacts,
    }
