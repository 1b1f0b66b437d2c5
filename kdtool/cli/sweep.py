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
@click.option("--executor", type=click.Choice(["serial", "ray"]), default=None,
              help="Where cells run: serial (in this process, the default) or ray (each cell a Ray task; "
                   "pip install 'kdtool[ray]').")
@click.option("--address", default=None, metavar="ADDRESS",
              help="A running Ray cluster for the cells ('auto', 'host:6379'; implies --executor ray). Without it "
                   "the ray executor starts a local Ray with this machine's cores.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@debug_option
@handle_errors
def sweep(source, grid_specs, seeds, overrides, out, executor, address, progress):
    """Distil every combination of a grid x seeds, from teachers trained once, and tabulate it.

    SPEC is a sweep spec file (recipes/sweeps/*.yaml: base recipe, fixed overrides, grid, seeds,
    out, executor); RECIPE with --grid is the same from the command line. Everything is checked
    before anything trains. Writes results.csv (one row per run), table.md / table.csv (mean ± sample
    std per combination) and plot.png into the sweep directory. Running the same sweep again skips
    finished runs and resumes an unfinished one. A cell that fails is named in the table with its
    reason while the others finish; the command then exits 1.

    \b
    Examples:
        kdtool sweep recipes/sweeps/c_proportion.yaml
        kdtool sweep recipes/sweeps/e_methods.yaml --address auto     # on a running Ray cluster
        kdtool sweep recipes/quickstart.yaml --grid method.name=vanilla,kd,ccd \\
            --grid augment.jda.p=0,0.3 --seeds 3
    """
    from kdtool.errors import CheckFailed
    from kdtool.sweep import FAILED, TABLE_MD, executor_config, parse_grid, refuse_spec_as_recipe, run_spec, run_sweep

    settings = {key: value for key, value in (("name", executor or (address and "ray")), ("address", address)) if value}
    if grid_specs:
        refuse_spec_as_recipe(source)
        rows = run_sweep(source, parse_grid(grid_specs), seeds or 1, overrides, out, progress,
                         executor=executor_config(settings))
    else:
        rows = run_spec(source, seeds=seeds, overrides=overrides, out=out, progress=progress, executor=settings)
    sweep_dir = Path(rows[0]["run_dir"]).parent
    click.echo((sweep_dir / TABLE_MD).read_text(), nl=False)
    click.echo(f"sweep directory: {sweep_dir}")
    failed = [Path(row["run_dir"]).name for row in rows if row["status"] == FAILED]
    if failed:
        raise CheckFailed(f"{len(failed)} of {len(rows)} sweep cells failed ({', '.join(failed)}); "
                          f"their reasons are in {sweep_dir / TABLE_MD}")
