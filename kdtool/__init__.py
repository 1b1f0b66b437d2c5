"""kdtool: distil, export and verify compact image classifiers.

Every stage is usable without the CLI::

    from kdtool import load_recipe, distill, export_bundle, run_bench
    recipe = load_recipe("recipes/quickstart.yaml", ["train.epochs=2"])
    summary = distill(recipe, "runs/quickstart")
    bundle = export_bundle("runs/quickstart")
    report = run_bench(bundle)
"""
from kdtool.augment import JointAugment, POLICIES, build_jda, joint_batch
from kdtool.data import DATASETS, DataInfo, build_datasets, build_loader, normalize
from kdtool.errors import CheckFailed, KdtoolError
from kdtool.evaluate import classification_metrics, predict, topk_accuracy
from kdtool.losses import METHODS, build_loss, ccd, kd, vanilla
from kdtool.models import MODELS, build_model
from kdtool.recipe import Recipe, RecipeError, load_recipe, recipe_from_dict
from kdtool.rundir import load_student, load_teacher
from kdtool.train import distill, fit
from kdtool.export import export_bundle
from kdtool.bench import run_bench
from kdtool.sweep import run_sweep

__version__ = "0.1.0"

__all__ = [
    "CheckFailed", "DATASETS", "DataInfo", "JointAugment", "KdtoolError", "METHODS", "MODELS", "POLICIES",
    "Recipe", "RecipeError", "build_datasets", "build_jda", "build_loader", "build_loss", "build_model", "ccd",
    "classification_metrics", "distill", "export_bundle", "fit", "joint_batch", "kd", "load_recipe", "load_student", "load_teacher",
    "normalize", "predict", "recipe_from_dict", "run_bench", "run_sweep", "topk_accuracy", "vanilla",
]
