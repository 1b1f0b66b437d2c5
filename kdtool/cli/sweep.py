"""`kdtool sweep`: a grid of overrides x seeds over shared teachers, from a spec file or the command line."""
from __future__ import annotations

from pathlib import Path

import click

from kdtool.cli.common import debug_option, handle_errors, set_option


@click.command()
@click.argument("source", metavar="SPEC|RECIPE", type=click.Path(path_type=Path))
@click.option("--grid", "grid_specs", multiple=True, metavar="KEY.PATH=V1,V2,...",
              help="With a RECIPE: a recipe key and the values to try, typed as YAML (repeatable; the grid is "
                   "their product).")
@click.option("--seeds", type=click.IntRange(min=1), default=None,
              help="Runs per combination (at most 1000), with seeds recipe seed, seed + 1, ... (default: the spec's, "
                   "or 1).")
@set_option
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Sweep directory (default: the spec's out, or runs/<recipe name>-sweep).")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@debug_option
@handle_errors
def sweep(source, grid_specs, seeds, overrides, out, progress):
    """Distil every combination of a grid x seeds, from teachers trained once, and tabulate it.

    SPEC is a sweep spec file (recipes/sweeps/*.yaml: base recipe, fixed overrides, grid, seeds,
    out); RECIPE with --grid is the same from the command line. Everything is checked before
    anything trains. Writes results.csv (one row per run), table.md / table.csv (mean ± sample std
    per combination) and plot.png into the sweep directory. Running the same sweep again skips
    finished runs and resumes an unfinished one.

    \b
    Examples:
        kdtool sweep recipes/sweeps/c_proportion.yaml
        kdtool sweep recipes/quickstart.yaml --grid method.name=vanilla,kd,ccd \\
            --grid augment.jda.p=0,0.3 --seeds 3
    """
    from kdtool.sweep import TABLE_MD, parse_grid, refuse_spec_as_recipe, run_spec, run_sweep

    if grid_specs:
        refuse_spec_as_recipe(source)
        rows = run_sweep(source, parse_grid(grid_specs), seeds or 1, overrides, out, progress)
    else:
        rows = run_spec(source, seeds=seeds, overrides=overrides, out=out, progress=progress)
    sweep_dir = Path(rows[0]["run_dir"]).parent
    click.echo((sweep_dir / TABLE_MD).read_text(), nl=False)
    click.echo(f"sweep directory: {sweep_dir}")
