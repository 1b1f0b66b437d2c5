"""`kdtool distill`, `kdtool run` and `kdtool recipe check`."""
from __future__ import annotations

from pathlib import Path

import click

from kdtool.cli.common import (
    OneLineErrors, debug_option, handle_errors, is_main_process, read_recipe, recipe_options, set_option,
)


@click.command()
@recipe_options
@handle_errors
def distill(recipe_path, overrides, seed, out, resume, overwrite, progress):
    """Distil the student of RECIPE (training the teacher first when the recipe names no weights).

    \b
    Examples:
        kdtool distill recipes/quickstart.yaml
        kdtool distill recipes/quickstart.yaml --set method.name=kd --out runs/kd
        accelerate launch --num_processes 8 -m kdtool.cli distill recipes/imagenet_r50_mbv2.yaml
    """
    from kdtool.train import distill as run_distill

    recipe = read_recipe(recipe_path, overrides, seed)
    _warn_unused(recipe)
    run_dir = out or Path("runs") / recipe.name
    summary = run_distill(recipe, run_dir, resume=resume, overwrite=overwrite, progress=progress)
    _print_summary(summary)


def _warn_unused(recipe) -> None:
    from kdtool.preflight import unused_settings

    for note in unused_settings(recipe):
        click.secho(f"Warning: unused setting {note}", fg="yellow", err=True)


def _print_summary(summary: dict) -> None:
    if not is_main_process():  # under torchrun / accelerate launch every rank returns the summary
        return
    for role in ("teacher", "student"):
        metrics = summary.get(role)
        if metrics:
            shown = ", ".join(f"{k.removeprefix('val_')}={v:.2f}" for k, v in metrics.items()
                              if k.startswith("val_") and isinstance(v, float))
            click.echo(f"{role}: best epoch {metrics['epoch']}: {shown}")
    click.echo(f"run directory: {summary['run_dir']}")


@click.command()
@recipe_options
@handle_errors
def run(recipe_path, overrides, seed, out, resume, overwrite, progress):
    """Run every stage RECIPE enables: distil, then export (export.enabled) and bench (bench.enabled).

    The bundle goes to <export.root>/<export.name or recipe name>; an existing bundle there is
    replaced only with --overwrite (--resume continues training, it never replaces a bundle).
    Exit 1 when a verification or the accuracy gate fails.

    \b
    Example:
        kdtool run recipes/quickstart.yaml
        kdtool run recipes/quickstart.yaml --set method.name=kd --out runs/kd --set export.name=kd
    """
    from kdtool.train import distill as run_distill

    from kdtool.cli.export import print_artefacts
    from kdtool.errors import KdtoolError
    from kdtool.export import bundle_dir_for, export_bundle

    recipe = read_recipe(recipe_path, overrides, seed)
    _warn_unused(recipe)
    run_dir = out or Path("runs") / recipe.name
    bundle_dir = bundle_dir_for(recipe)
    if recipe.export.enabled and (bundle_dir.exists() or bundle_dir.is_symlink()) and not overwrite:
        # Checked before training, so a finished run never ends on this.
        raise KdtoolError(f"bundle directory {bundle_dir} exists; pass --overwrite to replace it or set export.name"
                          + (" (--resume never replaces a bundle)" if resume else ""))
    summary = run_distill(recipe, run_dir, resume=resume, overwrite=overwrite, progress=progress)
    _print_summary(summary)
    if recipe.export.enabled:
        bundle = export_bundle(run_dir, overwrite=overwrite, progress=progress)
        print_artefacts(bundle)
        if recipe.bench.enabled:
            from kdtool.cli.bench import bench_and_print

            bench_and_print(bundle, progress=progress)


@click.group(cls=OneLineErrors)
def recipe():
    """Inspect recipes."""


@recipe.command("check")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))
@set_option
@debug_option
@handle_errors
def recipe_check(recipe_path, overrides):
    """Check RECIPE as distill does before it trains (data read, models built with their weights and run
    on one batch of the input size, method, JDA views), then print it resolved (defaults filled in,
    overrides and ${ENV} applied) and, as YAML comments, which input normalisation each model gets and
    why, and the settings nothing reads. Prints nothing but the error when the recipe is not valid."""
    from kdtool.preflight import preflight, unused_settings
    from kdtool.preprocess import describe_normalization
    from kdtool.recipe import dump_recipe, load_recipe
    from kdtool.train.tracking import check_trackers

    resolved = load_recipe(recipe_path, overrides)
    checked = preflight(resolved)  # what distill checks before it trains; nothing is printed unless it passes
    check_trackers(resolved.runtime.log_with)
    click.echo(dump_recipe(resolved), nl=False)
    click.echo("# normalisation (the recipe's, else the pretrained weights', else the dataset's):")
    for line in describe_normalization(resolved, checked.datasets.info):
        click.echo(f"#   {line}")
    unused = unused_settings(resolved)
    if unused:
        click.echo("# set, but nothing reads them:")
        for line in unused:
            click.echo(f"#   {line}")
    click.echo(f"# JDA views of images of differing sizes: {_view_device_line(resolved)}")


def _view_device_line(resolved) -> str:
    """Where `augment.jda.device` makes the views on this machine, and why."""
    import torch

    from kdtool.augment import view_device

    device_type = "cuda" if torch.cuda.is_available() and not resolved.runtime.cpu else "cpu"
    where, why = view_device(resolved.augment.jda.device, device_type)
    place = "on the accelerator, batched" if where == "accelerator" else "in the loader workers, one image at a time"
    return f"made {place} ({why})"

