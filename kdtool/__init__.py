"""kdtool: distil, export and verify compact image classifiers.

Every stage is usable without the CLI::

    from kdtool import load_recipe, distill, export_bundle, load_bundle, run_bench
    recipe = load_recipe("recipes/quickstart.yaml", ["train.epochs=2"])
    summary = distill(recipe, "runs/quickstart")
    bundle = export_bundle("runs/quickstart")
    report = run_bench(bundle)
"""
from kdtool.augment import JointAugment, POLICIES, TrainViews, build_jda, build_train_views, joint_batch
from kdtool.data import DATASETS, DataInfo, build_datasets, build_loader, normalize
from kdtool.errors import CheckFailed, KdtoolError
from kdtool.evaluate import classification_metrics, predict, topk_accuracy
from kdtool.losses import METHODS, build_loss, ccd, dist, dkd, kd, vanilla
from kdtool.models import MODELS, build_model
from kdtool.preprocess import Normalization, Renormalize, normalization_plan, teacher_on_student_inputs
from kdtool.recipe import METHOD_SETTINGS, Recipe, RecipeError, load_recipe, parse_yaml, recipe_from_dict
from kdtool.rundir import load_student, load_teacher
from kdtool.train import distill, fit
from kdtool.export import export_bundle, read_manifest, rebuild_engines
from kdtool.bench import load_bundle, run_bench
from kdtool.sweep import run_sweep

__version__ = "0.1.0"

__all__ = [
    "CheckFailed", "DATASETS", "DataInfo", "JointAugment", "KdtoolError", "METHODS", "METHOD_SETTINGS", "MODELS",
    "Normalization", "POLICIES", "Recipe", "RecipeError", "Renormalize", "TrainViews", "build_datasets", "build_jda",
    "build_loader", "build_loss", "build_model", "build_train_views", "ccd", "classification_metrics", "dist", "distill",
    "dkd", "export_bundle", "fit", "joint_batch", "kd", "load_bundle", "load_recipe", "load_student", "load_teacher",
    "normalization_plan", "normalize", "parse_yaml", "predict", "read_manifest", "rebuild_engines", "recipe_from_dict",
    "run_bench", "run_sweep", "teacher_on_student_inputs", "topk_accuracy", "vanilla",
]
