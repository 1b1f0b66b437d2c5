"""The `kdtool` command line: thin Click commands over the library stages.

Errors from the library (`KdtoolError`) become one line on stderr and an exit code (2 bad input,
1 failed check); ``--debug`` (or ``KDTOOL_DEBUG=1``) shows the full traceback instead.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from kdtool.errors import KdtoolError
from kdtool.recipe import Recipe, dump_recipe, load_recipe


def _debug_enabled(ctx: click.Context | None) -> bool:
    while ctx is not None:
        if ctx.meta.get("kdtool.debug"):
            return True
        ctx = ctx.parent
    return os.environ.get("KDTOOL_DEBUG", "") not in ("", "0")


def handle_errors(command):
    """Turn library errors (and OS errors on user paths) into one-line messages with exit codes."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        try:
            return command(*args, **kwargs)
        except (KdtoolError, OSError) as exc:
            if _debug_enabled(ctx):
                raise
            code = getattr(exc, "exit_code", 2)
            message = str(exc) if isinstance(exc, KdtoolError) else f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
            click.secho(f"Error: {message}", fg="red", err=True)
            ctx.exit(code)
        except KeyboardInterrupt:
            click.secho("Interrupted.", fg="yellow", err=True)
            ctx.exit(130)

    return wrapper


def _set_debug(ctx: click.Context, _param, value: bool):
    if value:
        ctx.meta["kdtool.debug"] = True
    return value


debug_option = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                            help="Show full tracebacks instead of one-line errors.")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                          help="Override a recipe value, e.g. --set train.epochs=5 (repeatable).")


def recipe_options(command):
    """Options shared by every command that reads a recipe."""
    for option in reversed([
        click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path)),
        set_option,
        click.option("--seed", type=int, default=None, help="Override the recipe's seed."),
        click.option("--out", type=click.Path(path_type=Path), default=None,
                     help="Run directory (default: runs/<recipe name>)."),
        click.option("--resume", is_flag=True, help="Continue the run in the run directory from its last checkpoint."),
        click.option("--overwrite", is_flag=True, help="Replace an existing run directory."),
        click.option("--progress/--no-progress", default=True, help="Show progress bars."),
        debug_option,
    ]):
        command = option(command)
    return command


def read_recipe(recipe_path: Path, overrides, seed: int | None) -> Recipe:
    overrides = list(overrides) + ([f"seed={seed}"] if seed is not None else [])
    return load_recipe(recipe_path, overrides)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kdtool")
@debug_option
def cli():
    """kdtool: distil a compact image classifier from a teacher (CCD + JDA), export it
    (ONNX, INT8 Q/DQ, FP16, TensorRT) and verify speed and accuracy before you ship.

    \b
    Quick start (embedded handwritten digits, CPU, about three minutes):
        kdtool run recipes/quickstart.yaml
    """


@cli.command()
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
    run_dir = out or Path("runs") / recipe.name
    summary = run_distill(recipe, run_dir, resume=resume, overwrite=overwrite, progress=progress)
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    for role in ("teacher", "student"):
        metrics = summary.get(role)
        if metrics:
            shown = ", ".join(f"{k.removeprefix('val_')}={v:.2f}" for k, v in metrics.items()
                              if k.startswith("val_") and isinstance(v, float))
            click.echo(f"{role}: best epoch {metrics['epoch']}: {shown}")
    click.echo(f"run directory: {summary['run_dir']}")


@cli.command()
@recipe_options
@handle_errors
def run(recipe_path, overrides, seed, out, resume, overwrite, progress):
    """Run every stage RECIPE enables: distil, then export and bench where enabled.

    \b
    Example:
        kdtool run recipes/quickstart.yaml
    """
    from kdtool.train import distill as run_distill

    recipe = read_recipe(recipe_path, overrides, seed)
    run_dir = out or Path("runs") / recipe.name
    summary = run_distill(recipe, run_dir, resume=resume, overwrite=overwrite, progress=progress)
    _print_summary(summary)


@cli.group()
def recipe():
    """Inspect recipes."""


@recipe.command("check")
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))
@set_option
@debug_option
@handle_errors
def recipe_check(recipe_path, overrides):
    """Validate RECIPE and print it resolved (defaults filled in, overrides and ${ENV} applied)."""
    click.echo(dump_recipe(load_recipe(recipe_path, overrides)), nl=False)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="kdtool")


if __name__ == "__main__":
    sys.exit(main())
