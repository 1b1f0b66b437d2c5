"""kdtool: distil, export and verify compact image classifiers.

Every stage is usable without the CLI::

    from kdtool import load_recipe, distill, export_bundle, load_bundle, run_bench
    recipe = load_recipe("recipes/quickstart.yaml", ["train.epochs=2"])
    summary = distill(recipe, "runs/quickstart")
    bundle = export_bundle("runs/quickstart")
    report = run_bench(bundle)

Names are imported on first use (PEP 562), so ``import kdtool`` (and the CLI's ``--help``) does not
import torch or any stage it does not touch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "kdtool.augment": ["JointAugment", "POLICIES", "TrainViews", "build_jda", "build_train_views", "joint_batch"],
    "kdtool.data": ["DATASETS", "DataInfo", "build_datasets", "build_loader", "normalize"],
    "kdtool.errors": ["CheckFailed", "KdtoolError"],
    "kdtool.evaluate": ["classification_metrics", "predict", "topk_accuracy"],
    "kdtool.losses": ["METHODS", "Objective", "build_loss", "ccd", "cross_entropy", "dist", "dkd", "kd"],
    "kdtool.models": ["MODELS", "build_model"],
    "kdtool.preprocess": ["Normalization", "Renormalize", "normalization_plan", "teacher_on_student_inputs"],
    "kdtool.recipe": ["METHOD_SETTINGS", "Recipe", "RecipeError", "load_recipe", "parse_yaml", "recipe_from_dict"],
    "kdtool.rundir": ["load_student", "load_teacher"],
    "kdtool.train": ["distill", "fit"],
    "kdtool.export": ["export_bundle", "read_manifest", "rebuild_engines"],
    "kdtool.bench": ["load_bundle", "run_bench"],
    "kdtool.sweep": ["run_sweep"],
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'kdtool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
