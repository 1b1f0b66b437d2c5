"""`kdtool sweep`: a grid of overrides x seeds over one shared teacher."""
from __future__ import annotations

from pathlib import Path

import click

from kdtool.cli.common import debug_option, handle_errors, set_option


@click.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--grid", "grid_specs", multiple=True, required=True, metavar="KEY.PATH=V1,V2,...",
              help="A recipe key and the values to try, typed as YAML (repeatable; the grid is their product).")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs per combination, with seeds recipe seed, seed + 1, ...")
@set_option
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Sweep directory (default: runs/<recipe name>-sweep).")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@debug_option
@handle_errors
def sweep(recipe_path, grid_specs, seeds, overrides, out, progress):
    """Distil RECIPE for every combination of --grid values and --seeds, from one shared teacher.

    Writes results.csv (one row per run), table.md / table.csv (mean ± std per combination) and
    plot.png into the sweep directory. Running the same sweep again skips finished runs and
    resumes an unfinished one.

    \b
    Example:
        kdtool sweep recipes/quickstart.yaml --grid method.name=vanilla,kd,ccd \\
            --grid augment.jda.p=0,0.3 --seeds 3
    """
    from kdtool.sweep import TABLE_MD, parse_grid, run_sweep

    rows = run_sweep(recipe_path, parse_grid(grid_specs), seeds, overrides, out, progress)
    sweep_dir = Path(rows[0]["run_dir"]).parent
    click.echo((sweep_dir / TABLE_MD).read_text(), nl=False)
    click.echo(f"sweep directory: {sweep_dir}")
