"""The `kdtool` command line: thin Click commands over the library stages, one module per group."""
from __future__ import annotations

import click

from kdtool.cli.common import OneLineErrors, debug_option


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kdtool")
@debug_option
def cli():
    """kdtool: distil a compact image classifier from a teacher (CCD + JDA), export it
    (ONNX, INT8 Q/DQ, FP16, TensorRT) and verify speed and accuracy before you ship.

    \b
    Quick start (embedded handwritten digits, CPU, about three minutes):
        kdtool run recipes/quickstart.yaml
    """


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="kdtool")


# Each command group lives in its own module; registering them here keeps `cli` the one entry point.
from kdtool.cli import bench as _bench  # noqa: E402
from kdtool.cli import export as _export  # noqa: E402
from kdtool.cli import sweep as _sweep  # noqa: E402
from kdtool.cli import train as _train  # noqa: E402

for _command in (_train.run, _train.distill, _export.export, _bench.bench, _sweep.sweep, _train.recipe):
    cli.add_command(_command)
